"""Observing calibration trajectories: static delta scales per layer and timestep bucket, and per-channel
weight clipping (docs/design.md section 2).

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

The scale searches: quant/search.py. The file format, writing and loading: calibration/file.py.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from ..backends.torch_runner import TorchRunner
from ..config import QuantConfig
from ..quant.quantization import WeightChoices, apply_weight_choices, modiff_layers, quantize
from ..quant.scales import timestep_bucket
from ..sampling import Trajectories, resolve_scheduler, run_batches
from ..quant.search import METHODS, DeltaStats, choose_scale, fill_buckets, percentile_of, weight_clip_ratios
from .file import SCHEMA, SCHEMA_VERSION, CalibrationError

DEFAULT_SUBSAMPLE = 20_000  # |delta| values kept per layer and bucket
# `cli.py calibrate`'s defaults: noise seeds far from the evaluation seeds
CALIBRATION_TRAJECTORIES = Trajectories("auto", steps=25, samples=64, batch_size=16, seed=1000)


class _Observer:
    """Collects per-(layer, bucket) statistics; the bucket comes from the timestep of the current UNet call."""

    def __init__(self, n_buckets: int, num_train_timesteps: int, subsample: int, seed: int):
        self.n_buckets, self.T, self.subsample = n_buckets, num_train_timesteps, subsample
        self.bucket = 0
        self.stats: dict[tuple[str, int], DeltaStats] = {}
        self.gen = torch.Generator().manual_seed(int(seed) + 7919)

    def pre_hook(self, unet, args, kwargs) -> None:
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        t = t.flatten()[0].item() if torch.is_tensor(t) else float(t)
        self.bucket = timestep_bucket(t, self.n_buckets, self.T)

    def __call__(self, layer, tensor: torch.Tensor) -> None:
        self.stats.setdefault((layer.name, self.bucket), DeltaStats()).add(tensor, self.subsample, self.gen)


@dataclass
class Observations:
    """What calibration trajectories measured; `to_file(method)` turns it into a calibration file."""

    provenance: dict                      # everything but method / percentile
    act_bits: dict[str, int]              # per quantized layer (int8_layers may differ from the config)
    stats: dict[tuple[str, int], DeltaStats]   # (layer, bucket) -> statistics
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
            scales[name] = fill_buckets(chosen)
            stats[name] = {}
            for b, st in enumerate(per_bucket):
                if st is not None:
                    extra = {f"p{percentile:g}": percentile_of(st.values, percentile)} if percentile != 99.9 else {}
                    stats[name][str(b)] = {"absmax": st.absmax, "p99.9": percentile_of(st.values, 99.9), **extra,
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


def observe(model, config: QuantConfig, traj: Trajectories = CALIBRATION_TRAJECTORIES, *, buckets: int = 1,
            subsample: int = DEFAULT_SUBSAMPLE, in_place: bool = False, progress: bool = True,
            rounded_weights: dict | None = None) -> Observations:
    """Run calibration trajectories `traj` for `model` (a models.LoadedModel) under `config` (with dynamic
    scales) and collect the statistics. The UNet is copied first unless in_place=True.
    rounded_weights: {layer: (codes, scale)} (GPTQ) used instead of nearest rounding for those layers."""

    if config.mode == "fp":
        raise CalibrationError("mode 'fp' quantizes nothing; calibrate with --mode modiff or ptq")
    if buckets < 1 or subsample < 1:
        raise CalibrationError("buckets and subsample must be >= 1")
    if config.mode == "modiff" and traj.steps < 2 and config.keyframe_interval != 1:
        raise CalibrationError(f"modiff quantizes deltas only from the second step on; --steps {traj.steps} observes none")
    T = int(model.scheduler_config.get("num_train_timesteps", 1000))
    unet = model.unet if in_place else copy.deepcopy(model.unet)
    unet = quantize(unet, config.replace(scale_mode="dynamic")).eval()
    layers = [l for l in modiff_layers(unet) if not l.skipped]

    # weight clipping (and GPTQ weights) first: the trajectories then see the exported weights
    clips = {layer.name: weight_clip_ratios(layer.inner.weight, layer.weight_bits) for layer in layers}
    apply_weight_choices(unet, WeightChoices(clips, rounded_weights or {}))

    obs = _Observer(buckets, T, subsample, traj.seed)
    hook = unet.register_forward_pre_hook(obs.pre_hook, with_kwargs=True)
    for layer in layers:
        layer.observer = obs
    runner = TorchRunner(unet)
    t0 = time.time()
    try:  # the trajectories of sampling's own batch loop; the observer records every delta
        run_batches(runner, model, traj, progress, desc=f"calibrate {config.tag}")
    finally:
        hook.remove()
        for layer in layers:
            layer.observer = None
        runner.reset()
    provenance = {
        "model": model.name, "model_hash": model.content_hash,
        "quant_config": config.replace(scale_mode="static").to_dict(),
        "scheduler": resolve_scheduler(traj.scheduler, model.scheduler_config), "steps": traj.steps,
        "seed": traj.seed, "samples": traj.samples,
        "batch_size": traj.batch_size, "guidance_scale": traj.guidance_scale, "buckets": buckets,
        "num_train_timesteps": T, "subsample": subsample,
        "conditioning": None if not model.conditional else (
            "random" if traj.prompts is None else f"{len(traj.prompts[0])} prompts"),
        "seconds": round(time.time() - t0, 1),
    }
    return Observations(provenance, {l.name: l.act_bits for l in layers}, obs.stats, clips, buckets, config.mode)


def calibrate(model, config: QuantConfig, traj: Trajectories = CALIBRATION_TRAJECTORIES, *, method: str = "mse",
              percentile: float = 99.9, **observe_kwargs) -> dict:
    """observe() + to_file(): the calibration file's content for `model` under `config`."""
    if method not in METHODS:
        raise CalibrationError(f"unknown calibration method {method!r}; expected one of {list(METHODS)}")
    if not 0 < percentile <= 100:
        raise CalibrationError(f"percentile {percentile} is outside (0, 100]")
    return observe(model, config, traj, **observe_kwargs).to_file(method, percentile)
