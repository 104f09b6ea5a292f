"""Quality improvements beyond the MoDiff paper (issue 11), applied to an already quantized UNet.

    ratios = calibrate_delta_clip(model, config)       # {layer: r}: dynamic delta scale = r * absmax / qmax
    apply_delta_clip(unet, ratios)
    h = collect_hessians(model)                        # {layer: E[x x^T]} of the FP inputs (im2col for convs)
    apply_gptq(unet, h)                                # 4-bit weights rounded GPTQ-style, on their own grid

Both are calibrated on trajectories of their own noise seeds (CALIB_SEED, disjoint from the seeds the
quality benchmarks sample with) with DDIM, whichever sampler is evaluated later.

Delta clip: a MoDiff step quantizes d = x - a_hat with s = absmax(d) / qmax per sample. Per layer we
collect u = d / absmax(d) (per sample, in [-1, 1]) and pick the constant r from a grid that minimizes
the quantization MSE of u at the layer's act bits with scale r / qmax. The exported graph gets one
constant Mul after the absmax (TensorRT-legal: every Q/DQ scale stays a build-time constant).

GPTQ (Frantar et al. 2022): columns of W [Cout, Cin*kh*kw] are rounded one at a time and the rounding
error is spread over the not yet rounded columns through the inverse Hessian H = E[x x^T] of the
layer's input (full-precision trajectories, every timestep). The per-channel scale grid is the layer's
own (w_scale), so the result is an ordinary int8-container weight: it is written into the layer's
float weight, which quantized_weight() then reproduces exactly. MoDiff's output is f(Wq, a_hat) with
a_hat ~ x, so the weight error meets the full input x, not the delta: the FP input statistics are
the right ones.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModiffExportError
from ..sampling import run_batches
from .quantization import modiff_layers, qmax_for, quantize, quantize_codes
from .recipe import INT8_IO_TIME_LAYERS  # noqa: F401  (re-exported: benchmarks and tests use it from here)

CALIB_SEED = 100_000                       # calibration noise: batch seeds far from evaluation seeds
CLIP_GRID = torch.linspace(0.2, 1.0, 41)   # delta clip ratios searched


# -- delta clip ---------------------------------------------------------------------------------------
@torch.no_grad()
def calibrate_delta_clip(model, config, steps: int = 25, samples: int = 32, per_call: int = 4096,
                         seed: int = CALIB_SEED) -> dict[str, float]:
    """{layer: clip ratio} minimizing the MSE of each layer's per-sample-normalized delta at its act bits."""
    from ..backends import make_runner

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
    run_batches(make_runner("torch", unet), model, "ddim", steps, samples, samples, seed, progress=False)
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


# -- GPTQ ---------------------------------------------------------------------------------------------
def _columns(module: nn.Module, x: torch.Tensor, max_rows: int | None = None,
             gen: torch.Generator | None = None) -> torch.Tensor:
    """The layer input as rows of the weight's column space: [n, Cin*kh*kw] (conv: im2col) or [n, Cin];
    with max_rows, a uniform random subset of max_rows rows (randperm over the rows in (sample,
    position) order). Convs gather only the chosen patches: im2col of a whole 32x32 batch cost more
    than the Hessian product it feeds."""
    if isinstance(module, nn.Conv2d):
        B, C, H, W = x.shape
        (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
        ph, pw = module.padding
        ho, wo = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        total = B * ho * wo
        idx = torch.arange(total) if max_rows is None or total <= max_rows else \
            torch.randperm(total, generator=gen)[:max_rows]                                    # [n]
        b, r = idx // (ho * wo), idx % (ho * wo)
        ys = (r // wo)[:, None] * sh + torch.arange(kh) * dh                                    # [n, kh]
        xs = (r % wo)[:, None] * sw + torch.arange(kw) * dw                                     # [n, kw]
        xp = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1)                                    # [B, H', W', C]
        patches = xp[b[:, None, None], ys[:, :, None], xs[:, None, :]]                          # [n, kh, kw, C]
        return patches.permute(0, 3, 1, 2).reshape(len(idx), -1)                                # [n, C*kh*kw]
    rows = x.reshape(-1, x.shape[-1])
    if max_rows is not None and rows.shape[0] > max_rows:
        rows = rows[torch.randperm(rows.shape[0], generator=gen)[:max_rows]]
    return rows


def gptq_supported(module: nn.Module) -> bool:
    """GPTQ here covers Linear and ungrouped, zero-padded Conv2d with integer padding (every conv of a
    diffusers UNet); others keep nearest rounding."""
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


class HessianBudgetError(ModiffExportError):
    """The GPTQ Hessians of the requested layers would not fit in memory."""


def hessian_bytes(unet: nn.Module, names: set[str] | None = None) -> int:
    """Memory of the float64 Hessian sums collect_hessians keeps: sum of N^2 * 8 over the layers."""
    total = 0
    for name, m in unet.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and (names is None or name in names):
            total += (m.weight[0].numel()) ** 2 * 8
    return total


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
def collect_hessians(model, steps: int = 20, samples: int = 16, seed: int = CALIB_SEED, max_rows: int = 1024,
                     names: set[str] | None = None, scheduler: str = "ddim", batch_size: int | None = None,
                     guidance_scale: float = 1.0, progress: bool = False) -> dict[str, torch.Tensor]:
    """{layer: H = mean(x x^T)} [N, N] of each Conv2d/Linear input (only `names`, if given) over
    full-precision trajectories of `scheduler` (sampling.run_batches: conditional models get their
    encoder states as in sampling). Refuses, before any work, Hessians over half the free RAM.

    Cost: each UNet call adds X^T X of at most `max_rows` random rows (pixels x samples) per layer;
    1024 rows over calibrate's 100 default calls are ~100k rows, far more than any N, and keep this
    GEMM (not the UNet) from dominating: on the CIFAR-size UNet 8192 float64 rows took 21 s a call."""
    import psutil

    from ..backends import make_runner
    from ..config import QuantConfig

    need, free = hessian_bytes(model.unet, names), psutil.virtual_memory().available
    if need > free // 2:
        raise HessianBudgetError(f"GPTQ Hessians need {need / 2**30:.1f} GiB, over half the free memory "
                                 f"({free / 2**30:.1f} GiB); calibrate with --recipe paper (nearest rounding)")
    unet = copy.deepcopy(model.unet)
    sums: dict[str, list] = {}
    gen = torch.Generator().manual_seed(seed + 1)
    hooks = []

    def hook(name):
        def fn(module, inputs):
            cols = _columns(module, inputs[0].float(), max_rows, gen)  # [n <= max_rows, N]
            acc = sums.setdefault(name, [0.0, 0])
            acc[0] = acc[0] + (cols.T @ cols).double()  # float32 GEMM per call, float64 sum over calls
            acc[1] += cols.shape[0]
        return fn

    for name, m in unet.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and (names is None or name in names):
            hooks.append(m.register_forward_pre_hook(hook(name)))
    try:
        runner = make_runner("torch", quantize(unet, QuantConfig(mode="fp")))
        run_batches(runner, model, scheduler, steps, samples, batch_size or samples, seed, guidance_scale,
                    progress, desc="GPTQ Hessians")
    finally:
        for h in hooks:
            h.remove()
    return {name: (s / n).float() for name, (s, n) in sums.items()}


def gptq_quantize(w: torch.Tensor, scale: torch.Tensor, bits: int, h: torch.Tensor, damp: float = 0.01,
                  block: int = 128) -> torch.Tensor:
    """GPTQ rounding of w [Cout, N] on the per-channel grid scale [Cout]; h [N, N]. Returns Wq [Cout, N].

    Columns are rounded in order; each rounding error is spread over the later columns through the
    upper Cholesky factor of H^-1. Within a block of `block` columns the update is column by column,
    the later blocks get it as one matrix product (GPTQ's "lazy batch" form: the same arithmetic,
    BLAS-speed on layers with N in the thousands; block=1 is the textbook loop)."""
    w = w.clone().double()
    h = h.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(len(h), dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # [N, N]
    s = scale.double().reshape(-1)                                                                # [Cout]
    codes = torch.zeros_like(w)
    n = w.shape[1]
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        errs = torch.zeros(w.shape[0], i2 - i1, dtype=w.dtype)                                  # [Cout, b]
        for i in range(i1, i2):
            codes[:, i] = quantize_codes(w[:, i], s, bits)
            err = (w[:, i] - codes[:, i] * s) / hinv[i, i]                                       # [Cout]
            w[:, i + 1:i2] -= err[:, None] * hinv[i, i + 1:i2][None, :]
            errs[:, i - i1] = err
        w[:, i2:] -= errs @ hinv[i1:i2, i2:]                                                     # later blocks
    return codes.float() * scale.float().reshape(-1, 1)  # float32 products, as quantized_weight() computes them


@torch.no_grad()
def apply_gptq(unet: nn.Module, hessians: dict[str, torch.Tensor], max_weight_bits: int = 4) -> list[str]:
    """Replace the weights of quantized layers with <= max_weight_bits (per-channel scales) by their GPTQ
    rounding on the layer's own grid; returns the layer names changed."""
    done = []
    for layer in modiff_layers(unet):
        if layer.skipped or layer.weight_bits > max_weight_bits or layer.block_size is not None:
            continue
        if layer.name not in hessians:
            continue
        w = layer.inner.weight
        wq = gptq_quantize(w.reshape(w.shape[0], -1), layer.w_scale, layer.weight_bits, hessians[layer.name])
        w.copy_(wq.reshape(w.shape))
        layer._wq = None
        assert torch.equal(layer.quantized_weight(), w), layer.name  # on its own grid: re-quantizes to itself
        done.append(layer.name)
    return done


@torch.no_grad()
def gptq_round(model, config, names: list[str], mse_clip: bool = True,
               **hessian_kwargs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """GPTQ-rounded weights of the layers `names` of `model` (a LoadedModel) under `config`:
    {layer: (codes int8 [Cout, ...], scale float32 [Cout])}, each on its layer's per-channel grid,
    clipped first by the MSE search calibration uses (mse_clip; docs/quality.md measured GPTQ on the
    clipped grid 0.1-1.1 dB better than on the absmax grid at W4A4, on both models). What
    calibration stores and export bakes in (recipe.py)."""
    from .calibration import weight_clip_ratios

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
        hessians = collect_hessians(model, names=set(group), **hessian_kwargs)
        done += apply_gptq(unet, hessians, max_weight_bits=8)
        del hessians
    layers = {layer.name: layer for layer in modiff_layers(unet)}
    return {name: (layers[name].weight_codes().to(torch.int8), layers[name].w_scale.detach().clone())
            for name in done}
