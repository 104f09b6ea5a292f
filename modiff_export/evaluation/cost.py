"""Cost figures: MACs and bit operations (BOPs) per UNet call and per trajectory, weight and cache
bytes (latency lives in modiff_export/harness/latency.py).

BOPs follow the quantized-network literature the paper belongs to (e.g. "Q-Diffusion", "PTQ4DM",
and the BOPs of "Differentiable Quantization" / van Baalen et al.): for every Conv2d/Linear,
    BOPs = MACs x weight bits x activation bits,
with full precision counted as 32 x 32. MACs are counted from the real input shapes with forward
hooks (Conv2d: B * Cout * Hout * Wout * Cin/groups * kh * kw; Linear: prod(input.shape[:-1]) *
in_features * out_features). Attention matmuls, norms and activations are not counted (they are not
quantized by any config here, the same for every row).

MoDiff: the prime call runs every layer at full-precision activations x quantized weights
(32 x W bits), every step call at W x A bits; a trajectory of n steps is prime + (n - 1) x step.
Block reuse: a shallow call counts only the layers outside the deep branch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..manifest import Manifest

FP_BITS = 32


@dataclass(frozen=True)
class LayerMacs:
    name: str
    kind: str  # "conv" or "linear"
    macs: int  # per UNet call, for the batch the model was run with


def count_macs(unet: nn.Module, *args, **kwargs) -> list[LayerMacs]:
    """MACs of every Conv2d/Linear (including the ones inside MoDiffLayer wrappers) for one call
    `denoiser.call(unet, *args, **kwargs)`, from the real input shapes (args = sample, timestep[, cond {name:
    tensor}]; without cond: zeros of the model's conditioning). Layers called twice are summed."""
    from ..models import denoiser
    from ..quant.quantization import MoDiffLayer

    totals: dict[str, list] = {}
    hooks = []

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0]
            module = getattr(module, "inner", module)  # MoDiffLayer: its Conv2d/Linear (not called itself)
            if isinstance(module, nn.Conv2d):
                cin_g = module.in_channels // module.groups
                kh, kw = module.kernel_size
                macs = output.numel() * cin_g * kh * kw  # output = B * Cout * Hout * Wout
                kind = "conv"
            else:
                macs = (x.numel() // x.shape[-1]) * module.in_features * module.out_features
                kind = "linear"
            totals.setdefault(name, [kind, 0])[1] += int(macs)
        return fn

    wrapped = {id(m.inner) for m in unet.modules() if isinstance(m, MoDiffLayer)}
    for name, m in unet.named_modules():
        if isinstance(m, MoDiffLayer):
            hooks.append(m.register_forward_hook(hook(m.name)))
        elif isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in wrapped:
            hooks.append(m.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            if type(unet).__name__ in denoiser.SUPPORTED:
                sample, timestep, *rest = args
                b = sample.shape[0]
                timestep = torch.as_tensor(timestep, dtype=torch.float32).flatten().expand(b)  # [B], as runners pass
                # MACs do not depend on the conditioning's values: zeros (label 0) where none is given
                cond = rest[0] if rest else denoiser.conditioning_of(unet).example(b, denoiser.sample_hw(unet))
                denoiser.call(unet, sample, timestep, cond, **kwargs)
            else:  # any other module (tests): called as it is
                unet(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return [LayerMacs(n, k, v) for n, (k, v) in totals.items()]


def placeholder_call(model) -> tuple:
    """(sample, timestep, cond) of one batch-1 call of a LoadedModel's denoiser at t = 500: zeros in the model's
    own conditioning shapes (digits_flux / digits_sd3: their label encoder's 4 text tokens, not the class default
    of 512) and, for FLUX, the packed latent [1, N, C*4]. Costs do not depend on the values."""
    from ..models import denoiser

    x = torch.zeros(1, *model.sample_shape)  # [1, C, H, W]
    cond = model.conditioning.example(1, tuple(model.sample_shape[-2:])) if model.conditioning else None
    return denoiser.pack(x) if model.packed else x, torch.tensor(500.0), cond


def model_macs(model) -> list[LayerMacs]:
    """count_macs of one placeholder_call of a LoadedModel's denoiser."""
    x, t, cond = placeholder_call(model)
    return count_macs(model.unet, x, t, *([cond] if cond else []))


def bops_per_call(macs: list[LayerMacs], config, phase: str = "step", deep: frozenset[str] = frozenset()) -> int:
    """BOPs of one UNet call under a QuantConfig.

    fp: 32 x 32. ptq: W x A every call. modiff: prime = W x 32 (full-precision activations),
    step = W x A. Per-layer bits come from config.bits_for / config.skips. phase "shallow" (block
    reuse) counts only the layers outside `deep` (the deep branch's layers, not computed), as a step.
    """
    total = 0
    for l in macs:
        if phase == "shallow" and l.name in deep:
            continue
        if config.mode == "fp" or config.skips(l.name):
            wb, ab = FP_BITS, FP_BITS
        else:
            wb, ab = config.bits_for(l.name)
            if config.mode == "modiff" and phase == "prime":
                ab = FP_BITS
        total += l.macs * wb * ab
    return total


def bops_per_trajectory(macs: list[LayerMacs], config, steps: int, deep: frozenset[str] = frozenset()) -> int:
    """The sum over the calls of a trajectory, each call's role by the runners' rule (quant.call_role):
    fp / ptq: every call a full one; MoDiff: prime + steps, every K-th call a prime with a keyframe
    interval K; block reuse: calls not a multiple of the interval are shallow (`deep`: the deep-branch
    layer names, manifest.reuse.deep_layers)."""
    from ..quant.quantization import call_role

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if config.reuses and not deep:
        raise ValueError("block reuse: bops_per_trajectory needs the deep-branch layer names (deep=)")
    per_role: dict[str, int] = {}
    total = 0
    for i in range(steps):
        role = call_role(i, config.keyframe_interval, config.reuse_interval, config.mode == "modiff",
                         config.reuse_warmup)
        if role not in per_role:
            per_role[role] = bops_per_call(macs, config, role, deep)
        total += per_role[role]
    return total


def macs_fraction(macs: list[LayerMacs], config, steps: int, deep: frozenset[str]) -> float:
    """Block reuse: the trajectory's computed MACs over `steps` full calls (the schedule's work, bits aside;
    `deep`: the deep-branch layer names)."""
    from ..config import QuantConfig

    fp = QuantConfig(mode="fp", reuse_interval=config.reuse_interval, reuse_depth=config.reuse_depth,
                     reuse_warmup=config.reuse_warmup)
    return bops_per_trajectory(macs, fp, steps, deep) / bops_per_trajectory(macs, QuantConfig(mode="fp"), steps)


def reuse_cost_row(unet: nn.Module, macs: list[LayerMacs], config, steps: int, sample_shape) -> dict:
    """Cost of a block-reuse config without exporting it (the demo's cost table): BOPs per call role and per
    trajectory, and the bytes per sample a runner keeps between calls (every MoDiff cache and the deep-branch
    feature, float32; with a reuse_forecast also the forecast's feature-size buffers (3 linear, 4 taylor), design
    section 1.2) from one prime call of a quantized copy of `unet` (`macs` from the unquantized one)."""
    import copy

    from ..quant.forecast import make_forecast
    from ..quant.quantization import list_caches, quantize

    q = quantize(copy.deepcopy(unet), config).eval()
    with torch.no_grad():
        from ..models import denoiser

        denoiser.call(q, torch.zeros(1, *sample_shape), torch.tensor([500.0]),
                      denoiser.conditioning_of(q).example(1, tuple(sample_shape[-2:])))
    deep = frozenset(m.name for m in macs if q.modiff_reuse.is_deep(m.name))
    modiff = config.mode == "modiff"
    fc = make_forecast(config.reuse_forecast, config.reuse_interval)
    forecast = fc.buffers if fc is not None else 0
    kept = [e.tensor for e in list_caches(q)] + [q.modiff_reuse.feature] * (1 + forecast)
    return {"config": config.tag, "bops_prime": bops_per_call(macs, config, "prime"),
            "bops_step": bops_per_call(macs, config, "step") if modiff else None,
            "bops_shallow": bops_per_call(macs, config, "shallow", deep),
            "bops_traj": bops_per_trajectory(macs, config, steps, deep),
            "cache_bytes": sum(t.numel() * 4 for t in kept)}


def weight_bytes(manifest: Manifest) -> int:
    """Bytes of the Conv/Linear weights as stored: int8 containers (1 byte/weight) for quantized
    layers, 4 bytes for full-precision ones (fp config or skipped layers). Biases, norms excluded."""
    return sum(math.prod(layer.weight_shape) * (4 if layer.skipped else 1) for layer in manifest.layers)


def packed_weight_bytes(manifest: Manifest) -> int:
    """The same weights at their nominal bit width (4-bit weights packed two per byte)."""
    return sum(math.prod(layer.weight_shape) * (32 if layer.skipped else layer.weight_bits) // 8
               for layer in manifest.layers)
