"""GPTQ's Hessians over full-precision trajectories, and the GPTQ-rounded weights calibration stores
(docs/design.md section 2). The column algorithm itself is quant/gptq.py.

    rounded = gptq_round(model, config, names, Trajectories(steps=25, ...))   # {layer: (codes, scale)}
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..backends import make_runner
from ..config import QuantConfig
from ..errors import ModiffExportError
from ..quant.gptq import apply_gptq, gptq_supported, hessian_bytes, input_rows
from ..quant.quantization import modiff_layers, quantize
from ..quant.search import weight_clip_ratios
from ..sampling import Trajectories, run_batches

CALIB_SEED = 100_000  # calibration noise: batch seeds far from evaluation seeds
HESSIAN_TRAJECTORIES = Trajectories("auto", steps=20, samples=16, batch_size=16, seed=CALIB_SEED)


class HessianBudgetError(ModiffExportError):
    """The GPTQ Hessians of the requested layers would not fit in memory."""


def _hessian_groups(unet: nn.Module, names: list[str], budget: int | None = None) -> list[list[str]]:
    """`names` split into groups whose Hessians (hessian_bytes) each fit in `budget` (default: a third of
    the free memory), so a large UNet gets several passes of trajectories instead of an out-of-memory."""
    import psutil

    budget = budget or psutil.virtual_memory().available // 3
    groups, size = [[]], 0
    for name in names:
        b = hessian_bytes(unet, {name})
        if b > budget:
            raise HessianBudgetError(f"layer {name}: its GPTQ Hessian needs {b / 2**30:.1f} GiB, over a third of "
                                     f"the free memory; calibrate with --recipe paper (nearest rounding)")
        if size + b > budget and groups[-1]:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += b
    return [g for g in groups if g]


@torch.no_grad()
def collect_hessians(model, traj: Trajectories = HESSIAN_TRAJECTORIES, max_rows: int = 1024,
                     names: set[str] | None = None, progress: bool = False) -> dict[str, torch.Tensor]:
    """{layer: H = mean(x x^T)} [N, N] of each Conv2d/Linear input (only `names`, if given) over
    full-precision trajectories `traj` (sampling.run_batches: conditional models get their
    encoder states as in sampling). Refuses, before any work, Hessians over half the free RAM.

    Each UNet call adds X^T X of at most `max_rows` random rows (pixels x samples) per layer, so the
    GEMM stays cheaper than the UNet call; over calibrate's default 100 calls that is ~100k rows, far
    more than any layer's N."""
    import psutil

    need, free = hessian_bytes(model.unet, names), psutil.virtual_memory().available
    if need > free // 2:
        raise HessianBudgetError(f"GPTQ Hessians need {need / 2**30:.1f} GiB, over half the free memory "
                                 f"({free / 2**30:.1f} GiB); calibrate with --recipe paper (nearest rounding)")
    unet = copy.deepcopy(model.unet)
    sums: dict[str, list] = {}
    gen = torch.Generator().manual_seed(traj.seed + 1)
    hooks = []

    def hook(name):
        def fn(module, inputs):
            cols = input_rows(module, inputs[0].float(), max_rows, gen)  # [n <= max_rows, N]
            acc = sums.setdefault(name, [0.0, 0])
            acc[0] = acc[0] + (cols.T @ cols).double()  # float32 GEMM per call, float64 sum over calls
            acc[1] += cols.shape[0]
        return fn

    for name, m in unet.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and (names is None or name in names):
            hooks.append(m.register_forward_pre_hook(hook(name)))
    try:
        runner = make_runner("torch", quantize(unet, QuantConfig(mode="fp")))
        run_batches(runner, model, traj, progress, desc="GPTQ Hessians")
    finally:
        for h in hooks:
            h.remove()
    return {name: (s / n).float() for name, (s, n) in sums.items()}


@torch.no_grad()
def gptq_round(model, config, names: list[str], traj: Trajectories = HESSIAN_TRAJECTORIES, mse_clip: bool = True,
               progress: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """GPTQ-rounded weights of the layers `names` of `model` (a LoadedModel) under `config`:
    {layer: (codes int8 [Cout, ...], scale float32 [Cout])}, each on its layer's per-channel grid,
    clipped first by the MSE search calibration uses (mse_clip; docs/quality.md compares the grids).
    What calibration stores and export bakes in (recipe.py)."""
    if not names:
        return {}
    unet = quantize(copy.deepcopy(model.unet), config)
    chosen = set(names)
    for layer in modiff_layers(unet):
        if layer.block_size is not None or not gptq_supported(layer.inner):  # INT4 block layouts, grouped convs:
            chosen.discard(layer.name)                                           # nearest rounding
        elif layer.name in chosen and mse_clip and not layer.skipped:
            layer.set_weight_clip(weight_clip_ratios(layer.inner.weight, layer.weight_bits))
    done = []
    for group in _hessian_groups(model.unet, [n for n in names if n in chosen]):  # each group's H fits in memory
        hessians = collect_hessians(model, traj, names=set(group), progress=progress)
        done += apply_gptq(unet, hessians, max_weight_bits=8)
        del hessians
    layers = {layer.name: layer for layer in modiff_layers(unet)}
    return {name: (layers[name].weight_codes().to(torch.int8), layers[name].w_scale.detach().clone())
            for name in done}
