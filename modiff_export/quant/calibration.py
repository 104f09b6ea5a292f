"""Calibration: static delta scales per layer and timestep bucket, and per-channel weight clipping
(docs/design.md section 2).

    calibrate(model, config, ...)          -> the calibration file's content (a dict)
    write_calibration(path, data)          -> temp file + rename
    load_calibration(path, model_hash, config) -> Calibration (refuses other models / configs)

What is measured: calibration trajectories run the quantized UNet with *dynamic* scales through
the real sampling loop (sampling.generate). Every quantized layer's observer sees the tensor it is
about to quantize: in modiff mode the delta `x - a_hat` of each step call (prime calls quantize
nothing), in ptq mode the input `x`. Per layer and timestep bucket we keep the exact absmax, the
element count and a uniform random subsample (at most `subsample` values, reservoir sampling with
random keys) of |tensor|. The static scale per bucket is then

    absmax:     absmax / qmax
    percentile: percentile(|d|, p) / qmax                       (from the subsample)
    mse:        r * absmax / qmax, r from a grid over (0, 1] minimizing the quantization MSE of the
                subsample at the layer's act bits

Weight clipping: per output channel, the ratio r in [0.5, 1] (grid) minimizing the MSE of the
channel's quantized weights at the layer's weight bits. Clips are chosen (and applied) before the
trajectories run, so the deltas are those of the model that will be exported.

The file format, writing and loading: quant/calibration_file.py.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch

from ..config import QuantConfig
from .calibration_file import SCHEMA, SCHEMA_VERSION, CalibrationError
from .quantization import (
    SCALE_FLOOR,
    apply_weight_choices,
    fake_quantize,
    modiff_layers,
    qmax_for,
    quantize,
    timestep_bucket,
)

METHODS = ("absmax", "percentile", "mse")
DEFAULT_SUBSAMPLE = 20_000
ACT_CLIP_GRID = torch.linspace(0.02, 1.0, 50)       # mse search over clip ratios of the absmax
WEIGHT_CLIP_GRID = torch.linspace(0.5, 1.0, 21)      # per-channel weight clip ratios


# -- statistics ---------------------------------------------------------------------------------
@dataclass
class _Stat:
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


def _percentile(values: torch.Tensor, p: float) -> float:
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


def choose_scale(stat: _Stat, method: str, bits: int, percentile: float) -> float:
    q = qmax_for(bits)
    if method == "absmax":
        s = stat.absmax / q
    elif method == "percentile":
        s = min(_percentile(stat.values, percentile), stat.absmax) / q
    elif method == "mse":
        s = mse_scale(stat.values, stat.absmax, bits)
    else:
        raise CalibrationError(f"unknown calibration method {method!r}; expected one of {list(METHODS)}")
    return max(float(s), SCALE_FLOOR)


def _fill_buckets(per_bucket: list[float | None]) -> list[float]:
    """Buckets with no observation take the value of the nearest observed bucket (ties: the lower one)."""
    seen = [i for i, v in enumerate(per_bucket) if v is not None]
    return [v if v is not None else per_bucket[min(seen, key=lambda j: (abs(j - i), j))]
            for i, v in enumerate(per_bucket)]


# -- running calibration --------------------------------------------------------------------------
class _Observer:
    """Collects per-(layer, bucket) statistics; the bucket comes from the timestep of the current UNet call."""

    def __init__(self, n_buckets: int, num_train_timesteps: int, subsample: int, seed: int):
        self.n_buckets, self.T, self.subsample = n_buckets, num_train_timesteps, subsample
        self.bucket = 0
        self.stats: dict[tuple[str, int], _Stat] = {}
        self.gen = torch.Generator().manual_seed(int(seed) + 7919)

    def pre_hook(self, unet, args, kwargs) -> None:
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        t = t.flatten()[0].item() if torch.is_tensor(t) else float(t)
        self.bucket = timestep_bucket(t, self.n_buckets, self.T)

    def __call__(self, layer, tensor: torch.Tensor) -> None:
        self.stats.setdefault((layer.name, self.bucket), _Stat()).add(tensor, self.subsample, self.gen)


@dataclass
class Observations:
    """What calibration trajectories measured; `to_file(method)` turns it into a calibration file."""

    provenance: dict                      # everything but method / percentile
    act_bits: dict[str, int]              # per quantized layer (int8_layers may differ from the config)
    stats: dict[tuple[str, int], _Stat]   # (layer, bucket) -> statistics
    weight_clips: dict[str, torch.Tensor]
    n_buckets: int
    mode: str

    def to_file(self, method: str = "mse", percentile: float = 99.9) -> dict:
        """The calibration file's content, with scales chosen by `method`."""
        if method not in METHODS:
            raise CalibrationError(f"unknown calibration method {method!r}; expected one of {list(METHODS)}")
        if not 0 < percentile <= 100:
            raise CalibrationError(f"percentile {percentile} is outside (0, 100]")
        scales, stats = {}, {}
        for name, bits in self.act_bits.items():
            per_bucket = [self.stats.get((name, b)) for b in range(self.n_buckets)]
            if all(st is None for st in per_bucket):
                raise CalibrationError(f"layer {name}: no {'deltas' if self.mode == 'modiff' else 'inputs'} "
                                       f"were observed; run more steps or samples")
            chosen = [None if st is None else choose_scale(st, method, bits, percentile) for st in per_bucket]
            scales[name] = _fill_buckets(chosen)
            stats[name] = {}
            for b, st in enumerate(per_bucket):
                if st is not None:
                    extra = {f"p{percentile:g}": _percentile(st.values, percentile)} if percentile != 99.9 else {}
                    stats[name][str(b)] = {"absmax": st.absmax, "p99.9": _percentile(st.values, 99.9), **extra,
                                           "count": st.count}
        return {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
            "provenance": {**self.provenance, "method": method, "percentile": percentile,
                           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
            "scales": scales,
            "weight_clips": {name: [round(float(r), 6) for r in c] for name, c in self.weight_clips.items()},
            "stats": stats,
            "weights": None,  # filled by write_calibration(weights=...)
        }


def observe(model, config: QuantConfig, *, scheduler: str = "ddim", steps: int = 25, samples: int = 64,
            batch_size: int = 16, seed: int = 1000, buckets: int = 1, subsample: int = DEFAULT_SUBSAMPLE,
            guidance_scale: float = 1.0, in_place: bool = False, progress: bool = True,
            rounded_weights: dict | None = None) -> Observations:
    """Run calibration trajectories for `model` (a models.LoadedModel) under `config` (with dynamic
    scales) and collect the statistics. The UNet is copied first unless in_place=True.
    rounded_weights: {layer: (codes, scale)} (GPTQ) used instead of nearest rounding for those layers."""

    from ..backends.torch_runner import TorchRunner
    from ..sampling import run_batches

    if config.mode == "fp":
        raise CalibrationError("mode 'fp' quantizes nothing; calibrate with --mode modiff or ptq")
    if buckets < 1 or samples < 1 or batch_size < 1 or subsample < 1:
        raise CalibrationError("buckets, samples, batch size and subsample must all be >= 1")
    if config.mode == "modiff" and steps < 2 and config.keyframe_interval != 1:
        raise CalibrationError(f"modiff quantizes deltas only from the second step on; --steps {steps} observes none")
    T = int(model.scheduler_config.get("num_train_timesteps", 1000))
    unet = model.unet if in_place else copy.deepcopy(model.unet)
    unet = quantize(unet, config.replace(scale_mode="dynamic")).eval()
    layers = [l for l in modiff_layers(unet) if not l.skipped]

    # weight clipping (and GPTQ weights) first: the trajectories then see the exported weights
    clips = {layer.name: weight_clip_ratios(layer.inner.weight, layer.weight_bits) for layer in layers}
    apply_weight_choices(unet, clips, rounded_weights)

    obs = _Observer(buckets, T, subsample, seed)
    hook = unet.register_forward_pre_hook(obs.pre_hook, with_kwargs=True)
    for layer in layers:
        layer.observer = obs
    runner = TorchRunner(unet)
    t0 = time.time()
    try:  # the trajectories of sampling's own batch loop; the observer records every delta
        run_batches(runner, model, scheduler, steps, samples, batch_size, seed, guidance_scale, progress,
                    desc=f"calibrate {config.tag}")
    finally:
        hook.remove()
        for layer in layers:
            layer.observer = None
        runner.reset()
    provenance = {
        "model": model.name, "model_hash": model.content_hash,
        "quant_config": config.replace(scale_mode="static").to_dict(),
        "scheduler": scheduler, "steps": steps, "seed": seed, "samples": samples, "batch_size": batch_size,
        "guidance_scale": guidance_scale, "buckets": buckets, "num_train_timesteps": T, "subsample": subsample,
        "conditioning": None if not model.conditional else (
            "random" if getattr(model, "prompt_states", None) is None else f"{len(model.prompt_states[0])} prompts"),
        "seconds": round(time.time() - t0, 1),
    }
    return Observations(provenance, {l.name: l.act_bits for l in layers}, obs.stats, clips, buckets, config.mode)


def calibrate(model, config: QuantConfig, *, method: str = "mse", percentile: float = 99.9, **observe_kwargs) -> dict:
    """observe() + to_file(): the calibration file's content for `model` under `config`."""
    if method not in METHODS:
        raise CalibrationError(f"unknown calibration method {method!r}; expected one of {list(METHODS)}")
    if not 0 < percentile <= 100:
        raise CalibrationError(f"percentile {percentile} is outside (0, 100]")
    return observe(model, config, **observe_kwargs).to_file(method, percentile)
