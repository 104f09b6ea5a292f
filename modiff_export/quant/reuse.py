"""DeepCache-style block reuse on a (quantized) diffusers UNet (docs/design.md section 1.1).

Depth D counts down/up block pairs from the outside. The *deep branch* of depth D is everything the outer
D pairs wrap: the downsampler of down_blocks[D-1] (its output feeds only the deep branch), down_blocks[D:],
mid_block and up_blocks[:-D]. Its output (the input of up_blocks[-D]; the mid block's output when D is the
number of blocks) is the *feature*.

    full call:    the whole UNet; the feature is recorded
    shallow call: conv_in, time embedding, down_blocks[:D] (without that downsampler), up_blocks[-D:],
                  conv_out; the deep branch is not computed, its modules return their input and the
                  feature source returns the recorded feature

With reuse_forecast="linear" a shallow call reads `LinearForecast`'s extrapolation instead (design section
1.2): the module applies it itself when it schedules its own calls (phase None: a diffusers pipeline, direct
calls); when a runner sets the phase (and when tracing the graphs) the module returns the recorded feature and
the runner (backends/base.py) writes the forecast into it, as it does for the exported graphs.

The deep layers are not called on a shallow call, so their MoDiff caches stay as the last full call left
them: the next full call's delta x - a_hat spans every skipped call (with reuse_compensation=False those
layers update a_hat = x instead, the ablation). A module's forward is replaced by a bound method (so a
deepcopy of the UNet keeps working) that reads the UNet's `BlockReuse` state.
"""
from __future__ import annotations

import types

import torch
import torch.nn as nn

from ..errors import ModiffExportError


class ReuseError(ModiffExportError, ValueError):
    """Block reuse asked of a UNet that cannot do it (depth beyond its blocks, skip blocks, no mid block)."""


class BlockReuse:
    """The reuse state of one UNet: which modules are deep, the recorded feature, what this call does.

    phase: None (automatic: every `interval`-th call of a trajectory is full), "full" or "shallow"."""

    def __init__(self, interval: int, depth: int, deep_prefixes: tuple[str, ...], source: str,
                 forecast: str = "none"):
        self.interval, self.depth = interval, depth
        self.forecast = LinearForecast(interval) if forecast == "linear" else None  # used when phase is None
        self.deep_prefixes, self.source = deep_prefixes, source
        self.phase: str | None = None
        self.reusing = False
        self.feature = None
        self.calls = 0

    def is_deep(self, name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in self.deep_prefixes)

    def reset(self) -> None:
        self.feature, self.calls, self.reusing = None, 0, False
        if self.forecast is not None:
            self.forecast.reset()

    def begin_call(self) -> None:
        """Decide whether this call reuses (phase, else the schedule) and count it."""
        self.reusing = self.phase == "shallow" if self.phase else self.calls % self.interval != 0
        self.calls += 1


class LinearForecast:
    """The deep branch's output on reused calls, extrapolated from the last two full calls (design 1.2).

        full call j:          F_j recorded;  v = (F_j - F_j-1) / N   (none yet after the first full call)
        k-th reused call:     F_j + k v                              (F_j itself while there is no v)

    Full calls are N = reuse_interval calls apart, so v is the feature's change per call: the reused calls
    follow the feature's trend instead of holding it still (DeepCache's choice, `reuse_forecast="none"`).
    Works on torch tensors [B, C, H, W] in float32; the caller reads and writes its backend's buffer."""

    BUFFERS = 3  # base, velocity, out: what it keeps beside the feature cache (evaluation/cost.py counts them)

    def __init__(self, interval: int):
        self.interval = interval
        self.base = self.velocity = self.out = None  # [B, ...] float32, allocated once per shape and device
        self.reset()

    def reset(self) -> None:
        self.fulls, self.k = 0, 0

    def full(self, feature: torch.Tensor) -> None:
        """After a prime/step: `feature` is what it wrote (may be a view of the backend's buffer: copied)."""
        if self.base is None or self.base.shape != feature.shape or self.base.device != feature.device:
            self.base, self.velocity, self.out = (torch.empty(feature.shape, dtype=torch.float32,
                                                              device=feature.device) for _ in range(3))
        if self.fulls:
            torch.sub(feature, self.base, out=self.velocity).div_(self.interval)
        self.base.copy_(feature)
        self.fulls, self.k = self.fulls + 1, 0

    def reused(self) -> torch.Tensor | None:
        """Before a shallow call: the feature it should read (a buffer this object rewrites on the next call),
        or None to keep the recorded one."""
        if not self.fulls:
            raise ReuseError("a shallow (reusing) call before any full call: the deep feature is empty")
        self.k += 1
        if self.fulls < 2:
            return None
        return torch.add(self.base, self.velocity, alpha=self.k, out=self.out)


def deep_branch(unet: nn.Module, depth: int) -> tuple[tuple[str, ...], str]:
    """(module names of the deep branch of `depth`, name of the module whose output is the feature)."""
    down, up = getattr(unet, "down_blocks", None), getattr(unet, "up_blocks", None)
    what = type(unet).__name__
    if down is None or up is None or len(down) != len(up):
        raise ReuseError(f"{what} has no matching down_blocks/up_blocks; block reuse needs a diffusers UNet")
    n = len(down)
    if not 1 <= depth <= n:
        raise ReuseError(f"reuse_depth {depth} is outside 1..{n}: {what} has {n} down/up block pairs")
    if any(hasattr(b, "skip_conv") for b in (*down, *up)):
        raise ReuseError(f"{what} has skip blocks (SkipDownBlock2D/SkipUpBlock2D); block reuse does not support them")
    if depth == n and getattr(unet, "mid_block", None) is None:
        raise ReuseError(f"reuse_depth {depth} reuses only the mid block, and {what} has none; use a smaller depth")
    names = [f"down_blocks.{depth - 1}.downsamplers"] if getattr(down[depth - 1], "downsamplers", None) else []
    names += [f"down_blocks.{i}" for i in range(depth, n)]
    names += ["mid_block"] if getattr(unet, "mid_block", None) is not None else []
    names += [f"up_blocks.{i}" for i in range(n - depth)]
    return tuple(names), (f"up_blocks.{n - depth - 1}" if depth < n else "mid_block")


def install(unet: nn.Module, interval: int, depth: int, forecast: str = "none") -> BlockReuse:
    """Make the deep branch of `unet` skippable; the state is `unet.modiff_reuse`."""
    prefixes, source = deep_branch(unet, depth)
    state = BlockReuse(interval, depth, prefixes, source, forecast)
    for name in prefixes:
        module = unet.get_submodule(name)
        role = "source" if name == source else "down" if name.startswith("down_blocks.") and "." not in name[12:] \
            else "pass"
        if isinstance(module, nn.ModuleList):  # downsamplers: each one passes its input through
            for m in module:
                _patch(m, state, "pass")
        else:
            _patch(module, state, role)
    if source not in prefixes:
        raise ReuseError(f"internal: the feature source {source} is not in the deep branch")
    unet.modiff_reuse = state
    return state


def _patch(module: nn.Module, state: BlockReuse, role: str) -> None:
    module.modiff_reuse, module.modiff_reuse_role = state, role
    module.forward = types.MethodType(_reuse_forward, module)


def _reuse_forward(self: nn.Module, *args, **kwargs):
    state = self.modiff_reuse
    own_forecast = state.forecast is not None and state.phase is None  # the module schedules itself
    if not state.reusing:
        out = type(self).forward(self, *args, **kwargs)
        if self.modiff_reuse_role == "source":
            state.feature = out
            if own_forecast:
                state.forecast.full(out)
        return out
    if self.modiff_reuse_role == "source":
        if state.feature is None:
            raise ReuseError("a shallow (reusing) call before any full call: the deep feature is empty")
        forecast = state.forecast.reused() if own_forecast else None
        return state.feature if forecast is None else forecast.clone()  # a clone: the buffer is rewritten
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if self.modiff_reuse_role == "down":  # (hidden, res_samples): only deep up blocks read these
        return hidden, (hidden,) * (len(self.resnets) + len(getattr(self, "downsamplers", None) or ()))
    return hidden
