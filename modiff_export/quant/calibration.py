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

Rounded weights (recipe "recommended", every quantized layer): GPTQ codes and their per-channel
scales, computed on full-precision trajectories before the deltas are observed (so the scales are
those of the exported weights), go into a safetensors file beside the JSON (`weights_path`), named
and hashed in the JSON's "weights" entry; a layer listed there takes its weight scale from that file,
not from weight_clips. Written first; the JSON, written last, makes the pair valid.

File (JSON, schema "modiff-export/calibration", version 2; version 1 files, without "weights", still load):
    {"schema", "schema_version",
     "provenance": {"model", "model_hash", "quant_config" (scale_mode "static"), "scheduler",
                    "steps", "seed", "samples", "batch_size", "method", "percentile", "buckets",
                    "num_train_timesteps", "subsample", "created"},
     "scales":       {layer: [scale per bucket]},
     "weight_clips": {layer: [ratio per output channel]},
     "stats":        {layer: {bucket: {"absmax", "p99.9", "count"}}},   (bucket as a string key)
     "weights":      {"file", "sha256", "method": "gptq", "layers": [layer, ...]} | null}
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ConfigError, QuantConfig
from ..errors import ModiffExportError
from ..fsutil import atomic_write_bytes, atomic_write_text, read_json, sha256_file
from .quantization import (
    SCALE_FLOOR,
    fake_quantize,
    modiff_layers,
    qmax_for,
    quantize,
    set_static_scales,
    timestep_bucket,
)

SCHEMA = "modiff-export/calibration"
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
WEIGHTS_SUFFIX = ".weights.safetensors"
METHODS = ("absmax", "percentile", "mse")
# QuantConfig fields a calibration file must share with the config that uses it
MATCHED_FIELDS = ("mode", "weight_bits", "act_bits", "granularity", "error_compensation", "skip_layers", "int8_layers",
                  "weight_block_size")
DEFAULT_SUBSAMPLE = 20_000
ACT_CLIP_GRID = torch.linspace(0.02, 1.0, 50)       # mse search over clip ratios of the absmax
WEIGHT_CLIP_GRID = torch.linspace(0.5, 1.0, 21)      # per-channel weight clip ratios


class CalibrationError(ModiffExportError):
    """A calibration file that cannot be used (damaged, other model, other config) or a bad run."""


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

    clips = {}
    for layer in layers:  # weight clipping first: the trajectories then see the exported weights
        clips[layer.name] = weight_clip_ratios(layer.inner.weight, layer.weight_bits)
        layer.set_weight_clip(clips[layer.name])
        if rounded_weights and layer.name in rounded_weights:
            layer.set_rounded_weight(*rounded_weights[layer.name])

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


def weights_path(path: str | Path) -> Path:
    """The rounded-weights file beside calibration file `path`: x.json -> x.weights.safetensors."""
    path = Path(path)
    stem = path.name[:-5] if path.name.endswith(".json") else path.name
    return path.with_name(stem + WEIGHTS_SUFFIX)


def write_calibration(path: str | Path, data: dict, overwrite: bool = True,
                      weights: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> Path:
    """Validate and write atomically (temp file in the same folder, then rename; without `overwrite` a
    file that appeared at `path` meanwhile is left untouched and this is an error). `weights`
    ({layer: (codes, scale)}) go first into weights_path(path), then the JSON names and hashes them;
    if the JSON cannot be written, a weights file this call created is removed again."""
    from safetensors.torch import save

    path = Path(path)
    data = {**data, "weights": None}
    wpath, created = weights_path(path), False
    if weights:
        if path.name.endswith(WEIGHTS_SUFFIX):
            raise CalibrationError(f"{path}: a calibration file name cannot end in {WEIGHTS_SUFFIX}")
        tensors = {}
        for name, (codes, scale) in sorted(weights.items()):
            tensors[f"{name}.codes"] = codes.to(torch.int8).contiguous()
            tensors[f"{name}.scale"] = scale.to(torch.float32).contiguous()
        existed = wpath.exists()
        atomic_write_bytes(wpath, save(tensors, metadata={"schema": SCHEMA + "/weights"}), overwrite)
        created = not existed
        data["weights"] = {"file": wpath.name, "sha256": sha256_file(wpath), "method": "gptq",
                           "layers": sorted(weights)}
    try:
        _validate(data, path)
        atomic_write_text(path, json.dumps(data, indent=1) + "\n", overwrite)
    except BaseException:
        if created:
            wpath.unlink(missing_ok=True)
        raise
    return path


# -- loading -------------------------------------------------------------------------------------
def _short(h) -> str:
    h = str(h)
    algo, _, hexpart = h.partition(":")
    return f"{algo}:{hexpart[:12]}" if hexpart else h[:12]


def _positive_number(v) -> bool:
    """A finite number > 0 (JSON true/false are not numbers here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _validate(d, path: Path) -> None:
    def need(cond, what):
        if not cond:
            raise CalibrationError(f"{path}: {what}")

    need(isinstance(d, dict), "not a calibration file (expected a JSON object)")
    need(d.get("schema") == SCHEMA,
         f"schema is {d.get('schema')!r}, expected {SCHEMA!r} (a file from `cli.py calibrate`)")
    need(d.get("schema_version") in READABLE_VERSIONS,
         f"schema_version {d.get('schema_version')!r} is not supported (this tool reads {list(READABLE_VERSIONS)})")
    for key in ("provenance", "scales", "weight_clips"):
        need(isinstance(d.get(key), dict), f"missing or malformed field {key!r}; the file is damaged")
    p = d["provenance"]
    for key in ("model_hash", "quant_config", "buckets", "num_train_timesteps"):
        need(key in p, f"provenance.{key} is missing; the file is damaged")
    n = p["buckets"]
    need(isinstance(n, int) and not isinstance(n, bool) and n >= 1,
         f"provenance.buckets={n!r}; expected an integer >= 1")
    need(isinstance(p["num_train_timesteps"], int) and not isinstance(p["num_train_timesteps"], bool)
         and p["num_train_timesteps"] >= 1,
         f"provenance.num_train_timesteps={p['num_train_timesteps']!r}; expected an integer >= 1")
    need(set(d["weight_clips"]) <= set(d["scales"]) or not d["scales"],
         "weight_clips names layers that have no scales; the file is damaged")
    for name, s in d["scales"].items():
        need(isinstance(s, list) and len(s) == n and all(_positive_number(v) for v in s),
             f"scales[{name!r}] must be {n} positive finite numbers (one per bucket), got {str(s)[:80]}")
    for name, c in d["weight_clips"].items():
        need(isinstance(c, list) and c and all(_positive_number(v) and v <= 1 for v in c),
             f"weight_clips[{name!r}] must be ratios in (0, 1], got {str(c)[:80]}")
    w = d.get("weights")
    if w is not None:
        need(isinstance(w, dict) and isinstance(w.get("file"), str) and isinstance(w.get("sha256"), str)
             and w.get("method") == "gptq" and isinstance(w.get("layers"), list)
             and all(isinstance(x, str) for x in w["layers"]),
             'malformed field "weights" (expected file, sha256, method "gptq", layers); the file is damaged')
        need(w["file"] == weights_path(path).name,
             f'weights.file is {w["file"]!r}, expected {weights_path(path).name!r} (the name beside this file); '
             f"rename both files together")


@dataclass
class Calibration:
    path: Path
    data: dict

    @property
    def provenance(self) -> dict:
        return self.data["provenance"]

    @property
    def n_buckets(self) -> int:
        return int(self.provenance["buckets"])

    @property
    def num_train_timesteps(self) -> int:
        return int(self.provenance["num_train_timesteps"])

    @property
    def scales(self) -> dict[str, list[float]]:
        return self.data["scales"]

    @property
    def weight_clips(self) -> dict[str, list[float]]:
        return self.data["weight_clips"]

    @property
    def config(self) -> QuantConfig:
        return QuantConfig.from_dict(self.provenance["quant_config"])

    @property
    def rounded_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{layer: (codes int8, scale float32)} from the weights file beside this one (GPTQ), verified
        against the digest the JSON records; {} for files without rounded weights."""
        w = self.data.get("weights")
        if not w:
            return {}
        if "_rounded" not in self.__dict__:
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            f = self.path.with_name(w["file"])
            if not f.is_file():
                raise CalibrationError(f"{self.path}: its rounded weights {f.name} are missing (keep both files "
                                       f"together, or recalibrate)")
            digest = sha256_file(f)
            if digest != w["sha256"]:
                raise CalibrationError(f"{f}: content {_short(digest)} differs from {_short(w['sha256'])} recorded in "
                                       f"{self.path.name}; the files do not belong together")
            try:
                t = load_file(str(f))
            except (SafetensorError, OSError, ValueError) as e:
                raise CalibrationError(f"{f}: not a readable safetensors file ({e})") from None
            out = {}
            for name in w["layers"]:
                codes, scale = t.get(f"{name}.codes"), t.get(f"{name}.scale")
                if codes is None or scale is None or codes.dtype != torch.int8 or scale.dtype != torch.float32:
                    raise CalibrationError(f"{f}: no int8 codes / float32 scale for layer {name}; the file is damaged")
                out[name] = (codes, scale)
            self.__dict__["_rounded"] = out
        return self.__dict__["_rounded"]

    def apply_weights(self, layers) -> None:
        """Weight clips, then rounded weights, on quantized layers (PyTorch side and export alike)."""
        rounded = self.rounded_weights
        for layer in layers:
            if layer.skipped:
                continue
            if layer.name not in self.weight_clips:
                raise CalibrationError(f"{self.path}: no weight_clips entry for layer {layer.name}")
            clip = torch.tensor(self.weight_clips[layer.name], dtype=torch.float32)
            if clip.numel() != layer.inner.weight.shape[0]:
                raise CalibrationError(f"{self.path}: weight_clips[{layer.name!r}] has {clip.numel()} ratios, "
                                       f"the layer has {layer.inner.weight.shape[0]} output channels")
            layer.set_weight_clip(clip)
            if layer.name in rounded:
                try:
                    layer.set_rounded_weight(*rounded[layer.name])
                except ModiffExportError as e:
                    raise CalibrationError(f"{self.path}: {e}") from None

    def export_scales(self) -> dict:
        """What export.export_model(scales=...) takes."""
        return {"n_buckets": self.n_buckets, "num_train_timesteps": self.num_train_timesteps,
                "table": {k: list(v) for k, v in self.scales.items()}, "source": str(self.path)}

    def check_config(self, config: QuantConfig) -> None:
        """Refuse a config this file was not calibrated for (one line naming the file and the field)."""
        mine = self.config
        for name in MATCHED_FIELDS:
            a, b = getattr(mine, name), getattr(config, name)
            if a != b:
                hint = " and --recipe" if name == "int8_layers" else ""
                raise CalibrationError(f"{self.path}: calibrated for {name}={a!r}, but the config has {name}={b!r}; "
                                       f"recalibrate with the same options{hint}")

    def apply(self, unet: torch.nn.Module) -> None:
        """PyTorch side: weight clips and rounded weights, and (static configs) the static scales, on a
        UNet already quantized with a matching config, so it computes what the exported graphs compute."""
        config = getattr(unet, "modiff_config", None)
        if config is None:
            raise CalibrationError(f"{self.path}: apply() needs a UNet quantized with quantization.quantize()")
        self.check_config(config)
        if config.scale_mode == "static":
            set_static_scales(unet, self.scales, self.num_train_timesteps)
        self.apply_weights(modiff_layers(unet))


def load_calibration(path: str | Path, model_hash: str | None, config: QuantConfig | None) -> Calibration:
    """Read and check a calibration file against the model (content hash) and config that will use it.
    Any problem raises CalibrationError with one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"{path}: missing; write it with `cli.py calibrate --out {path}`")
    data = read_json(path, CalibrationError, "the file is truncated or damaged")
    _validate(data, path)
    try:
        cal = Calibration(path, data)
        _ = cal.config
    except (ConfigError, TypeError) as e:
        raise CalibrationError(f"{path}: provenance.quant_config is invalid ({e})") from None
    if model_hash is not None and data["provenance"]["model_hash"] != model_hash:
        raise CalibrationError(f"{path}: made for model {_short(data['provenance']['model_hash'])}, "
                               f"but this model is {_short(model_hash)}; calibrate this model")
    if config is not None:
        cal.check_config(config)
    return cal
