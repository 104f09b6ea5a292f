"""What a reused (shallow) call reads as the skipped blocks' output: a forecast from the full calls
(docs/design.md section 1.2).

The feature F is the deep branch's output on UNets and the middle blocks' residual on transformers
(quant/reuse.py). Full call j comes g_j calls after full call j-1 (g = reuse_interval N, or 1 during the
reuse warmup); after full call j, the k-th reused call reads

    none     F_j                                                       (DeepCache / FBCache: hold it still)
    linear   F_j + k d1                 d1 = (F_j - F_j-1) / g_j        (the feature's change per call)
    taylor   F_j + k d1 + k^2/2 d2      d2 = (d1_j - d1_j-1) / ((g_j + g_j-1) / 2)   (TaylorSeer's second order)

Each order starts when it has the full calls it needs (linear: F_j alone after the first full call; taylor:
linear after the second). The finite differences are TaylorSeer's derivative estimates (Liu et al. 2025,
"From Reusing to Forecasting"), in calls instead of timesteps. Works on torch tensors in float32 on the
feature's device; the caller (Runner in backends/base.py, or the module in reuse.py) reads and writes its
backend's buffer.
"""
from __future__ import annotations

import torch

from ..errors import ModiffExportError

ORDERS = {"linear": 1, "taylor": 2}  # reuse_forecast -> order ("none": no Forecast object)


class ForecastError(ModiffExportError, ValueError):
    """A forecast asked before any full call, or of an unknown kind."""


class Forecast:
    """Finite-difference forecast of order 1 (linear) or 2 (taylor) over full calls `interval` apart."""

    def __init__(self, interval: int, order: int = 1):
        if order not in (1, 2):
            raise ForecastError(f"forecast order {order}: expected 1 (linear) or 2 (taylor)")
        self.interval, self.order = interval, order
        self.base = self.d1 = self.d2 = self.out = None  # [B, ...] float32, allocated once per shape and device
        self.gap = 0  # calls between the last two full calls
        self.reset()

    @property
    def buffers(self) -> int:
        """Feature-size buffers it keeps beside the feature cache (evaluation/cost.py counts them)."""
        return 3 + (self.order == 2)  # base, d1, out (+ d2)

    def reset(self) -> None:
        self.fulls, self.k = 0, 0

    def full(self, feature: torch.Tensor) -> None:
        """After a prime/step: `feature` is what it wrote (may be a view of the backend's buffer: copied)."""
        if self.base is None or self.base.shape != feature.shape or self.base.device != feature.device:
            def empty():
                return torch.empty(feature.shape, dtype=torch.float32, device=feature.device)
            self.base, self.d1, self.out = empty(), empty(), empty()
            self.d2 = empty() if self.order == 2 else None
        gap = self.k + 1  # this full call is k + 1 calls after the last one (the reused calls count k)
        if self.fulls:
            if self.order == 1:
                torch.sub(feature, self.base, out=self.d1).div_(gap)
            else:  # the new d1 goes through `out` (rewritten by the next reused call anyway)
                torch.sub(feature, self.base, out=self.out).div_(gap)
                if self.fulls >= 2:
                    torch.sub(self.out, self.d1, out=self.d2).div_((gap + self.gap) / 2)
                self.d1.copy_(self.out)
        self.gap = gap
        self.base.copy_(feature)
        self.fulls, self.k = self.fulls + 1, 0

    def reused(self) -> torch.Tensor | None:
        """Before a shallow call: the feature it should read (a buffer this object rewrites on the next call),
        or None to keep the recorded one."""
        if not self.fulls:
            raise ForecastError("a shallow (reusing) call before any full call: the reused feature is empty")
        self.k += 1
        if self.fulls < 2:
            return None
        out = torch.add(self.base, self.d1, alpha=self.k, out=self.out)
        if self.order == 2 and self.fulls >= 3:
            out.add_(self.d2, alpha=self.k * self.k / 2)
        return out


def make_forecast(kind: str, interval: int | None) -> Forecast | None:
    """The Forecast of QuantConfig.reuse_forecast `kind` ("none" or no reuse: None)."""
    if not interval or kind == "none":
        return None
    if kind not in ORDERS:
        raise ForecastError(f"reuse_forecast {kind!r}: expected one of none, {', '.join(ORDERS)}")
    return Forecast(interval, ORDERS[kind])
