"""GPTQ rounding (Frantar et al. 2022; docs/design.md section 2): the column algorithm and what it needs
from a layer. Pure math; calibration/hessians.py gathers the Hessians over full-precision trajectories.

Columns of W [Cout, Cin*kh*kw] are rounded one at a time and the rounding error is spread over the not
yet rounded columns through the inverse Hessian H = E[x x^T] of the layer's input. The per-channel scale
grid is the layer's own (w_scale), so the result is an ordinary int8-container weight, written into the
layer with MoDiffLayer.set_rounded_weight. MoDiff's output is f(Wq, a_hat) with a_hat ~ x, so the weight
error meets the full input x, not the delta: the FP input statistics are the right ones.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantization import modiff_layers, quantize_codes


def input_rows(module: nn.Module, x: torch.Tensor, max_rows: int | None = None,
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


def hessian_bytes(unet: nn.Module, names: set[str] | None = None) -> int:
    """Memory of the float64 Hessian sums collect_hessians keeps: sum of N^2 * 8 over the layers."""
    total = 0
    for name, m in unet.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and (names is None or name in names):
            total += (m.weight[0].numel()) ** 2 * 8
    return total


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
        codes = torch.round(wq / layer.w_scale.reshape(-1, 1))  # exact: wq = codes * scale in float32
        layer.set_rounded_weight(codes.reshape(w.shape), layer.w_scale)  # checks it re-quantizes to itself
        done.append(layer.name)
    return done
