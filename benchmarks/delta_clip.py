"""Delta clip, a benchmark-only ablation (docs/quality.md: PSNR up, FD worse on DPM-Solver++; not in the recipe).

A MoDiff step quantizes d = x - a_hat with s = absmax(d) / qmax per sample. Per layer we collect
u = d / absmax(d) (per sample, in [-1, 1]) and pick the constant r from a grid that minimizes the
quantization MSE of u at the layer's act bits with scale r / qmax; the layer's `delta_clip` multiplies
its dynamic scale by r (the exported graph gets one constant Mul after the absmax).

    ratios = calibrate_delta_clip(model, config)       # {layer: r}
    apply_delta_clip(unet, ratios)
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from modiff_export.backends import make_runner
from modiff_export.calibration.hessians import CALIB_SEED
from modiff_export.quant.quantization import modiff_layers, qmax_for, quantize, quantize_codes
from modiff_export.sampling import Trajectories, run_batches

CLIP_GRID = torch.linspace(0.2, 1.0, 41)   # delta clip ratios searched


@torch.no_grad()
def calibrate_delta_clip(model, config, steps: int = 25, samples: int = 32, per_call: int = 4096,
                         seed: int = CALIB_SEED) -> dict[str, float]:
    """{layer: clip ratio} minimizing the MSE of each layer's per-sample-normalized delta at its act bits."""
    unet = quantize(copy.deepcopy(model.unet), config)
    gen = torch.Generator().manual_seed(seed)
    seen: dict[str, list[torch.Tensor]] = {}

    def observer(layer, t):  # t: the delta about to be quantized, [B, ...]
        amax = t.abs().flatten(1).amax(1).clamp_min(1e-12)              # [B]
        u = (t.flatten(1) / amax[:, None]).reshape(-1)                    # in [-1, 1]
        idx = torch.randint(0, u.numel(), (min(per_call, u.numel()),), generator=gen)
        seen.setdefault(layer.name, []).append(u[idx])

    layers = [layer for layer in modiff_layers(unet) if layer.uses_cache]
    for layer in layers:
        layer.observer = observer
    run_batches(make_runner("torch", unet), model, Trajectories("ddim", steps, samples, samples, seed), progress=False)
    ratios = {}
    for layer in layers:
        u = torch.cat(seen[layer.name])                                   # [n]
        q = qmax_for(layer.act_bits)
        errs = [float((quantize_codes(u, r / q, layer.act_bits) * (r / q) - u).pow(2).mean()) for r in CLIP_GRID]
        ratios[layer.name] = float(CLIP_GRID[min(range(len(errs)), key=errs.__getitem__)])
    return ratios


def apply_delta_clip(unet: nn.Module, ratios: dict[str, float]) -> None:
    for layer in modiff_layers(unet):
        if layer.name in ratios:
            layer.delta_clip = float(ratios[layer.name])
