"""The calibration file: schema, atomic writing, loading with every check, and applying it
(docs/design.md section 2). calibration/observe.py computes what goes in.

    write_calibration(path, data, weights=...)   -> JSON (+ weights file) by temp file + rename
    load_calibration(path, model_hash, config)   -> Calibration (refuses other models / configs)
    Calibration.apply(unet)                      -> PyTorch side: what export bakes into the graphs

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

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from ..config import ConfigError, QuantConfig
from ..errors import ModiffExportError
from ..fsutil import atomic_write_bytes, atomic_write_text, read_json, sha256_file
from ..quant.quantization import WeightChoices, apply_weight_choices, set_static_scales
from ..quant.scales import ScaleTable

SCHEMA = "modiff-export/calibration"
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
WEIGHTS_SUFFIX = ".weights.safetensors"
# QuantConfig fields a calibration file must share with the config that uses it
MATCHED_FIELDS = ("mode", "weight_bits", "act_bits", "granularity", "error_compensation", "skip_layers", "int8_layers",
                  "weight_block_size")

class CalibrationError(ModiffExportError):
    """A calibration file that cannot be used (damaged, other model, other config) or a bad run."""


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

    @cached_property
    def rounded_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{layer: (codes int8, scale float32)} from the weights file beside this one (GPTQ), verified
        against the digest the JSON records; {} for files without rounded weights. Read once."""
        w = self.data.get("weights")
        if not w:
            return {}
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
        return out

    @property
    def scale_table(self) -> ScaleTable:
        """The static delta scales, per layer (calibration order = the model's layer order) and bucket."""
        return ScaleTable(str(self.path), self.n_buckets, self.num_train_timesteps, tuple(self.scales),
                          {k: tuple(float(x) for x in v) for k, v in self.scales.items()})

    @property
    def weights(self) -> WeightChoices:
        """The weight clips and rounded (GPTQ) weights, what export bakes in and apply() sets."""
        return WeightChoices(self.weight_clips, self.rounded_weights)

    def export_kwargs(self, config: QuantConfig) -> dict:
        """What export.export_model takes from this file for `config`: the weights (clips, GPTQ codes)
        always, the static delta scales only for a static config."""
        return {"weights": self.weights, "scales": self.scale_table if config.scale_mode == "static" else None}

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
            set_static_scales(unet, self.scale_table)
        try:
            apply_weight_choices(unet, self.weights)
        except ModiffExportError as e:
            raise CalibrationError(f"{self.path}: {e}") from None


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
