"""Scale searches (docs/design.md section 2): the statistics kept of a tensor about to be quantized, and the
scale (or clip ratio) chosen from them. Pure math on tensors; calibration/ runs the trajectories that feed it.

    st = DeltaStats(); st.add(delta, limit, gen)          # exact absmax + bounded uniform subsample of |delta|
    s = choose_scale(st, "mse", bits, 99.9)               # absmax / percentile / MSE-optimal clip
    r = weight_clip_ratios(w, bits)                        # [Cout] per-channel weight clip ratios (MSE)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .quantization import SCALE_FLOOR, fake_quantize, qmax_for

METHODS = ("absmax", "percentile", "mse")
ACT_CLIP_GRID = torch.linspace(0.02, 1.0, 50)       # mse search over clip ratios of the absmax
WEIGHT_CLIP_GRID = torch.linspace(0.5, 1.0, 21)      # per-channel weight clip ratios


@dataclass
class DeltaStats:
    """Exact absmax and count, plus a bounded uniform subsample of |values| (reservoir by random keys)."""

    absmax: float = 0.0
    count: int = 0
    keys: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    values: torch.Tensor = field(default_factory=lambda: torch.empty(0))

    def add(self, t: torch.Tensor, limit: int, gen: torch.Generator) -> None:
        v = t.detach().float().abs().reshape(-1)
        if v.numel() == 0:
            return
        self.absmax = max(self.absmax, float(v.max()))
        self.count += v.numel()
        keys = torch.rand(v.numel(), generator=gen)
        if v.numel() > limit:  # only the `limit` smallest keys of this batch can survive the merge
            keys, idx = torch.topk(keys, limit, largest=False)
            v = v[idx]
        keys, v = torch.cat([self.keys, keys]), torch.cat([self.values, v])
        if keys.numel() > limit:
            keys, idx = torch.topk(keys, limit, largest=False)
            v = v[idx]
        self.keys, self.values = keys, v


def percentile_of(values: torch.Tensor, p: float) -> float:
    return float(torch.quantile(values.double(), p / 100.0)) if values.numel() else 0.0


def mse_scale(values: torch.Tensor, absmax: float, bits: int, grid: torch.Tensor = ACT_CLIP_GRID) -> float:
    """Scale r * absmax / qmax with r on `grid` minimizing mean((Q(v) - v)^2) over the sample `values`."""
    q = qmax_for(bits)
    if absmax <= 0 or values.numel() == 0:
        return absmax / q
    v = values.float()
    best, best_err = absmax / q, math.inf
    for r in sorted(grid.tolist(), reverse=True):  # from 1 down: ties keep the larger ratio
        s = max(r * absmax / q, SCALE_FLOOR)
        err = float((fake_quantize(v, torch.tensor(s), bits) - v).pow(2).mean())
        if err < best_err:
            best, best_err = s, err
    return best


def weight_clip_ratios(w: torch.Tensor, bits: int, grid: torch.Tensor = WEIGHT_CLIP_GRID) -> torch.Tensor:
    """Per-output-channel ratio in [0.5, 1] minimizing the channel's weight quantization MSE: [Cout]."""
    w2 = w.detach().float().reshape(w.shape[0], -1)        # [Cout, K]
    amax = w2.abs().amax(dim=1, keepdim=True)              # [Cout, 1]
    q = qmax_for(bits)
    best_err = torch.full((w2.shape[0],), math.inf)
    best = torch.ones(w2.shape[0])
    for r in sorted(grid.tolist(), reverse=True):          # from 1 down: ties keep the larger ratio
        s = torch.clamp(amax * r / q, min=SCALE_FLOOR)
        err = (fake_quantize(w2, s, bits) - w2).pow(2).sum(dim=1)  # [Cout]
        better = err < best_err
        best = torch.where(better, torch.full_like(best, r), best)
        best_err = torch.where(better, err, best_err)
    return best


def choose_scale(stat: DeltaStats, method: str, bits: int, percentile: float) -> float:
    q = qmax_for(bits)
    if method == "absmax":
        s = stat.absmax / q
    elif method == "percentile":
        s = min(percentile_of(stat.values, percentile), stat.absmax) / q
    elif method == "mse":
        s = mse_scale(stat.values, stat.absmax, bits)
    else:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {list(METHODS)}")
    return max(float(s), SCALE_FLOOR)


def fill_buckets(per_bucket: list[float | None]) -> list[float]:
    """Buckets with no observation take the value of the nearest observed bucket (ties: the lower one)."""
    seen = [i for i, v in enumerate(per_bucket) if v is not None]
    return [v if v is not None else per_bucket[min(seen, key=lambda j: (abs(j - i), j))]
            for i, v in enumerate(per_bucket)]
