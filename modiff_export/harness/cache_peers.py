"""diffusers' own cache hooks as peers of our block reuse (issue 33): TaylorSeerCache, FirstBlockCache and
MagCache on the FP model, run through our sampling loop, with the MACs they actually compute counted.

    x, macs_frac = sample_hook(model, "taylorseer:3:1", traj)      # interval 3, first order
    x, macs_frac = sample_hook(model, "fbcache:0.1", traj)         # threshold 0.1
    x, macs_frac = sample_hook(model, "magcache:0.1", traj)        # threshold 0.1, ratios calibrated here

What they skip is decided at run time, so the compute is counted, not derived: every Linear/Conv2d call's MACs
summed by forward hooks over the trajectory, over steps x one full call's (attention score products are not
counted, as in evaluation/cost.py). TaylorSeer caches every transformer block (cache_identifiers), its factors
in float32. MagCache's magnitude ratios are model- and sampler-dependent: they are calibrated on this model and
sampler (one FP trajectory of 16 samples with calibrate=True, as its docs ask).
"""
from __future__ import annotations

import contextlib
import io
import math
import re

import torch

from ..backends.torch_runner import TorchRunner
from ..config import QuantConfig
from ..sampling import Trajectories, sample_model

HOOKS = ("taylorseer", "fbcache", "magcache")


class HookRunner(TorchRunner):
    """The FP model with a diffusers cache hook: every call inside the cache context "cond" (what a pipeline's
    `transformer.cache_context("cond")` sets; DiT and PixArt lack CacheMixin, so it is set through the hook
    registry; CFG's two halves are one batch), the hook's state reset with each new trajectory."""

    def _run(self, phase, sample, timestep, cond):
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        _set_cache_context(self.unet, CacheContext("cond"))
        try:
            return super()._run(phase, sample, timestep, cond)
        finally:
            _set_cache_context(self.unet, None)

    def reset_impl(self) -> None:
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(self.unet).reset_stateful_hooks(recurse=True)


class MacCounter:
    """Sums the MACs of every Linear/Conv2d call of `model` while active (forward hooks)."""

    def __init__(self, model):
        self.macs = 0
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]

    def _hook(self, m, args, out):
        if isinstance(m, torch.nn.Linear):
            self.macs += out.numel() * m.in_features
        else:
            self.macs += out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]

    def close(self):
        for h in self.handles:
            h.remove()


def _hook_config(method: str, args: list[str], model, sched: str, steps: int, guidance: float):
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    if method == "taylorseer":
        n, order = int(args[0]), int(args[1])
        blocks = r"transformer_blocks\.\d+" if not hasattr(model.unet, "single_transformer_blocks") else \
            r"(single_)?transformer_blocks\.\d+"
        return TaylorSeerCacheConfig(cache_interval=n, max_order=order, taylor_factors_dtype=torch.float32,
                                     cache_identifiers=[blocks])
    if method == "fbcache":
        return FirstBlockCacheConfig(threshold=float(args[0]))
    ratios = _mag_ratios(model, sched, steps, guidance)
    return MagCacheConfig(threshold=float(args[0]), num_inference_steps=steps, mag_ratios=ratios)


def _mag_ratios(model, sched, steps, guidance) -> list[float]:
    """MagCache's per-step magnitude ratios of this model and sampler (its calibrate mode prints them)."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    m = model.copy()
    apply_mag_cache(m.unet, MagCacheConfig(calibrate=True, num_inference_steps=steps))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        sample_model(m, QuantConfig(mode="fp"), Trajectories(sched, steps, 16, 16, 12345, guidance_scale=guidance),
                     progress=False, runner=HookRunner(m.unet))
    found = re.findall(r"\[([0-9eE.,\s+-]+)\]", out.getvalue())
    if not found:
        raise RuntimeError(f"MagCache calibration printed no ratios: {out.getvalue()[-300:]!r}")
    return [float(v) for v in found[-1].split(",")]


def sample_hook(model, spec: str, traj: Trajectories) -> tuple[torch.Tensor, float]:
    """(samples, fraction of the full model's MACs computed) of the FP model under a diffusers hook."""
    from diffusers.hooks import apply_first_block_cache, apply_mag_cache, apply_taylorseer_cache

    method, *args = spec.split(":")
    sched, steps = traj.scheduler, traj.steps
    config = _hook_config(method, args, model, sched, steps, traj.guidance_scale)
    full = MacCounter(model.unet)  # one full call's MACs, same batch
    plain = sample_model(model, QuantConfig(mode="fp"), Trajectories(sched, 1, traj.batch_size, traj.batch_size,
                                                                     traj.seed, guidance_scale=traj.guidance_scale),
                         progress=False, runner=TorchRunner(model.unet))
    full.close()
    del plain
    m = model.copy()
    {"taylorseer": apply_taylorseer_cache, "fbcache": apply_first_block_cache, "magcache": apply_mag_cache}[
        method](m.unet, config)
    counter = MacCounter(m.unet)
    x = sample_model(m, QuantConfig(mode="fp"), traj, progress=False, runner=HookRunner(m.unet))
    counter.close()
    batches = math.ceil(traj.samples / traj.batch_size)
    return x, counter.macs / (full.macs * steps * batches)
