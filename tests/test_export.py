"""Export: graph form, manifest, TensorRT-readiness check, bad input, whole-trajectory parity."""
from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import build_tiny_unet, tiny_model

from cli import cli
from modiff_export import QuantConfig, list_caches, quantize
from modiff_export.backends.ort_runner import OrtRunner
from modiff_export.backends.torch_runner import TorchRunner
from modiff_export.errors import ModiffExportError
from modiff_export.export.check import check_folder
from modiff_export.export.trace import export_model
from modiff_export.fsutil import OutputError
from modiff_export.manifest import Manifest, ManifestError


@pytest.fixture(scope="module")
def w8a4(tmp_path_factory):
    out = tmp_path_factory.mktemp("g") / "w8a4"
    export_model(tiny_model(build_tiny_unet()), QuantConfig(act_bits=4), out, progress=False)
    return out


def test_graph_form_and_manifest(w8a4):
    m = Manifest.load(w8a4)
    ref = quantize(build_tiny_unet(), QuantConfig(act_bits=4))
    with torch.no_grad():
        ref(torch.randn(2, 1, 16, 16), 10)
    entries = list_caches(ref)
    # every cache of the reference, in its order, with a symbolic batch axis
    assert [(c.layer, c.kind) for c in m.caches] == [(e.layer, e.kind) for e in entries]
    assert all(c.shape == ("batch", *e.shape[1:]) for c, e in zip(m.caches, entries))
    step = onnx.load(str(w8a4 / "step.onnx"))
    ops = [n.op_type for n in step.graph.node]
    # unit-scale activation Q/DQ per layer, Clip for 4 bits, and int8 weights behind DequantizeLinear
    assert ops.count("QuantizeLinear") == len(m.caches) // 2
    int8 = [t for t in step.graph.initializer if t.data_type == onnx.TensorProto.INT8 and t.name.endswith(".int8")]
    assert len(int8) == len(m.caches) // 2
    for t in step.graph.initializer:
        small_or_fp = np.prod(t.dims) < 1024 or "bias" in t.name or "norm" in t.name
        assert t.data_type != onnx.TensorProto.FLOAT or small_or_fp, \
            f"a large float initializer {t.name} survived: weights must be int8"
    # no same-type Casts around the float32 cache I/O (each would be a wasted copy per cache per step)
    cache_names = {c.input for c in m.caches} | {c.output for c in m.caches}
    assert not [n.name for n in step.graph.node if n.op_type == "Cast" and (set(n.input) | set(n.output)) & cache_names]
    assert [i.name for i in step.graph.input][:2] == ["sample", "timestep"]
    assert step.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert m.quant_config.act_bits == 4 and m.model.name == "tiny"
    assert m.model.content_hash == tiny_model(build_tiny_unet()).content_hash
    assert set(m.files) == {"prime.onnx", "step.onnx"} and all(d.startswith("sha256:") for d in m.files.values())
    assert check_folder(w8a4).ok, check_folder(w8a4).problems


def test_fp_and_ptq_export_one_graph(tmp_path):
    for mode in ("fp", "ptq"):
        m = export_model(tiny_model(build_tiny_unet()), QuantConfig(mode=mode), tmp_path / mode, progress=False)
        assert m.graphs == {"prime": "prime.onnx", "step": None, "shallow": None} and m.caches == ()
        report = check_folder(tmp_path / mode)
        assert report.ok, report.problems
        if mode == "ptq":  # ptq quantizes activations: every weighted Conv/MatMul reads a DQ activation
            assert report.stats["prime"]["quantized_linear"] > 0


def test_check_names_offending_nodes(w8a4, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(w8a4, bad)
    model = onnx.load(str(bad / "step.onnx"))
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    # a computed scale: Q's scale now comes from a Mul node instead of a constant
    model.graph.node.insert(0, onnx.helper.make_node("Mul", ["timestep", "timestep"], ["computed_scale"],
                                                     name="make_scale"))
    q.input[1] = "computed_scale"
    onnx.save(model, str(bad / "step.onnx"))
    report = check_folder(bad)
    assert not report.ok
    assert any(q.name in p and "scale is computed" in p for p in report.problems), report.problems
    result = CliRunner().invoke(cli, ["check", str(bad)])
    assert result.exit_code != 0 and q.name in result.output


def test_check_catches_io_mismatch_and_unsupported_op(w8a4, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(w8a4, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["caches"][0]["shape"][1] += 1  # manifest now disagrees with the graph
    (bad / "manifest.json").write_text(json.dumps(m))
    model = onnx.load(str(bad / "prime.onnx"))
    node = next(n for n in model.graph.node if n.op_type == "Sigmoid")
    node.op_type = "HardSwish"  # valid ONNX, not in the ONNX-TensorRT support list
    onnx.save(model, str(bad / "prime.onnx"))
    problems = check_folder(bad).problems
    assert any("HardSwish" in p for p in problems)
    assert any(m["caches"][0]["output"] in p and "manifest.json says" in p for p in problems)


def test_bad_inputs_give_clear_errors(w8a4, tmp_path):
    # missing manifest
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ManifestError, match="manifest.json: missing"):
        OrtRunner(empty)
    # damaged manifest
    broken = tmp_path / "broken"
    shutil.copytree(w8a4, broken)
    (broken / "manifest.json").write_text('{"schema": ')
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(broken)
    # manifest from another graph: a cache name the graph does not have
    other = tmp_path / "other"
    shutil.copytree(w8a4, other)
    m = json.loads((other / "manifest.json").read_text())
    m["caches"][0]["input"] = "cache_in.nonexistent"
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModiffExportError, match="does not match manifest.json"):
        OrtRunner(other).activate()
    # wrong batch without reset, NaN input
    runner = OrtRunner(w8a4)
    runner.prime(torch.randn(2, 1, 16, 16), 500)
    with pytest.raises(ModiffExportError, match="batch 3 does not match the cached batch 2"):
        runner.step(torch.randn(3, 1, 16, 16), 480)
    x = torch.randn(2, 1, 16, 16)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ModiffExportError, match="'sample' contains NaN"):
        runner.step(x, 480)
    with pytest.raises(ModiffExportError, match="must be a \\[B, C, H, W\\]"):
        runner.step(torch.randn(2, 16, 16), 480)


def test_cli_export_refuses_non_unet_folder(tmp_path):
    folder = tmp_path / "not_a_unet"
    folder.mkdir()
    (folder / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    result = CliRunner().invoke(cli, ["export", "--model", str(folder), "--out", str(tmp_path / "g")])
    assert result.exit_code == 1
    assert "AutoencoderKL" in result.output and str(folder) in result.output
    assert not (tmp_path / "g").exists()


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    import modiff_export.export.trace as ex

    calls = {"n": 0}
    real = ex._trace

    def dies_on_step_graph(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ex, "_trace", dies_on_step_graph)
    with pytest.raises(KeyboardInterrupt):
        export_model(tiny_model(build_tiny_unet()), QuantConfig(), tmp_path / "g", progress=False)
    assert list(tmp_path.iterdir()) == [], f"left behind: {list(tmp_path.iterdir())}"


def test_existing_folder_needs_overwrite(w8a4):
    with pytest.raises(OutputError, match="already exists"):
        export_model(tiny_model(build_tiny_unet()), QuantConfig(), w8a4, progress=False)


@pytest.mark.parametrize("act_bits,min_psnr", [(8, 40.0), (4, 30.0)])
def test_digits_trajectory_parity(tmp_path, act_bits, min_psnr):
    """Whole trajectories on the trained digits model: ORT vs PyTorch images from the same noise.

    The aims from the issue: >= 40 dB at W8A8 and >= 30 dB at W8A4 (measured 62-69 dB and
    43-44 dB over 25 DDIM/DPM-Solver++ steps, batch 16). A trained denoiser contracts small
    differences (unlike a random UNet, where even FP vs W8A8 is chaotic), so code flips between
    runtimes stay at the level of single roundings.
    """
    from modiff_export.evaluation.metrics import psnr
    from modiff_export.models import load_model
    from modiff_export.sampling import generate, make_scheduler

    m = load_model("digits")
    cfg = QuantConfig(act_bits=act_bits)
    export_model(m.copy(), cfg, tmp_path / "g", progress=False)
    runners = TorchRunner(quantize(copy.deepcopy(m.unet), cfg)), OrtRunner(tmp_path / "g")
    imgs = [generate(r, make_scheduler("ddim", m.scheduler_config), 10, 4, 0, m.sample_shape, progress=False)
            for r in runners]
    value = psnr(imgs[0], imgs[1])
    assert value >= min_psnr, f"ORT vs PyTorch trajectory PSNR {value:.1f} dB < {min_psnr} dB at W8A{act_bits}"
