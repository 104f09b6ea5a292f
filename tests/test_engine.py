"""TensorRT engine planning (CPU) and, where TensorRT and a GPU exist, real engine builds.

Everything up to the TensorRT call is tested here on the CPU. The tests that need TensorRT are
skipped with their reason on machines without it; nothing about an engine is faked.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_model
from onnx import TensorProto, helper

from modiff_export.backends.trt_runner import TrtRunner
from modiff_export.config import QuantConfig
from modiff_export.engine import (
    EngineBuildOptions,
    EngineError,
    TensorRTUnavailable,
    build_engines,
    builder_settings,
    check_engine_io,
    count_block_quantized_weights,
    plan_profiles,
)
from modiff_export.manifest import SCHEMA, SCHEMA_VERSION, Manifest, ManifestError

HAS_TRT = importlib.util.find_spec("tensorrt") is not None and importlib.util.find_spec("polygraphy") is not None
needs_trt = pytest.mark.skipif(
    not (HAS_TRT and torch.cuda.is_available()),
    reason="TensorRT is not installed on this machine (CPU-only); needs a GPU machine with pip install -e .[tensorrt]")
no_trt_only = pytest.mark.skipif(HAS_TRT, reason="checks the message shown where TensorRT is missing")


def _spec(name, shape, dtype="float32"):
    return {"name": name, "shape": shape, "dtype": dtype}


def make_manifest(mode="modiff", wbits=8, abits=8, buckets=1, conditional=False, opset=17):
    qc = QuantConfig(mode=mode, weight_bits=wbits, act_bits=abits,
                     scale_mode="static" if buckets > 1 else "dynamic").to_dict()
    inputs = [_spec("sample", ["batch", 1, 16, 16]), _spec("timestep", ["batch"])]
    if conditional:
        inputs.append(_spec("encoder_hidden_states", ["batch", 77, 32]))
    caches = []
    if mode == "modiff":
        for layer, a_shape, o_shape in (("conv_in", [1, 16, 16], [16, 16, 16]), ("time_embedding.linear_1", [16],
                                                                                 [64])):
            for kind, shape in (("a_hat", a_shape), ("o_hat", o_shape)):
                caches.append({"layer": layer, "kind": kind, "input": f"cache_in.{layer}.{kind}",
                               "output": f"cache_out.{layer}.{kind}", "shape": ["batch", *shape], "dtype": "float32"})
    layers = ["conv_in", "time_embedding.linear_1"]
    m = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION,
         "model": {"name": "tiny", "class": "UNet2DModel", "content_hash": "abc", "in_channels": 1, "out_channels": 1,
                   "sample_size": [16, 16], "cross_attention_dim": 32 if conditional else None,
                   "encoder_seq_len": 77 if conditional else None},
         "quant_config": qc, "opset": opset, "cache_dtype": "float32",
         "graphs": {"prime": "prime.onnx", "step": "step.onnx" if caches else None},
         "inputs": inputs, "outputs": [_spec("noise_pred", ["batch", 1, 16, 16])], "caches": caches,
         "step_extra_inputs": [_spec("delta_scales", [2])] if buckets > 1 and caches else [],
         "scales": None if buckets == 1 else {"source": "cal.json", "n_buckets": buckets, "num_train_timesteps": 1000,
                                              "layers": layers, "table": {l: [0.1 * (i + 1) + b for b in range(buckets)]
                                                                          for i, l in enumerate(layers)}},
         "batch_axis": "batch", "files": {}}
    return Manifest.from_dict(m)


def write_graph_folder(folder: Path, manifest: Manifest) -> Path:
    """A graph folder with the manifest and small valid ONNX files (only parsed where TensorRT exists)."""
    folder.mkdir(parents=True)
    for role, name in manifest.graphs.items():
        if name:
            x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
            y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
            g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], role, [x], [y])
            onnx.save(helper.make_model(g), str(folder / name))
    manifest.with_digests(folder).write(folder)
    return folder


def fake_io(manifest, role, **changes):
    io = {s.name: {"mode": "input", "dtype": s.dtype, "shape": [-1 if d == "batch" else d for d in s.shape]}
          for s in manifest.graph_inputs(role)}
    io.update({s.name: {"mode": "output", "dtype": s.dtype, "shape": [-1 if d == "batch" else d for d in s.shape]}
               for s in manifest.graph_outputs(role)})
    io.update(changes)
    return {k: v for k, v in io.items() if v is not None}


# -- options -----------------------------------------------------------------------------------------
def test_options_validate():
    assert EngineBuildOptions(precision="int4", min_batch=1, opt_batch=2, max_batch=4,
                              workspace_gb=2).workspace_bytes == 2 * 1024**3
    for bad in (dict(precision="int2"), dict(min_batch=0), dict(min_batch=3, opt_batch=2), dict(opt_batch=9,
                                                                                                max_batch=8),
                dict(max_batch=True), dict(workspace_gb=-1), dict(cuda_graph="yes")):
        with pytest.raises(EngineError):
            EngineBuildOptions(**bad)


# -- profiles ----------------------------------------------------------------------------------------
def test_plan_profiles_cover_every_input_with_the_batch_range():
    m = make_manifest(buckets=4, conditional=True)
    p = plan_profiles(m, EngineBuildOptions(min_batch=2, opt_batch=4, max_batch=8))
    assert set(p) == {"prime", "step"}
    assert [e[0] for e in p["prime"]] == ["sample", "timestep", "encoder_hidden_states"]
    step = {name: (lo, opt, hi) for name, lo, opt, hi in p["step"]}
    assert set(step) == {"sample", "timestep", "encoder_hidden_states", "delta_scales", *(c.input for c in m.caches)}
    assert step["sample"] == ((2, 1, 16, 16), (4, 1, 16, 16), (8, 1, 16, 16))
    assert step["delta_scales"] == ((2,), (2,), (2,))  # no batch axis: one fixed shape
    assert step["cache_in.time_embedding.linear_1.o_hat"] == ((2, 64), (4, 64), (8, 64))


def test_plan_profiles_fp_graph_has_prime_only_and_rejects_other_symbols():
    m = make_manifest(mode="fp")
    assert set(plan_profiles(m, EngineBuildOptions(precision="fp16"))) == {"prime"}
    d = m.to_dict()
    d["inputs"][0]["shape"] = ["batch", 1, "height", 16]
    with pytest.raises(ManifestError, match="height"):  # only the batch axis may be symbolic
        Manifest.from_dict(d)


def test_plan_profiles_match_a_real_exported_graph(tmp_path, tiny_unet):
    from modiff_export.export import trace as export

    cfg = QuantConfig(mode="modiff")
    export.export_model(tiny_model(tiny_unet), cfg, tmp_path / "g", progress=False)
    m = Manifest.load(tmp_path / "g")
    p = plan_profiles(m, EngineBuildOptions())
    for role in p:  # TensorRT needs a shape range for every network input, and only for those
        model = onnx.load(str(tmp_path / "g" / m.graphs[role]), load_external_data=False)
        init = {i.name for i in model.graph.initializer}
        assert [e[0] for e in p[role]] == [i.name for i in model.graph.input if i.name not in init]


# -- builder settings ----------------------------------------------------------------------------------
def test_builder_settings_quantized_graphs_are_strongly_typed_without_precision_flags():
    s = builder_settings(make_manifest(wbits=4, abits=4), EngineBuildOptions(precision="int8"))
    assert s["strongly_typed"] and not s["fp16"] and not s["int8"]
    assert "INT8 containers" in s["explain"]
    with pytest.raises(EngineError, match="use --precision int8"):
        builder_settings(make_manifest(), EngineBuildOptions(precision="fp16"))


def test_builder_settings_fp_graph():
    s = builder_settings(make_manifest(mode="fp"), EngineBuildOptions(precision="fp16"))
    assert s["fp16"] and not s["strongly_typed"]
    with pytest.raises(EngineError, match="no Q/DQ"):
        builder_settings(make_manifest(mode="fp"), EngineBuildOptions(precision="int8"))


def test_builder_settings_int4_needs_block_quantized_weights():
    int4 = EngineBuildOptions(precision="int4")
    with pytest.raises(EngineError, match="4 bits or fewer"):
        builder_settings(make_manifest(wbits=8, opset=21), int4)
    with pytest.raises(EngineError, match="opset"):
        builder_settings(make_manifest(wbits=4, opset=17), int4)
    with pytest.raises(EngineError, match="no INT4 block-quantized weights"):
        builder_settings(make_manifest(wbits=4, opset=21), int4, block_quantized_weights=0)
    assert builder_settings(make_manifest(wbits=4, opset=21), int4)["warnings"]
    s = builder_settings(make_manifest(wbits=4, opset=21), int4, block_quantized_weights=3)
    assert s["strongly_typed"] and "MatMul/Gemm" in s["explain"] and "3 found" in s["explain"]


def test_count_block_quantized_weights(tmp_path):
    w = helper.make_tensor("w", TensorProto.INT4, [4, 8], np.zeros(32, dtype=np.int8).tolist())
    s = helper.make_tensor("s", TensorProto.FLOAT, [4, 1], [0.1] * 4)
    w8 = helper.make_tensor("w8", TensorProto.INT8, [4, 8], [0] * 32)
    s8 = helper.make_tensor("s8", TensorProto.FLOAT, [4], [0.1] * 4)
    nodes = [helper.make_node("DequantizeLinear", ["w", "s"], ["wf"], axis=1, block_size=8),
             helper.make_node("DequantizeLinear", ["w8", "s8"], ["w8f"], axis=0),
             helper.make_node("MatMul", ["x", "wf"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [w, s, w8, s8])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), str(tmp_path / "m.onnx"))
    assert count_block_quantized_weights(tmp_path / "m.onnx") == 1


# -- engine I/O check -------------------------------------------------------------------------------
def test_check_engine_io_accepts_a_matching_engine():
    m = make_manifest(buckets=2)
    for role in ("prime", "step"):
        check_engine_io(fake_io(m, role), m, role)


@pytest.mark.parametrize("change, message", [
    ({"cache_out.conv_in.o_hat": None}, "'cache_out.conv_in.o_hat' is missing from the engine"),
    ({"extra": {"mode": "output", "dtype": "float32", "shape": [-1]}}, "engine output 'extra' is not in manifest"),
    ({"sample": {"mode": "input", "dtype": "float16", "shape": [-1, 1, 16, 16]}}, "dtype float16"),
    ({"sample": {"mode": "input", "dtype": "float32", "shape": [2, 1, 16, 16]}}, "shape"),
    ({"noise_pred": {"mode": "input", "dtype": "float32", "shape": [-1, 1, 16, 16]}}, "engine input"),
])
def test_check_engine_io_rejects_mismatches(change, message):
    m = make_manifest()
    with pytest.raises(EngineError, match=message):
        check_engine_io(fake_io(m, "step", **change), m, "step")


def test_manifest_graph_io_check_reads_every_backend_dim_form():
    """One check for every backend: symbolic "batch" (ONNX, ORT), -1 (TensorRT) and None (unknown: OpenVINO)
    fit the batch axis; a fixed dimension, a dtype or a name that differs is one phrase each."""
    m = make_manifest()
    assert m.graph_io_problems("prime", [(s.name, s.dtype, None) for s in m.graph_inputs("prime")],
                               [(s.name, s.dtype, (None,) * len(s.shape)) for s in m.graph_outputs("prime")]) == []
    assert m.graph_io_problems("prime", [("sample", "float32", ("N", 1, 16, 16))] + [
        (s.name, s.dtype, s.shape) for s in m.graph_inputs("prime")[1:]], [
        (s.name, s.dtype, s.shape) for s in m.graph_outputs("prime")])[0].startswith("input 'sample' has")
    for dyn in ("batch", -1):
        ins = [(s.name, s.dtype, tuple(dyn if d == "batch" else d for d in s.shape)) for s in m.graph_inputs("step")]
        outs = [(s.name, s.dtype, tuple(dyn if d == "batch" else d for d in s.shape)) for s in m.graph_outputs("step")]
        assert m.graph_io_problems("step", ins, outs) == []
    ins[0] = ("sample", "float16", (-1, 1, 16, 15))
    problems = m.graph_io_problems("step", ins, outs[1:] + [("extra", "float32", (-1,))])
    assert problems == ["input 'sample' has dtype float16 and shape [-1, 1, 16, 15], manifest.json says float32 "
                        "['batch', 1, 16, 16]", "graph output 'extra' is not in manifest.json",
                        "manifest.json output 'noise_pred' is missing from the graph"]
    with pytest.raises(ManifestError, match=r"^g/step.onnx: step graph I/O does not match manifest.json: input "
                                            r"'sample' .*; re-export the folder$"):
        m.check_graph_io("step", ins, outs, "g/step.onnx")


# -- CLI without TensorRT ---------------------------------------------------------------------------
def _cli():
    from cli import cli

    return cli


@no_trt_only
def test_build_engine_without_tensorrt_says_so_in_one_line(tmp_path):
    from click.testing import CliRunner

    graphs = write_graph_folder(tmp_path / "graphs" / "tiny", make_manifest())
    out = tmp_path / "engines" / "tiny"
    r = CliRunner().invoke(_cli(), ["build-engine", str(graphs), "--precision", "int8", "--out", str(out), "--quiet"])
    assert r.exit_code == 1
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert len(lines) == 1 and "TensorRT is not installed" in lines[0] and 'pip install -e ".[tensorrt]"' in lines[0]
    assert not out.exists()
    assert not (tmp_path / "engines").exists() or not any((tmp_path / "engines").iterdir())  # no temp folder left
    with pytest.raises(TensorRTUnavailable):
        build_engines(graphs, EngineBuildOptions(), out)
    assert not out.exists()


def test_build_engine_bad_options_and_inputs_fail_clearly(tmp_path):
    from click.testing import CliRunner

    graphs = write_graph_folder(tmp_path / "g", make_manifest())
    def run(*a):
        return CliRunner().invoke(_cli(), ["build-engine", *map(str, a), "--out", str(tmp_path / "e")])

    r = run(graphs, "--min-batch", 4, "--max-batch", 2)
    assert r.exit_code == 1 and "min <= opt <= max" in r.output
    r = run(tmp_path / "nope")
    assert r.exit_code == 1 and "not a folder" in r.output
    r = run(graphs, "--precision", "fp16")
    assert r.exit_code == 1 and "use --precision int8" in r.output
    assert not (tmp_path / "e").exists()


# -- runner: the parts that need no GPU -------------------------------------------------------------
def write_engine_folder(folder: Path, manifest: Manifest, plans=("prime", "step")) -> Path:
    from modiff_export.engine import BuildInfo
    from modiff_export.fsutil import sha256_file

    folder.mkdir(parents=True)
    manifest.write(folder)
    for r in plans:  # placeholder bytes: only the file checks run here, nothing deserializes them
        (folder / f"{r}.plan").write_bytes(b"not an engine")
    BuildInfo(tensorrt="none", options={"min_batch": 1, "opt_batch": 2, "max_batch": 4, "cuda_graph": False},
              settings={}, profiles={}, plans={r: f"{r}.plan" for r in plans},
              digests={r: sha256_file(folder / f"{r}.plan") for r in plans}).write(folder)
    return folder


def test_trt_runner_feeds_and_static_scales(tmp_path):
    m = make_manifest(buckets=4)
    runner = TrtRunner.from_folder(write_engine_folder(tmp_path / "e", m))
    assert runner.uses_cache and runner.max_batch == 4 and not runner.is_active
    sample, t = torch.randn(2, 1, 16, 16), torch.full((2,), 600.0)
    feeds = runner.host_inputs("step", sample, t, {}, runner.delta_scales(600.0))
    assert list(feeds) == ["sample", "timestep", "delta_scales"]
    assert torch.allclose(feeds["delta_scales"], torch.tensor([2.1, 2.2]))  # bucket 2 of 4 at t=600
    assert "delta_scales" not in runner.host_inputs("prime", sample, t, {})
    with pytest.raises(Exception, match="outside the engine's profile"):
        runner.host_inputs("prime", torch.randn(5, 1, 16, 16), torch.zeros(5), {})
    with pytest.raises(Exception, match="the model takes"):  # the base class checks shapes for every backend
        runner.check_inputs(torch.randn(2, 1, 8, 8), torch.zeros(2), None)
    with pytest.raises(Exception, match="unconditional"):
        runner.check_inputs(sample, t, torch.zeros(2, 77, 32))


def test_trt_runner_missing_plan_is_a_clear_error(tmp_path):
    with pytest.raises(EngineError, match="step engine is missing"):
        TrtRunner.from_folder(write_engine_folder(tmp_path / "e", make_manifest(), plans=("prime",)))


@no_trt_only
def test_trt_runner_activate_without_tensorrt(tmp_path):
    runner = TrtRunner.from_folder(write_engine_folder(tmp_path / "e", make_manifest()))
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed"):
        runner.activate()
    assert not runner.is_active


# -- real TensorRT (GPU machines) --------------------------------------------------------------------
def _ort_prime_step(folder: Path, m: Manifest, sample, timesteps):
    import onnxruntime as ort

    sess = {r: ort.InferenceSession(str(folder / m.graphs[r]), providers=["CPUExecutionProvider"]) for r in ("prime",
                                                                                                             "step")}
    outs = sess["prime"].run(None, {"sample": sample.numpy(), "timestep": timesteps[0].numpy()})
    caches = dict(zip([c.input for c in m.caches], outs[1:]))
    results = [outs[0]]
    for t in timesteps[1:]:
        outs = sess["step"].run(None, {"sample": sample.numpy(), "timestep": t.numpy(), **caches})
        caches = dict(zip([c.input for c in m.caches], outs[1:]))
        results.append(outs[0])
    return [torch.from_numpy(r) for r in results]


@needs_trt
@pytest.mark.slow
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_trt_engine_matches_onnxruntime_and_pytorch(tmp_path, make_tiny_unet, cuda_graph):
    from modiff_export.backends.torch_runner import TorchRunner
    from modiff_export.export.trace import export_model
    from modiff_export.quant.quantization import quantize

    cfg = QuantConfig(mode="modiff", weight_bits=8, act_bits=8)
    m = export_model(tiny_model(make_tiny_unet()), cfg, tmp_path / "g", progress=False)
    out = build_engines(tmp_path / "g", EngineBuildOptions(min_batch=1, opt_batch=2, max_batch=4,
                                                           cuda_graph=cuda_graph),
                        tmp_path / "e", progress=False)
    assert {p.name for p in out.iterdir()} >= {"prime.plan", "step.plan", "timing.cache", "build.log", "build.json",
                                               "manifest.json"}
    torch.manual_seed(1)
    sample, timesteps = torch.randn(2, 1, 16, 16), [torch.full((2,), t) for t in (900.0, 850.0, 800.0, 750.0)]
    ref = TorchRunner(quantize(make_tiny_unet(), cfg))
    onnx_out = _ort_prime_step(tmp_path / "g", m, sample, timesteps)
    with TrtRunner.from_folder(out) as trt_runner:
        for i, t in enumerate(timesteps):
            got, want = trt_runner(sample, t), ref(sample, t)
            scale = want.abs().max().item()
            assert (got - want).abs().max().item() <= 0.05 * scale, f"call {i}: TensorRT vs PyTorch"
            assert (got - onnx_out[i]).abs().max().item() <= 0.05 * scale, f"call {i}: TensorRT vs ONNX Runtime"
        assert set(trt_runner.caches()) == set(ref.caches())
        assert trt_runner.cuda_graph_active == cuda_graph
        trt_runner.reset(), ref.reset()  # a new trajectory primes again
        got, want = trt_runner(sample, timesteps[0]), ref(sample, timesteps[0])
        assert trt_runner.calls == 1 and (got - want).abs().max().item() <= 0.05 * want.abs().max().item()
