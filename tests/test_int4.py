"""INT4 block-quantized Linear weights (QuantConfig.weight_block_size, opset 21): config, reference
quantization, graph form (INT4 initializer + DequantizeLinear(block_size) feeding MatMul/Gemm, convs
still int8), the TensorRT-readiness check, `build-engine --precision int4` settings, and PyTorch vs
ONNX Runtime parity with the yardstick of test_ort_parity.py."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import onnx.reference
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner
from conftest import build_tiny_unet, tiny_model
from onnx import TensorProto, helper, numpy_helper

from cli import cli
from modiff_export import QuantConfig, quantize
from modiff_export.backends.ort_runner import OrtRunner
from modiff_export.backends.torch_runner import TorchRunner
from modiff_export.config import ConfigError
from modiff_export.engine import EngineBuildOptions, builder_settings, count_block_quantized_weights
from modiff_export.export.check import check_folder
from modiff_export.export.passes import quantize_weight_constants, remove_unused
from modiff_export.export.trace import ExportError, _layer_entry, export_model
from modiff_export.manifest import Manifest
from modiff_export.quant.quantization import MoDiffLayer, weight_scale
from modiff_export.sampling import make_scheduler

BS = 16
TINY_SHAPE = (1, 16, 16)  # build_tiny_unet: 1 channel, 16x16
STEPS = 6


def rms(t: torch.Tensor) -> float:
    return t.double().pow(2).mean().sqrt().item()


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- config ---------------------------------------------------------------------------------------
def test_config_validation_and_round_trip():
    for bs in (2, 16, 32, 64, 128):
        c = QuantConfig(weight_bits=4, weight_block_size=bs)
        assert QuantConfig.from_dict(c.to_dict()) == c and c.to_dict()["weight_block_size"] == bs
    assert QuantConfig().weight_block_size is None
    old = {k: v for k, v in QuantConfig(weight_bits=4).to_dict().items() if k != "weight_block_size"}
    assert QuantConfig.from_dict(old).weight_block_size is None  # manifests written before the field
    for bad in (0, -16, 15, 1, True, 16.0, "16"):
        with pytest.raises(ConfigError, match="weight_block_size.*multiple of 2"):
            QuantConfig(weight_bits=4, weight_block_size=bad)
    for bits in (5, 8):
        with pytest.raises(ConfigError, match="weight_block_size=16 needs weight_bits <= 4"):
            QuantConfig(weight_bits=bits, weight_block_size=16)


# -- reference quantization -----------------------------------------------------------------------
def _outlier_linear(cin=64, cout=8) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(cin, cout)
    with torch.no_grad():
        lin.weight[:, 16:32] *= 40.0  # one outlier block per row
    return lin


def test_block_quantization_reference():
    cfg = QuantConfig(weight_bits=4, weight_block_size=BS)
    lin = _outlier_linear()
    w = lin.weight.detach()
    layer = MoDiffLayer(lin, "lin", cfg)
    assert layer.block_size == BS and layer.weight_format == "int4-block16" and layer.weight_note is None
    blocks = w.reshape(8, 4, BS)
    assert layer.w_scale.shape == (8, 4)
    torch.testing.assert_close(layer.w_scale, blocks.abs().amax(2) / 7)
    codes = layer.weight_codes()
    assert torch.equal(codes, codes.round()) and codes.min() >= -8 and codes.max() <= 7
    # each block's absmax maps to qmax (7)
    assert torch.equal(codes.reshape(8, 4, BS).abs().amax(2), torch.full((8, 4), 7.0))
    wq = layer.quantized_weight()
    torch.testing.assert_close(wq, codes * layer.w_scale.repeat_interleave(BS, 1))
    # per-block scales differ from per channel; the outlier block no longer swamps the other blocks
    per_channel = weight_scale(w, 4)
    assert (layer.w_scale[:, 0] < per_channel / 10).all()
    torch.testing.assert_close(layer.w_scale[:, 1], per_channel)  # the outlier block sets the channel's absmax
    pc = MoDiffLayer(_outlier_linear(), "lin", QuantConfig(weight_bits=4))
    assert pc.w_scale.shape == (8,) and pc.weight_format == "int8-per-channel"
    err_block = (wq - w)[:, :16].abs().max()
    err_pc = (pc.quantized_weight() - w)[:, :16].abs().max()
    assert err_block < err_pc / 5
    # per-channel clip ratios apply to every block of their output channel
    clip = torch.linspace(0.5, 1.0, 8)
    layer.set_weight_clip(clip)
    torch.testing.assert_close(layer.w_scale, blocks.abs().amax(2) * clip[:, None] / 7)
    assert layer.weight_codes().min() >= -8 and layer.weight_codes().max() <= 7


def test_block_size_applies_only_to_eligible_linears():
    cfg = QuantConfig(weight_bits=4, weight_block_size=BS, int8_layers=("keep",), skip_layers=("skip",))
    conv = MoDiffLayer(nn.Conv2d(32, 8, 3), "conv", cfg)
    assert conv.block_size is None and conv.w_scale.shape == (8,) and conv.weight_format == "int8-per-channel"
    odd = MoDiffLayer(nn.Linear(24, 8), "odd", cfg)  # 24 is not a multiple of 16
    assert odd.block_size is None and odd.w_scale.shape == (8,) and "not a multiple" in odd.weight_note
    entry = _layer_entry(odd)  # the manifest says so
    assert entry["weight_format"] == "int8-per-channel"
    assert "not a multiple of weight_block_size 16" in entry["weight_note"]
    assert _layer_entry(MoDiffLayer(nn.Linear(32, 8), "ok", cfg))["weight_note"] is None
    assert MoDiffLayer(nn.Linear(32, 8), "keep", cfg).block_size is None  # int8 override: 8-bit weights
    assert MoDiffLayer(nn.Linear(32, 8), "skip", cfg).block_size is None
    assert MoDiffLayer(nn.Linear(32, 8), "ok", cfg).w_scale.shape == (8, 2)


# -- graph pass on hand-made MatMul and Gemm(transB) graphs ------------------------------------------
@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
def test_graph_pass_emits_int4_block_dequantize(op):
    layer = MoDiffLayer(_outlier_linear(), "lin", QuantConfig(weight_bits=4, weight_block_size=BS))
    wq, scale = layer.quantized_weight().detach().numpy(), layer.w_scale.numpy()  # [8, 64], [8, 4]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])
    if op == "MatMul":  # a traced Linear: MatMul(x, Wq^T [Cin, Cout])
        init = [numpy_helper.from_array(np.ascontiguousarray(wq.T), "w")]
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
    else:  # Gemm(x, Wq [Cout, Cin], transB=1)
        init = [numpy_helper.from_array(wq, "w")]
        node = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
    model = helper.make_model(helper.make_graph([node], "g", [x], [y], init), opset_imports=[helper.make_opsetid("",
                                                                                                                 21)])
    assert quantize_weight_constants(model, [("lin", wq, scale, BS)]) == 1
    remove_unused(model)
    inits = {t.name: t for t in model.graph.initializer}
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    attrs = {a.name: a.i for a in dq.attribute}
    assert inits[dq.input[0]].data_type == TensorProto.INT4 and inits[dq.input[2]].data_type == TensorProto.INT4
    if op == "MatMul":
        assert attrs == {"axis": 0, "block_size": BS} and list(inits[dq.input[1]].dims) == [4, 8]
    else:
        assert attrs == {"axis": 1, "block_size": BS} and list(inits[dq.input[1]].dims) == [8, 4]
    onnx.checker.check_model(model, full_check=True)
    opts = ort.SessionOptions()  # as OrtRunner: ORT fuses DQ(int4, block) + MatMul into MatMulNBits, whose
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # default quantizes activations
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    xs = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    got = sess.run(None, {"x": xs})[0]
    want = xs.astype(np.float64) @ wq.T.astype(np.float64)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    # the stored weight is Wq exactly (int4 codes * block scale)
    ref = onnx.reference.ReferenceEvaluator(model)
    np.testing.assert_allclose(ref.run(None, {"x": xs})[0], got, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# -- exported tiny UNet -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = {}
    for a in (8, 4):
        folder = tmp_path_factory.mktemp("int4") / f"w4a{a}"
        export_model(tiny_model(build_tiny_unet()), QuantConfig(weight_bits=4, act_bits=a, weight_block_size=BS),
                     folder,
                     opset=21, progress=False)
        out[a] = folder
    return out


@pytest.mark.parametrize("act_bits", [8, 4])
def test_graph_form_check_and_int4_engine_settings(exported, act_bits):
    folder = exported[act_bits]
    m = Manifest.load(folder)
    assert m.opset == 21 and m.quant_config.weight_block_size == BS
    fmt = {layer.name: (layer.kind, layer.weight_format) for layer in m.layers}
    assert {f for k, f in fmt.values() if k == "linear"} == {"int4-block16"}
    assert {f for k, f in fmt.values() if k == "conv"} == {"int8-per-channel"}
    ref = quantize(build_tiny_unet(), QuantConfig(weight_bits=4, act_bits=act_bits, weight_block_size=BS))
    w_scale = {l.name: l.w_scale.numpy() for l in ref.modules() if isinstance(l, MoDiffLayer)}
    for role in ("prime", "step"):
        g = onnx.load(str(folder / f"{role}.onnx"))
        inits = {t.name: t for t in g.graph.initializer}
        made_by = {o: n for n in g.graph.node for o in n.output}
        seen = {"int4": set(), "int8": set()}
        for node in g.graph.node:
            dq = made_by.get(node.input[1]) if node.op_type in ("Conv", "MatMul", "Gemm") else None
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
                continue
            attrs = {a.name: a.i for a in dq.attribute}
            layer = dq.input[0].rsplit(".weight.", 1)[0]
            if node.op_type == "Conv":
                assert inits[dq.input[0]].data_type == TensorProto.INT8 and "block_size" not in attrs
                seen["int8"].add(layer)
            else:
                assert inits[dq.input[0]].data_type == TensorProto.INT4, f"{role}: {layer} weight is not INT4"
                assert attrs["block_size"] == BS
                scale = numpy_helper.to_array(inits[dq.input[1]])
                want = w_scale[layer].T if node.op_type == "MatMul" else w_scale[layer]
                assert attrs["axis"] == (0 if node.op_type == "MatMul" else 1)
                np.testing.assert_array_equal(scale, want)
                seen["int4"].add(layer)
        assert seen["int4"] == {n for n, (k, _) in fmt.items() if k == "linear"}, role
        assert seen["int8"] == {n for n, (k, _) in fmt.items() if k == "conv"}, role
    report = check_folder(folder)
    assert report.ok, report.problems
    blocks = sum(count_block_quantized_weights(folder / m.graphs[r]) for r in ("prime", "step"))
    assert blocks == 2 * len(seen["int4"])
    s = builder_settings(m, EngineBuildOptions(precision="int4"), blocks)
    assert s["strongly_typed"] and not s["warnings"] and f"({blocks} found)" in s["explain"]


def test_export_needs_opset_21(tmp_path):
    with pytest.raises(ExportError, match="needs opset >= 21"):
        export_model(tiny_model(build_tiny_unet()), QuantConfig(weight_bits=4, weight_block_size=BS), tmp_path / "g",
                     opset=17, progress=False)
    assert not (tmp_path / "g").exists()
    r = CliRunner().invoke(cli, ["export", "--weight-bits", "8", "--weight-block-size", "16", "--opset", "21",
                                 "--out", str(tmp_path / "c")])
    assert r.exit_code == 1 and "weight_block_size=16 needs weight_bits <= 4" in r.output
    assert "--weight-block-size" in CliRunner().invoke(cli, ["export", "--help"]).output


# -- PyTorch vs ONNX Runtime ------------------------------------------------------------------------
@pytest.mark.parametrize("act_bits", [8, 4])
def test_pytorch_ort_parity(exported, act_bits):
    unet = build_tiny_unet()
    cfg = QuantConfig(weight_bits=4, act_bits=act_bits, weight_block_size=BS)
    fp = TorchRunner(quantize(copy.deepcopy(unet), QuantConfig(mode="fp")))
    ref = TorchRunner(quantize(copy.deepcopy(unet), cfg))
    runner = OrtRunner(exported[act_bits])
    sched = make_scheduler("ddim", {"num_train_timesteps": 1000})
    sched.set_timesteps(STEPS)
    x = torch.randn(4, *TINY_SHAPE, generator=torch.Generator().manual_seed(0))
    ratios = []
    for i, t in enumerate(sched.timesteps):
        xin = sched.scale_model_input(x, t)
        e_fp, a, b = fp(xin, t), ref(xin, t), runner(xin, t)
        if i == 0:  # prime: float32 summation order only
            assert (a - b).abs().max() <= 1e-4 * a.abs().max(), "prime outputs differ"
        else:
            ratios.append(rms(a - b) / max(rms(a - e_fp), 1e-12))
            assert ratios[-1] <= 1.5, f"step {i}: rms(ort - torch) = {ratios[-1]:.2f} x quantization error; {ratios}"
        x = sched.step(e_fp, t, x).prev_sample
    print(f"W4A{act_bits} block {BS}: step ratios {[float(f'{r:.3g}') for r in ratios]}")
