"""Quantization configuration: one frozen, validated dataclass (torchao style)."""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass

from .errors import ModiffExportError

MODES = ("fp", "ptq", "modiff")
SCALE_MODES = ("dynamic", "static")
REUSE_FORECASTS = ("none", "linear", "taylor")
GRANULARITIES = ("tensor", "sample")


class ConfigError(ModiffExportError, ValueError):
    """A QuantConfig field has a value outside its allowed set."""


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"QuantConfig.{name}={value!r} is not allowed; expected one of {list(allowed)}")


@dataclass(frozen=True)
class QuantConfig:
    """What MoDiff does to every Conv2d/Linear of a UNet (docs/design.md section 1).

    mode: "fp" (no quantization), "ptq" (plain fake quantization of inputs and weights,
          no caches) or "modiff" (quantize the change of the input, with caches).
    weight_bits / act_bits: 2..8, symmetric quantizers.
    scale_mode: "dynamic" (absmax at run time) or "static" (calibrated scales).
    granularity: "sample" (one activation scale per sample, batch-invariant, the default)
                 or "tensor" (one scale for the whole batch, the paper's setting).
    error_compensation: a_hat += Q(x - a_hat) (True, the paper) or a_hat = x (False).
    keyframe_interval: re-run the full-precision first step every K calls (None: never).
    skip_layers: fnmatch patterns of layer names left in full precision.
    int8_layers: fnmatch patterns of layer names kept at 8/8 bits.
    weight_block_size: block size along the input dimension for Linear weights (INT4 block
          quantization for TensorRT weight-only INT4); None = per output channel. A positive
          even number (16, 32, 64, 128, ...), only with weight_bits <= 4. Convs stay per channel.
    reuse_interval / reuse_depth: block reuse (docs/design.md section 1.1): within a trajectory only every
          N-th call (the first included) computes the whole model; on the others the deep branch is not
          computed and its last output is reused: UNets, everything inside the outer D down/up block pairs
          (DeepCache); transformers, the blocks between the first D and the last D (their residual is
          reused; D = 0 reuses every block). Both None (no reuse) or both integers (interval >= 1, depth >= 0; the
          model decides which depths it takes); any mode (fp: DeepCache itself).
    reuse_compensation: False is the ablation where the deep (reused) layers update a_hat = x on their
          full steps (no error compensation there); True (default) keeps MoDiff's a_hat += Q(x - a_hat).
    reuse_forecast: what a reused call reads as the deep branch's output (docs/design.md section 1.2):
          "none" (DeepCache: the last full call's feature), "linear" (extrapolated from the last two full
          calls: F + k (F - F_prev) / N on the k-th reused call after a full call) or "taylor" (second
          order from the last three, TaylorSeer's finite differences; quant/forecast.py).
    reuse_warmup: the first W calls of a trajectory are full (the features change fastest there, and the
          forecast gets its differences from them: TaylorSeer's disable_cache_before_step); then every N-th.
    """

    mode: str = "modiff"
    weight_bits: int = 8
    act_bits: int = 8
    scale_mode: str = "dynamic"
    granularity: str = "sample"
    error_compensation: bool = True
    keyframe_interval: int | None = None
    skip_layers: tuple[str, ...] = ()
    int8_layers: tuple[str, ...] = ()
    weight_block_size: int | None = None
    reuse_interval: int | None = None
    reuse_depth: int | None = None
    reuse_compensation: bool = True
    reuse_forecast: str = "none"
    reuse_warmup: int = 0

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, MODES)
        _check_choice("scale_mode", self.scale_mode, SCALE_MODES)
        _check_choice("granularity", self.granularity, GRANULARITIES)
        for name in ("weight_bits", "act_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 8:
                raise ConfigError(f"QuantConfig.{name}={v!r} is not allowed; expected an integer in 2..8")
        if not isinstance(self.error_compensation, bool):
            raise ConfigError(f"QuantConfig.error_compensation={self.error_compensation!r}; expected True or False")
        k = self.keyframe_interval
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ConfigError(f"QuantConfig.keyframe_interval={k!r} is not allowed; expected None or an integer >= 1")
        for name in ("skip_layers", "int8_layers"):
            v = getattr(self, name)
            if not isinstance(v, (tuple, list)) or not all(isinstance(p, str) for p in v):
                raise ConfigError(f"QuantConfig.{name}={v!r}; expected a tuple of name patterns (strings)")
            object.__setattr__(self, name, tuple(v))
        bs = self.weight_block_size
        if bs is not None:
            if isinstance(bs, bool) or not isinstance(bs, int) or bs < 2 or bs % 2:
                raise ConfigError(f"QuantConfig.weight_block_size={bs!r} is not allowed; expected None or a positive "
                                  f"multiple of 2 (e.g. 16, 32, 64, 128)")
            if self.weight_bits > 4:
                raise ConfigError(f"QuantConfig.weight_block_size={bs!r} needs weight_bits <= 4 (INT4 block "
                                  f"quantization), got weight_bits={self.weight_bits}; use weight_block_size=None")

        self._check_reuse()

    def _check_reuse(self) -> None:
        for name, low in (("reuse_interval", 1), ("reuse_depth", 0)):  # depth 0: transformers only (reuse.py)
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise ConfigError(f"QuantConfig.{name}={v!r} is not allowed; expected None or an integer >= {low}")
        if (self.reuse_interval is None) != (self.reuse_depth is None):
            raise ConfigError(f"QuantConfig.reuse_interval={self.reuse_interval!r} and reuse_depth="
                              f"{self.reuse_depth!r}: block reuse needs both (or neither)")
        if self.reuses and self.keyframe_interval is not None:
            raise ConfigError("QuantConfig.keyframe_interval cannot be combined with block reuse (reuse_interval); "
                              "use one of them")
        if self.reuses and self.scale_mode == "static":
            raise ConfigError("QuantConfig.scale_mode='static' cannot be combined with block reuse: calibrated scales "
                              "fit one-step deltas, a reused layer's delta spans several steps; use dynamic scales")
        if not isinstance(self.reuse_compensation, bool):
            raise ConfigError(f"QuantConfig.reuse_compensation={self.reuse_compensation!r}; expected True or False")
        _check_choice("reuse_forecast", self.reuse_forecast, REUSE_FORECASTS)
        w = self.reuse_warmup
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ConfigError(f"QuantConfig.reuse_warmup={w!r} is not allowed; expected an integer >= 0")
        if w and not self.reuses:
            raise ConfigError(f"QuantConfig.reuse_warmup={w} delays block reuse; it needs reuse_interval/reuse_depth")
        if self.reuse_forecast != "none" and not self.reuses:
            raise ConfigError(f"QuantConfig.reuse_forecast={self.reuse_forecast!r} forecasts the reused deep branch; "
                              f"it needs reuse_interval/reuse_depth")
        if not self.reuse_compensation and (not self.reuses or self.mode != "modiff"):
            raise ConfigError("QuantConfig.reuse_compensation=False is an ablation of MoDiff with block reuse; it "
                              "needs mode 'modiff' and reuse_interval/reuse_depth")

    @property
    def reuses(self) -> bool:
        """Block reuse is on (a shallow graph is exported)."""
        return self.reuse_interval is not None

    # -- per-layer decisions -------------------------------------------------------------
    def skips(self, layer_name: str) -> bool:
        return any(fnmatch.fnmatchcase(layer_name, p) for p in self.skip_layers)

    def bits_for(self, layer_name: str) -> tuple[int, int]:
        """(weight_bits, act_bits) for one layer, after the int8_layers override."""
        if any(fnmatch.fnmatchcase(layer_name, p) for p in self.int8_layers):
            return 8, 8
        return self.weight_bits, self.act_bits

    @property
    def tag(self) -> str:
        """Short name used in folder names and reports, e.g. 'modiff-w8a4'."""
        reuse = f"-r{self.reuse_interval}d{self.reuse_depth}" if self.reuses else ""
        reuse += "" if self.reuse_compensation else "-nocomp"
        reuse += {"none": "", "linear": "-lin", "taylor": "-tay"}[self.reuse_forecast]
        reuse += f"-wu{self.reuse_warmup}" if self.reuse_warmup else ""
        if self.mode == "fp":
            return f"fp{reuse}"
        block = f"-b{self.weight_block_size}" if self.weight_block_size else ""
        return f"{self.mode}-w{self.weight_bits}a{self.act_bits}{block}{reuse}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["skip_layers"], d["int8_layers"] = list(self.skip_layers), list(self.int8_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a QuantConfig must be given as a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        extra = {str(k) for k in d} - known
        if extra:
            raise ConfigError(f"unknown QuantConfig fields {sorted(extra)}; known: {sorted(known)}")
        d = dict(d)
        for name in ("skip_layers", "int8_layers"):
            if isinstance(d.get(name), list):  # JSON has lists; anything else is refused by __post_init__
                d[name] = tuple(d[name])
        return cls(**d)

    def replace(self, **changes) -> "QuantConfig":
        return dataclasses.replace(self, **changes)
