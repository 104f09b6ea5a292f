"""`package-triton`: configs parsed with Triton's own protobuf and checked against the manifest; the merged
START-selected graph computes prime or step per sample; the repository runs on the bundled tritonserver."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import build_tiny_unet
from serving_util import assert_label_errors, repository_server

from modiff_export import QuantConfig
from modiff_export.export.trace import export_model
from modiff_export.fsutil import OutputError
from modiff_export.manifest import Manifest
from modiff_export.models import LoadedModel
from modiff_export.serving.merge_graph import MergeError
from modiff_export.serving.model_repository import (
    PackageOptions,
    write_model_repository,
)

ROOT = Path(__file__).resolve().parent.parent
SCHED = {"num_train_timesteps": 1000}
SHAPE = (1, 16, 16)
mc = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] is not installed")


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    out = tmp_path_factory.mktemp("repo") / "tiny-w8a4"
    export_model(LoadedModel.from_unet(build_tiny_unet(), "tiny", SCHED), QuantConfig(act_bits=4), out, progress=False)
    return out


def _parse(path: Path):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), mc.ModelConfig())


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt", "python"])
def test_configs_match_manifest(graphs, tmp_path, backend):
    out = write_model_repository(graphs, tmp_path / "mr", PackageOptions(unet_backend=backend, max_batch=4))
    m = Manifest.load(graphs)
    unet, sampler = _parse(out / "modiff_unet" / "config.pbtxt"), _parse(out / "modiff" / "config.pbtxt")
    assert unet.max_batch_size == 4 and sampler.max_batch_size == 4
    assert (unet.platform or unet.backend) == {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan",
                                               "python": "python"}[backend]
    ins = {i.name: i for i in unet.input}
    assert set(ins) == {s.name for s in m.inputs}
    assert list(ins["sample"].dims) == [int(d) for d in m.inputs[0].shape[1:]]
    assert list(ins["timestep"].dims) == [1] and list(ins["timestep"].reshape.shape) == []
    assert [(o.name, list(o.dims)) for o in unet.output] == [("noise_pred", [1, 16, 16])]
    sb = unet.sequence_batching
    kind = mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_START
    start = [c for c in sb.control_input if c.control[0].kind == kind]
    assert len(start) == 1 and list(start[0].control[0].int32_false_true) == [0, 1]
    if backend == "python":
        assert not sb.state and {c.name for c in sb.control_input} == {"START", "END", "CORRID"}
    else:
        assert start[0].name == "start"
        want = {c.input: (c.output, [int(d) for d in c.shape[1:]], c.dtype) for c in m.caches}
        got = {s.input_name: (s.output_name, list(s.dims), s.data_type) for s in sb.state}
        assert len(sb.state) == len(m.caches) == len(got)
        for name, (out_name, dims, dtype) in want.items():
            assert got[name] == (out_name, dims, mc.TYPE_FP32 if dtype == "float32" else mc.TYPE_FP16)
        assert all(s.initial_state[0].zero_data and list(s.initial_state[0].dims) == list(s.dims) for s in sb.state)
    assert [i.name for i in sampler.input] == ["seed", "steps", "scheduler"] and sampler.input[2].optional
    assert [(o.name, list(o.dims)) for o in sampler.output] == [("image", [1, 16, 16])]
    assert sampler.parameters["unet_model"].string_value == "modiff_unet"
    qp = sampler.dynamic_batching.default_queue_policy  # overload: bounded queue, rejected at once
    assert qp.max_queue_size == 32 and qp.timeout_action == qp.REJECT
    assert sampler.parameters["max_inflight"].string_value == "64"
    assert sb.max_sequence_idle_microseconds == 60_000_000  # abandoned sequences end
    if backend == "python":
        assert unet.parameters["sequence_idle_us"].string_value == "60000000"
    model_file = out / "modiff_unet" / ("model.onnx" if backend == "tensorrt" else "1/model.onnx")
    assert model_file.is_file() and (out / "modiff" / "1" / "model.py").is_file()


def test_merged_graph_selects_prime_or_step_per_sample(graphs, tmp_path):
    out = write_model_repository(graphs, tmp_path / "mr")
    m = Manifest.load(graphs)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # as OrtRunner does
    merged, prime, step = (ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for p in
                           (out / "modiff_unet/1/model.onnx", graphs / "prime.onnx", graphs / "step.onnx"))
    names = [o.name for o in merged.get_outputs()]
    rs = np.random.RandomState(0)
    x, t = rs.randn(3, *SHAPE).astype(np.float32), np.full(3, 900.0, np.float32)
    zeros = {c.input: np.zeros([3, *[int(d) for d in c.shape[1:]]], np.float32) for c in m.caches}
    a = dict(zip(names, merged.run(None, {"sample": x, "timestep": t, "start": np.ones((3, 1), np.int32), **zeros})))
    p = dict(zip(names, prime.run(names, {"sample": x, "timestep": t})))
    state = {c.input: a[c.output] for c in m.caches}
    x2 = rs.randn(3, *SHAPE).astype(np.float32)
    s = dict(zip(names, step.run(names, {"sample": x2, "timestep": t - 100, **state})))
    p2 = dict(zip(names, prime.run(names, {"sample": x2, "timestep": t - 100})))
    start = np.array([[0], [1], [0]], np.int32)
    mixed = dict(zip(names, merged.run(None, {"sample": x2, "timestep": t - 100, "start": start, **state})))
    for k in names:  # exact: the same graphs, the same kernels; Where only selects
        np.testing.assert_array_equal(a[k], p[k])
        np.testing.assert_array_equal(mixed[k][[0, 2]], s[k][[0, 2]])
        np.testing.assert_array_equal(mixed[k][1], p2[k][1])


def test_refuses_overwrite_and_stateless_graphs(graphs, tmp_path):
    out = tmp_path / "mr"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputError, match="--overwrite"):
        write_model_repository(graphs, out)
    assert (out / "keep.txt").is_file()
    export_model(LoadedModel.from_unet(build_tiny_unet(), "tiny"), QuantConfig(mode="fp"), tmp_path / "fp",
                 progress=False)
    with pytest.raises(MergeError, match="no caches"):
        write_model_repository(tmp_path / "fp", tmp_path / "mr2")
    assert not (tmp_path / "mr2").exists() and not list(tmp_path.glob(".mr2.*"))
    p = subprocess.run([sys.executable, "cli.py", "package-triton", str(graphs), "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 1 and p.stderr.strip().startswith("error:") and "--overwrite" in p.stderr


@pytest.mark.slow  # a real Triton server: ~20 s; the slow set (.ci/run) runs it
def test_repository_runs_on_bundled_tritonserver(graphs, tmp_path):
    """The python-UNet variant runs whole trajectories through Triton: BLS sampler -> sequence-batched
    UNet with one correlation id per image; concurrent images equal the solo computation exactly."""
    from modiff_export.backends.ort_runner import OrtRunner
    from modiff_export.serving.client import Client, InferError, infer_concurrently
    from modiff_export.serving.sampler import Item, generate_items

    repo = write_model_repository(graphs, tmp_path / "mr", PackageOptions(unet_backend="python", max_batch=4,
                                                                          max_steps=10))
    with repository_server(repo, ["modiff", "modiff_unet"], tmp_path) as (_, port):
        reqs = [(7 + k, 4 if k % 2 else 5) for k in range(4)]
        got, errors = infer_concurrently(port, reqs)
        assert not errors, errors
        # the repository's Python UNet runs the graphs as exported on ORT's own kernels, which on CPUs without
        # VNNI/AMX saturate (backends/cpu.py), where OrtRunner folds the weights by default: compare like with like
        r = OrtRunner(graphs, threads=1, int8_kernels=True)
        for k, (seed, steps) in enumerate(reqs):
            np.testing.assert_array_equal(got[k], generate_items(r, SCHED, [Item(seed, steps)], SHAPE)[0].numpy())
        with pytest.raises(InferError, match="out of range") as e:
            Client("http", port).infer(1, 11)
        assert e.value.kind == "bad_request" and e.value.status == "400"


@pytest.mark.slow  # a real Triton server: ~20 s; the slow set (.ci/run) runs it
def test_sampler_of_onnxruntime_repository_loads_here(graphs, tmp_path):
    """The bundled tritonserver has no onnxruntime backend: the sampler loads, and a request says why it fails."""
    from modiff_export.serving.client import Client, InferError

    repo = write_model_repository(graphs, tmp_path / "mr")
    with repository_server(repo, ["modiff"], tmp_path) as (_, port), pytest.raises(InferError, match="modiff_unet"):
        Client("http", port).infer(1, 3)


@pytest.mark.slow  # a real Triton server: ~20 s; the slow set (.ci/run) runs it
def test_dit_repository_on_bundled_tritonserver(tmp_path):
    """A class-conditional DiT folder: the sampler takes class_label (+ guidance, null class as uncond), the
    UNet class_labels [1] reshaped like timestep; served images equal sample_model's (test_serving.py's
    tolerance argument), bad labels are one bad_request each."""
    from test_serving import assert_like_sample_model, dit_reference, export_tiny_dit

    from modiff_export.serving.client import Client, infer_concurrently

    model_folder, graphs = export_tiny_dit(tmp_path)
    repo = write_model_repository(graphs, tmp_path / "mr", PackageOptions(unet_backend="python", max_batch=4,
                                                                          max_steps=10))
    unet, sampler = _parse(repo / "modiff_unet" / "config.pbtxt"), _parse(repo / "modiff" / "config.pbtxt")
    ins = {i.name: i for i in unet.input}
    assert ins["class_labels"].data_type == mc.TYPE_INT64 and list(ins["class_labels"].dims) == [1]
    assert list(ins["class_labels"].reshape.shape) == []
    s_ins = {i.name: i for i in sampler.input}
    assert s_ins["class_label"].data_type == mc.TYPE_INT64 and s_ins["class_label"].optional
    assert "guidance_scale" in s_ins and "encoder_hidden_states" not in s_ins
    assert sampler.parameters["num_classes"].string_value == "10"
    with repository_server(repo, ["modiff", "modiff_unet"], tmp_path) as (_, port):
        reqs = [(30, 5, None, {"class_label": 4}),
                (31, 5, None, {"class_label": 9, "guidance_scale": (np.float32([3.0]), "FP32")})]
        got, errors = infer_concurrently(port, reqs)
        assert not errors, errors
        assert_like_sample_model(got[0], dit_reference(model_folder, graphs, 30, 4, 1.0), 1.0)
        assert_like_sample_model(got[1], dit_reference(model_folder, graphs, 31, 9, 3.0), 3.0)
        assert_label_errors(Client("http", port))


@pytest.mark.slow  # a real Triton server: ~20 s; the slow set (.ci/run) runs it
def test_pixart_repository_on_bundled_tritonserver(tmp_path):
    """PixArt graphs take encoder_attention_mask: the UNet config lists it ([S] FP32), the sampler is told
    (`masked`) and sends all ones beside a request's states (a request carries states, not a mask), and the
    served images equal generate_items' with the same states (with guidance exactly; without, within
    test_serving.assert_like_sample_model's batch-1-vs-2 float bound). Without the mask the UNet call fails."""
    import torch
    from conftest import build_tiny_pixart
    from test_serving import assert_like_sample_model

    from modiff_export.backends.ort_runner import OrtRunner
    from modiff_export.serving.client import infer_concurrently
    from modiff_export.serving.sampler import Item, generate_items

    graphs = tmp_path / "pixart-w8a4"
    export_model(LoadedModel.from_unet(build_tiny_pixart(), "tiny-pixart", SCHED), QuantConfig(act_bits=4), graphs,
                 progress=False)
    repo = write_model_repository(graphs, tmp_path / "mr", PackageOptions(unet_backend="python", max_batch=4,
                                                                          max_steps=10))
    unet, sampler = _parse(repo / "modiff_unet" / "config.pbtxt"), _parse(repo / "modiff" / "config.pbtxt")
    mask = {i.name: i for i in unet.input}["encoder_attention_mask"]
    assert mask.data_type == mc.TYPE_FP32 and list(mask.dims) == [120]
    assert sampler.parameters["masked"].string_value == "1"
    g = torch.Generator().manual_seed(3)
    states = [torch.randn(120, 24, generator=g) for _ in range(2)]
    reqs = [(12, 4, None, {"encoder_hidden_states": (states[0].numpy(), "FP32")}),
            (13, 4, None, {"encoder_hidden_states": (states[1].numpy(), "FP32"),
                           "guidance_scale": (np.float32([3.0]), "FP32")})]
    with repository_server(repo, ["modiff", "modiff_unet"], tmp_path) as (_, port):
        got, errors = infer_concurrently(port, reqs)
    assert not errors, errors
    r = OrtRunner(graphs, threads=1, int8_kernels=True)  # the repository's Python UNet: ORT as exported
    for k, guidance in enumerate((1.0, 3.0)):
        item = Item(12 + k, 4, guidance_scale=guidance, encoder_hidden_states=states[k])
        ref = generate_items(r, SCHED, [item], (4, 8, 8), ehs_shape=(120, 24))[0]
        assert_like_sample_model(got[k], ref, guidance)
