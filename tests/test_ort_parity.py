"""ONNX Runtime vs the PyTorch reference: the exported graphs compute what quantization.py computes.

Tolerances, and why:
* prime step (and the caches it returns): full-precision activations, the same int8 weights, so the
  two runtimes differ only by float32 summation order: 1e-4 relative to the output's scale.
* step calls: the delta d = x - a_hat is small, so a 1-ulp difference upstream (ORT and PyTorch use
  different GroupNorm/attention kernels) moves d / s by up to ~1e-3 code units, and a value sitting
  near a rounding boundary lands on the neighbouring code. One flipped code is a legitimate result
  of quantization, not a bug, and flips cascade to later layers. The yardstick is therefore the
  quantization error itself: per step, rms(ort - torch) <= 1.5 x rms(torch - fp). Two equally
  valid roundings of the same quantity differ by at most ~sqrt(2) x the rounding error; we measured
  ratios of 0.0-1.1 on these models. A wrong scale, missing bias, wrong cache wiring or a dropped
  compensation term gives ratios of 5-1000 (the test below breaks the graph to show it).
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from conftest import build_tiny_cond_unet, build_tiny_unet, tiny_model

from modiff_export import QuantConfig, quantize
from modiff_export.backends.ort_runner import OrtRunner
from modiff_export.backends.torch_runner import TorchRunner
from modiff_export.export.trace import export_model
from modiff_export.manifest import Manifest, ManifestError
from modiff_export.sampling import make_scheduler

STEPS = 8


def rms(t: torch.Tensor) -> float:
    return t.double().pow(2).mean().sqrt().item()



def _case(kind: str):
    if kind == "uncond":
        unet = build_tiny_unet()
        return unet, tiny_model(unet), None
    ehs = torch.randn(4, 77, 32, generator=torch.Generator().manual_seed(7))  # [2B: cond + uncond, S, D]
    ehs[2:] = 0.0
    unet = build_tiny_cond_unet()
    return unet, tiny_model(unet, "tiny-cond"), ehs


def _fp_trajectory(unet, info, ehs, scheduler: str):
    """Inputs (sample, t) and FP noise predictions of a CFG-style trajectory, batch 4."""
    fp = TorchRunner(quantize(copy.deepcopy(unet), QuantConfig(mode="fp")))
    sched = make_scheduler(scheduler, {"num_train_timesteps": 1000})
    sched.set_timesteps(STEPS)
    x = torch.randn(4, *info.sample_shape, generator=torch.Generator().manual_seed(0))
    inputs, preds = [], []
    for t in sched.timesteps:
        inputs.append((sched.scale_model_input(x, t).clone(), t))
        eps = fp(inputs[-1][0], t, ehs)
        preds.append(eps)
        x = sched.step(eps, t, x).prev_sample
    return inputs, preds


@pytest.mark.parametrize("kind", ["uncond", "cond"])
@pytest.mark.parametrize("act_bits", [8, 4])
@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp"])
def test_per_step_parity(tmp_path, kind, act_bits, scheduler):
    unet, info, ehs = _case(kind)
    cfg = QuantConfig(act_bits=act_bits)
    export_model(info.copy(), cfg, tmp_path / "g", progress=False)
    ref = TorchRunner(quantize(copy.deepcopy(unet), cfg))
    ort = OrtRunner(tmp_path / "g")
    inputs, fp_preds = _fp_trajectory(unet, info, ehs, scheduler)
    ratios = []
    for i, ((x, t), fp) in enumerate(zip(inputs, fp_preds)):
        a, b = ref(x, t, ehs), ort(x, t, ehs)
        assert a.shape == b.shape == fp.shape
        if i == 0:  # prime: float32 summation order only
            assert (a - b).abs().max() <= 1e-4 * a.abs().max(), "prime outputs differ"
            ca, cb = ref.caches(), ort.caches()
            assert ca.keys() == cb.keys() and len(ca) > 0
            for k in ca:
                assert (ca[k] - cb[k]).abs().max() <= 1e-4 * max(ca[k].abs().max().item(), 1e-6), f"prime cache {k}"
            continue
        ratio = rms(a - b) / max(rms(a - fp), 1e-12)
        ratios.append(ratio)
        assert ratio <= 1.5, f"step {i}: rms(ort - torch) = {ratio:.2f} x quantization error; all: {ratios}"
    # the runner's caches keep the manifest's shapes and stay finite across the trajectory
    ca, cb = ref.caches(), ort.caches()
    assert {k: v.shape for k, v in ca.items()} == {k: v.shape for k, v in cb.items()}
    assert all(torch.isfinite(v).all() for v in cb.values())


def test_broken_graph_fails_parity(tmp_path):
    """The yardstick catches a real bug: scale one rescaling Mul after a quantized Conv by 1.01."""
    unet, info, ehs = _case("uncond")
    cfg = QuantConfig(act_bits=8)
    export_model(info.copy(), cfg, tmp_path / "g", progress=False)
    path = tmp_path / "g" / "step.onnx"
    model = onnx.load(str(path))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    mul = next(n for n in model.graph.node if n.op_type == "Mul" and conv.output[0] in n.input)
    k = onnx.numpy_helper.from_array(np.array(1.01, np.float32), "broken_k")
    model.graph.initializer.append(k)
    tail = onnx.helper.make_node("Mul", [mul.output[0] + "_pre", "broken_k"], [mul.output[0]])
    mul.output[0] = mul.output[0] + "_pre"
    model.graph.node.insert(list(model.graph.node).index(mul) + 1, tail)
    onnx.save(model, str(path))
    with pytest.raises(ManifestError, match="does not belong to this manifest"):
        OrtRunner(tmp_path / "g")  # the edited graph no longer has the digest recorded at export
    # an exporter bug would write the wrong graph *and* its digest: re-record it, parity must catch it
    Manifest.load(tmp_path / "g", verify=False).with_digests(tmp_path / "g").write(tmp_path / "g")
    ref, ort = TorchRunner(quantize(copy.deepcopy(unet), cfg)), OrtRunner(tmp_path / "g")
    inputs, fp_preds = _fp_trajectory(unet, info, ehs, "ddim")
    worst = 0.0
    for i, ((x, t), fp) in enumerate(zip(inputs, fp_preds)):
        a, b = ref(x, t, ehs), ort(x, t, ehs)
        if i:
            worst = max(worst, rms(a - b) / max(rms(a - fp), 1e-12))
    assert worst > 1.5, f"a 1% scale error went unnoticed (ratio {worst:.2f})"


def test_keyframes_and_fp16_caches(tmp_path):
    """keyframe_interval re-primes in both runtimes; fp16 cache I/O stays close to fp32 caches."""
    unet, info, ehs = _case("uncond")
    cfg = QuantConfig(act_bits=8, keyframe_interval=3)
    export_model(info.copy(), cfg, tmp_path / "k", progress=False)
    export_model(info.copy(), cfg, tmp_path / "h", cache_dtype="float16", progress=False)
    ref = TorchRunner(quantize(copy.deepcopy(unet), cfg))
    ort, half = OrtRunner(tmp_path / "k"), OrtRunner(tmp_path / "h")
    inputs, fp_preds = _fp_trajectory(unet, info, ehs, "ddim")
    for i, ((x, t), fp) in enumerate(zip(inputs, fp_preds)):
        a, b, h = ref(x, t), ort(x, t), half(x, t)
        if i % 3 == 0:  # keyframe: full precision in all three -> float tolerance
            assert (a - b).abs().max() <= 1e-4 * a.abs().max()
            assert (a - fp).abs().max() <= 0.05 * fp.abs().max(), "keyframe did not re-prime"
        else:  # fp16 caches add ~1e-3 relative rounding: the error to FP stays that of fp32 caches
            assert rms(h - fp) <= 1.5 * rms(b - fp) + 1e-3 * rms(fp), f"fp16 caches diverged at call {i}"
