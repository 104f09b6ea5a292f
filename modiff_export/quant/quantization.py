"""MoDiff in PyTorch: the reference every other backend is checked against (docs/design.md section 1).

`quantize(unet, config)` swaps every nn.Conv2d / nn.Linear for a `MoDiffLayer`. A MoDiff layer
keeps two caches, `a_hat` (last reconstructed input) and `o_hat` (last output):

    first call:  a_hat = x;          out = f(Wq, x) + b;                 o_hat = out
    later calls: d = x - a_hat;      s = absmax(d) / qmax  (or static)
                 c = clamp(round(d / s), -qmax-1, qmax)           # integer codes
                 a_hat = a_hat + c*s  (error compensation; a_hat = x without it)
                 out = o_hat + f(Wq, c) * s                        # no bias: f is linear
                 o_hat = out

`f(Wq, c) * s` equals `f(Wq, c*s)` exactly in real arithmetic; computing it this way is the form
the exported graph uses (unit-scale Q/DQ, rescale after the Conv/Gemm), so the two backends do
the same float operations in the same order.
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import QuantConfig
from ..errors import ModiffExportError
from . import reuse
from .scales import ScaleTable, timestep_bucket

SCALE_FLOOR = 1e-8


class MoDiffError(ModiffExportError, RuntimeError):
    """Wrong use of a quantized model (bad batch, missing caches, nothing to quantize)."""


def qmax_for(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def absmax_scale(x: torch.Tensor, bits: int, per_sample: bool) -> torch.Tensor:
    """Symmetric scale s = absmax / qmax (floor 1e-8). Shape [B, 1, ...] per sample, [] per tensor."""
    if per_sample:
        amax = x.detach().abs().amax(dim=tuple(range(1, x.dim())), keepdim=True)
    else:
        amax = x.detach().abs().amax()
    return torch.clamp(amax / qmax_for(bits), min=SCALE_FLOOR)


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (as float) clamp(round(x / s), -qmax-1, qmax); round is half-to-even."""
    q = qmax_for(bits)
    return torch.clamp(torch.round(x / scale), -q - 1, q)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    return quantize_codes(x, scale, bits) * scale


def weight_scale(w: torch.Tensor, bits: int, clip: torch.Tensor | None = None) -> torch.Tensor:
    """Per-output-channel symmetric scale, shape [Cout]; `clip` (0, 1] shrinks the absmax."""
    amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1)
    if clip is not None:
        amax = amax * clip
    return torch.clamp(amax / qmax_for(bits), min=SCALE_FLOOR)


def block_weight_scale(w: torch.Tensor, bits: int, block_size: int, clip: torch.Tensor | None = None) -> torch.Tensor:
    """Per (output channel, input block) symmetric scale of a Linear weight [Cout, Cin], shape
    [Cout, Cin // block_size]: s[o, k] = absmax(W[o, k*bs:(k+1)*bs]) / qmax (floor 1e-8).
    `clip` [Cout] in (0, 1] shrinks every block of its output channel. Cin must divide by bs."""
    cout, cin = w.shape
    if cin % block_size:
        raise MoDiffError(f"block_weight_scale: input dim {cin} is not a multiple of the block size {block_size}")
    amax = w.detach().abs().reshape(cout, cin // block_size, block_size).amax(dim=2)
    if clip is not None:
        amax = amax * clip.reshape(-1, 1)
    return torch.clamp(amax / qmax_for(bits), min=SCALE_FLOOR)


def _per_channel(s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The weight scale broadcast against w: [Cout, 1, 1, 1] for conv, [Cout, 1] for linear, and
    [Cout, Cin] (each block's scale repeated over its block) for block scales [Cout, Cin // bs]."""
    if s.dim() == 2 and w.dim() == 2:
        return s.repeat_interleave(w.shape[1] // s.shape[1], dim=1)
    return s.reshape(-1, *([1] * (w.dim() - 1)))


class MoDiffLayer(nn.Module):
    """A Conv2d or Linear under MoDiff / PTQ / FP, with its caches.

    Attributes the exporter and calibrator use:
      a_hat, o_hat   the caches (None until the first call)
      phase          None (automatic), "prime" or "step": forces the branch (used when tracing)
      scale_override a tensor used as the activation scale instead of the table (static export)
      observer       callable(layer, tensor_to_quantize) called before quantizing (calibration)
      static_scales  [n_buckets] activation scales for scale_mode="static"; bucket picks one
      delta_clip     constant factor (0, 1] on the dynamic absmax scale (a calibrated clip ratio)
      block_size     Linear weights with config.weight_block_size (<= 4 bits, Cin divisible by it):
                     w_scale is [Cout, Cin // block_size] (one scale per output channel and input
                     block); None: per output channel, w_scale is [Cout]
      weight_format  "int8-per-channel" or "int4-block<bs>" (what the exported graph stores)
      weight_note    why a requested block layout was not used (None otherwise)
    """

    def __init__(self, inner: nn.Module, name: str, config: QuantConfig):
        super().__init__()
        if not isinstance(inner, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"{name}: MoDiffLayer wraps nn.Conv2d or nn.Linear, got {type(inner).__name__}")
        self.inner, self.name, self.config = inner, name, config
        self.skipped = config.mode == "fp" or config.skips(name)
        self.weight_bits, self.act_bits = config.bits_for(name)
        self.block_size, self.weight_note = self._choose_block_size(inner, name, config)
        self.register_buffer("w_scale", self._weight_scale(), persistent=False)
        self.register_buffer("static_scales", torch.empty(0), persistent=False)
        self.register_buffer("_wq", None, persistent=False)  # Wq, computed once on first use
        self.bucket = 0
        self.phase: str | None = None
        self.scale_override: torch.Tensor | None = None
        self.observer: Callable[["MoDiffLayer", torch.Tensor], None] | None = None
        self.weight_rounding: str | None = None  # "gptq" after set_rounded_weight; None: nearest
        self.delta_clip = 1.0  # constant factor on the dynamic scale (improvements.py); 1.0: plain absmax
        self.export_qdq = False  # set by the exporter: emit QuantizeLinear/DequantizeLinear ops
        self.compensates = config.error_compensation  # False: a_hat = x (reuse.py turns it off for deep layers)
        self.reset()

    # -- state -----------------------------------------------------------------------------
    @property
    def uses_cache(self) -> bool:
        return not self.skipped and self.config.mode == "modiff"

    def reset(self) -> None:
        self.a_hat: torch.Tensor | None = None
        self.o_hat: torch.Tensor | None = None
        self.calls = 0

    def _choose_block_size(self, inner: nn.Module, name: str, config: QuantConfig) -> tuple[int | None, str | None]:
        bs = config.weight_block_size
        if bs is None or not isinstance(inner, nn.Linear) or self.skipped or self.weight_bits > 4:
            return None, None
        cin = inner.weight.shape[1]
        if cin % bs:
            return None, (f"input dim {cin} is not a multiple of weight_block_size {bs}: "
                          f"per-output-channel scales in an int8 container instead")
        return bs, None

    @property
    def weight_format(self) -> str:
        return f"int4-block{self.block_size}" if self.block_size is not None else "int8-per-channel"

    def _weight_scale(self, clip: torch.Tensor | None = None) -> torch.Tensor:
        w = self.inner.weight
        if self.block_size is not None:
            return block_weight_scale(w, self.weight_bits, self.block_size, clip)
        return weight_scale(w, self.weight_bits, clip)

    def set_weight_clip(self, clip: torch.Tensor) -> None:
        """Per-channel clip ratios in (0, 1] chosen by calibration (MSE search); with block scales
        an output channel's ratio applies to every block of it."""
        self.w_scale = self._weight_scale(clip.to(self.inner.weight))
        self._wq = None

    @torch.no_grad()
    def set_rounded_weight(self, codes: torch.Tensor, scale: torch.Tensor, method: str = "gptq") -> None:
        """Use pre-rounded weights (GPTQ from calibration, recipe.py): codes [Cout, ...] on the
        per-channel grid scale [Cout]. The float weight becomes codes * scale, which re-quantizes to
        `codes` exactly, so the PyTorch reference and the exported int8 initializers agree."""
        w = self.inner.weight
        if self.skipped or self.block_size is not None:
            raise MoDiffError(f"{self.name}: rounded weights need a quantized layer with per-channel scales")
        if tuple(codes.shape) != tuple(w.shape) or tuple(scale.shape) != (w.shape[0],):
            raise MoDiffError(f"{self.name}: rounded weights {tuple(codes.shape)} / scales {tuple(scale.shape)} do "
                              f"not fit the layer's weight {tuple(w.shape)}")
        q = qmax_for(self.weight_bits)
        if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()) or int(codes.abs().max()) > q + 1:
            raise MoDiffError(f"{self.name}: rounded weights out of range for {self.weight_bits} bits "
                              f"(codes beyond +-{q} or scales not positive)")
        self.w_scale = scale.to(w).clone()
        w.copy_(codes.to(w) * _per_channel(self.w_scale, w))
        self._wq = None
        self.weight_rounding = method
        if not torch.equal(self.weight_codes(), codes.to(w)):
            raise MoDiffError(f"{self.name}: rounded weights do not re-quantize to themselves (codes beyond "
                              f"the {self.weight_bits}-bit range?)")

    def weight_codes(self) -> torch.Tensor:
        w = self.inner.weight
        return quantize_codes(w, _per_channel(self.w_scale, w), self.weight_bits)

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_codes() * _per_channel(self.w_scale, self.inner.weight)

    def _weight(self) -> torch.Tensor:
        """Wq. When exporting, the exporter has overwritten the parameter with Wq in place (no second
        float copy of the weights; Wq re-quantizes to itself), so the traced graph reads it as a
        constant and graph_passes.quantize_weight_constants stores it as int8 + per-channel
        DequantizeLinear (or, with block scales, int4 + blocked DequantizeLinear)."""
        if self.export_qdq:
            return self.inner.weight
        if self._wq is None:  # weights are quantized once, not on every call
            self._wq = self.quantized_weight().detach()
        return self._wq

    @torch.no_grad()
    def bake_weight(self) -> None:
        """Overwrite the float weight with Wq (idempotent: w_scale is kept, Wq quantizes to itself)."""
        if not self.skipped:
            self.inner.weight.copy_(self.quantized_weight())

    def _codes(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """clamp(round(t / s)) as floats; when exporting: Div -> Clip (b < 8) -> unit-scale Q/DQ."""
        if not self.export_qdq:
            return quantize_codes(t, s, self.act_bits)
        u = t / s
        if self.act_bits < 8:
            q = qmax_for(self.act_bits)
            u = torch.clamp(u, -q - 1, q)
        return torch.fake_quantize_per_tensor_affine(u, 1.0, 0, -128, 127)

    # -- math ------------------------------------------------------------------------------
    def _linear_op(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(self.inner, nn.Conv2d):
            return self.inner._conv_forward(x, w, bias)
        return F.linear(x, w, bias)

    def _act_scale(self, t: torch.Tensor) -> torch.Tensor:
        if self.scale_override is not None:
            return self.scale_override
        if self.config.scale_mode == "static":
            if self.static_scales.numel() == 0:
                raise MoDiffError(f"layer {self.name}: scale_mode='static' but no calibrated scales were loaded")
            return self.static_scales[min(self.bucket, self.static_scales.numel() - 1)]
        s = absmax_scale(t, self.act_bits, self.config.granularity == "sample")
        return s if self.delta_clip == 1.0 else s * self.delta_clip

    def _quantized_linear(self, t: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """f(Wq, Q(t)) computed as f(Wq, codes) * s (+ bias); returns (output, Q(t))."""
        if self.observer is not None:
            self.observer(self, t)
        s = self._act_scale(t)
        codes = self._codes(t, s)
        out = self._linear_op(codes, self._weight(), None) * s
        if bias is not None:
            out = out + (bias.reshape(-1, 1, 1) if isinstance(self.inner, nn.Conv2d) else bias)
        return out, codes * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.skipped:
            return self.inner(x)
        bias = self.inner.bias
        if self.config.mode == "ptq":
            return self._quantized_linear(x, bias)[0]
        first = self.a_hat is None
        if self.phase is not None:
            first = self.phase == "prime"
        elif self.config.keyframe_interval is not None:
            first = first or self.calls % self.config.keyframe_interval == 0
        if first:
            self.a_hat = x
            out = self._linear_op(x, self._weight(), bias)
        else:
            if self.a_hat is None or self.o_hat is None:
                raise MoDiffError(f"layer {self.name}: step called with empty caches; run the prime step first")
            if x.shape != self.a_hat.shape:
                raise MoDiffError(
                    f"layer {self.name}: input shape {tuple(x.shape)} does not match the cached "
                    f"{tuple(self.a_hat.shape)}; call reset_caches(unet) before a new batch")
            delta, q = self._quantized_linear(x - self.a_hat, None)
            self.a_hat = self.a_hat + q if self.compensates else x
            out = self.o_hat + delta
        self.o_hat = out
        self.calls += 1
        return out

    def extra_repr(self) -> str:
        c = self.config
        if self.skipped:
            return f"{self.name}: fp"
        return f"{self.name}: {c.mode} W{self.weight_bits}A{self.act_bits} {c.scale_mode}/{c.granularity}"


# -- model-level API ----------------------------------------------------------------------------
def quantize(unet: nn.Module, config: QuantConfig) -> nn.Module:
    """Wrap every Conv2d/Linear of `unet` (in place) and return it. Weights are quantized once."""
    if not isinstance(config, QuantConfig):
        raise TypeError(f"quantize() needs a QuantConfig, got {type(config).__name__}")
    if any(isinstance(m, MoDiffLayer) for m in unet.modules()):
        raise MoDiffError("this model is already quantized; load a fresh copy to quantize it again")
    targets = [(n, m) for n, m in unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not targets:
        raise MoDiffError(f"{type(unet).__name__} has no Conv2d or Linear layer to quantize")
    names = [n for n, _ in targets]
    for option in ("skip_layers", "int8_layers"):
        unmatched = [p for p in getattr(config, option) if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unmatched:
            raise MoDiffError(f"{option} pattern(s) {unmatched} match no Conv2d/Linear layer of {type(unet).__name__} "
                              f"(names look like {names[0]!r}, {names[-1]!r})")
    if config.mode != "fp" and all(config.skips(n) for n in names):
        raise MoDiffError(f"skip_layers {list(config.skip_layers)} leave no layer quantized; use mode 'fp' for an "
                          f"unquantized model")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, child, MoDiffLayer(module, name, config))
    if config.reuses:  # DeepCache-style block reuse (reuse.py)
        state = reuse.install(unet, config.reuse_interval, config.reuse_depth, config.reuse_forecast,
                              config.reuse_warmup)
        for layer in modiff_layers(unet):
            layer.compensates = layer.compensates and (config.reuse_compensation or not state.is_deep(layer.name))
    unet.modiff_config = config
    unet.modiff_last_timestep = None
    unet.register_forward_pre_hook(_before_call, with_kwargs=True)
    return unet


def starts_trajectory(last_timestep: float | None, timestep: float, last_shape=None, shape=None) -> bool:
    """The new-trajectory rule (docs/design.md section 1) the quantized model, every runner and the
    diffusers drop-in share: caches are valid within one trajectory, every sampler's timesteps are
    non-increasing within one, so a call with a timestep above the previous call's (or with other input
    shapes, e.g. another batch) starts a new one; so does the first call."""
    return last_timestep is None or float(timestep) > last_timestep or last_shape != shape


def call_role(i: int, keyframe_interval: int | None, reuse_interval: int | None, cached: bool,
              reuse_warmup: int = 0) -> str:
    """What call `i` (0-based) of a trajectory runs: "prime", "step" or "shallow" (block reuse). The rule
    every runner schedules by and the cost accounting counts: call 0 and every keyframe is a prime; with
    block reuse the first `reuse_warmup` calls are full, then every call whose distance from the warmup's
    end is not a multiple of the interval is shallow; the other calls are steps (or primes for models
    without caches: fp/ptq)."""
    if i == 0 or (keyframe_interval is not None and i % keyframe_interval == 0):
        return "prime"
    if reuse_interval is not None and reuse.reuses_call(i, reuse_interval, reuse_warmup):
        return "shallow"
    return "step" if cached else "prime"


def modiff_layers(unet: nn.Module) -> Iterator[MoDiffLayer]:
    return (m for m in unet.modules() if isinstance(m, MoDiffLayer))


def reset_caches(unet: nn.Module) -> None:
    """Empty every cache: call at the start of every trajectory / batch / request. (A call whose
    timestep is above the previous call's starts a new trajectory by itself: see _before_call.)"""
    for layer in modiff_layers(unet):
        layer.reset()
    if getattr(unet, "modiff_reuse", None) is not None:
        unet.modiff_reuse.reset()
    unet.modiff_last_timestep = None


@dataclass(frozen=True)
class CacheEntry:
    layer: str
    kind: str  # "a_hat" or "o_hat"
    tensor: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, ...] | None:
        return None if self.tensor is None else tuple(self.tensor.shape)

    @property
    def dtype(self) -> torch.dtype | None:
        return None if self.tensor is None else self.tensor.dtype


def list_caches(unet: nn.Module) -> list[CacheEntry]:
    """Every cache in a fixed order (module order, a_hat then o_hat): the exporter's I/O order."""
    out = []
    for layer in modiff_layers(unet):
        if layer.uses_cache:
            out += [CacheEntry(layer.name, "a_hat", layer.a_hat), CacheEntry(layer.name, "o_hat", layer.o_hat)]
    return out


@dataclass(frozen=True, eq=False)
class WeightChoices:
    """How calibration chose a model's weights, handed to export and to the PyTorch reference as one object:
    per-channel clip ratios {layer: [ratio per output channel]} (None: the absmax grid; when given, every
    quantized layer needs one) and pre-rounded weights {layer: (codes [Cout, ...], scale [Cout])} (GPTQ)."""

    clips: Mapping[str, Sequence[float]] | None = None
    rounded: Mapping[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def apply_weight_choices(unet: nn.Module, choices: WeightChoices) -> None:
    """`choices` on a quantized UNet, clips first: the one place export, the PyTorch reference (calibration
    file) and calibration itself set weights. A clip or rounded weight that does not fit the model is a
    MoDiffError naming the layer."""
    layers = {layer.name: layer for layer in modiff_layers(unet)}
    for name in choices.rounded:
        if name not in layers:
            raise MoDiffError(f"rounded weights for layer {name}, which this model does not have")
    for layer in layers.values():
        if layer.skipped:
            continue
        if choices.clips is not None:
            clip, n_out = choices.clips.get(layer.name), layer.inner.weight.shape[0]
            if clip is None or len(clip) != n_out:
                got = "no entry" if clip is None else f"{len(clip)} ratios"
                raise MoDiffError(f"weight clips for layer {layer.name}: {got}, expected {n_out} (one per output "
                                  f"channel)")
            layer.set_weight_clip(torch.as_tensor(clip, dtype=torch.float32))
        if layer.name in choices.rounded:
            layer.set_rounded_weight(*choices.rounded[layer.name])


def set_static_scales(unet: nn.Module, table: ScaleTable) -> None:
    """Load per-layer, per-bucket activation scales (the calibrated ScaleTable) into a quantized UNet."""
    layers = {l.name: l for l in modiff_layers(unet) if not l.skipped}
    unknown = sorted(set(table.table) - {l.name for l in modiff_layers(unet)})
    if unknown:  # a table for another model (or an edited one): refuse rather than ignore
        raise MoDiffError(f"scale table names layers this model does not have: {unknown[:5]}"
                          f"{'...' if len(unknown) > 5 else ''}")
    missing = sorted(set(layers) - set(table.table))
    if missing:
        raise MoDiffError(f"scale table has no entry for layers {missing[:5]}{'...' if len(missing) > 5 else ''}")
    for name, layer in layers.items():
        scales = torch.tensor(table.table[name], dtype=torch.float32)
        if not torch.isfinite(scales).all() or (scales < 0).any():
            raise MoDiffError(f"scale table entry for layer {name} has a negative or non-finite scale: "
                              f"{list(table.table[name])}")
        # docs/design.md section 1: s has a floor of 1e-8 (0 -> 0/0 = NaN)
        layer.static_scales = scales.clamp_min(SCALE_FLOOR)
    unet.modiff_num_train_timesteps = table.num_train_timesteps


def _before_call(unet: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a quantized UNet (docs/design.md section 1, "trajectories"):
    - refuses NaN/Inf inputs before they reach (and poison) the caches;
    - a timestep above the previous call's means a new trajectory (every sampler's timesteps are
      non-increasing within one), so the caches are reset: a diffusers pipeline called twice with the
      same generator gives the same images;
    - decides whether this call reuses the deep branch (block reuse, reuse.py);
    - picks the static-scale bucket of this timestep."""
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if t is None:
        return
    t = t.flatten()[0].item() if torch.is_tensor(t) else float(t)
    t = t / getattr(unet, "modiff_timestep_scale", 1.0)  # FLUX's forward takes sigma = t / 1000 (models/denoiser.call)
    if not torch.jit.is_tracing():
        sample = kwargs.get("sample", kwargs.get("hidden_states", args[0] if args else None))
        ehs = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        for what, x in (("sample", sample), ("encoder_hidden_states", ehs)):
            if torch.is_tensor(x) and x.is_floating_point() and not torch.isfinite(x).all():
                raise MoDiffError(f"input '{what}' contains NaN or Inf; the MoDiff caches were left unchanged")
        if not math.isfinite(t):
            raise MoDiffError(f"timestep {t} is not finite")
        last = getattr(unet, "modiff_last_timestep", None)
        if last is not None and starts_trajectory(last, t) and not any(layer.phase for layer in modiff_layers(unet)):
            reset_caches(unet)
        unet.modiff_last_timestep = t
    if getattr(unet, "modiff_reuse", None) is not None:
        unet.modiff_reuse.begin_call()
    T = getattr(unet, "modiff_num_train_timesteps", 1000)
    for layer in modiff_layers(unet):
        n = max(1, layer.static_scales.numel())
        layer.bucket = timestep_bucket(t, n, T)
