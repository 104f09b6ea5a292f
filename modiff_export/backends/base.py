"""The runner contract every backend implements (docs/design.md section 4).

A runner owns the MoDiff caches of one trajectory. `prime` runs the full-precision first step and
fills them; `step` consumes and replaces them; `shallow` (block reuse, design section 1.1) computes only
the outer blocks and reads the deep branch's output from the last full call; `reset` empties them.
`__call__` picks prime, step or shallow (keyframes and the reuse interval included) and starts a new
trajectory by itself when the timestep goes back up or the batch changes, so a sampling loop only
ever calls `runner(sample, timestep, cond)` and a second trajectory can never silently reuse the first one's caches.

This base class owns everything backends have in common (Polygraphy-style lifecycle):
  - activation: activate()/deactivate() or `with runner:`; prime/step activate on first use;
  - input checks: shapes against the model's (C, H, W), batch >= 1, NaN/Inf, the conditioning;
  - the trajectory rules above, and step() refusing a timestep that does not continue it;
  - the `delta_scales` row of static multi-bucket graphs (from the manifest's scale table);
  - the cache keys '<layer>.<kind>' of `caches()`.
  - with reuse_forecast "linear"/"taylor", the feature each shallow call reads (quant/forecast.Forecast).
A backend implements only its engine calls: activate_impl, deactivate_impl, prime_impl, step_impl,
reset_impl and caches (with block reuse: shallow_impl, feature_impl, set_feature_impl).

Tensors in and out are torch tensors on the CPU:
  sample                 [B, C, H, W] float32 (FLUX: packed latents [B, N, C*4], models/denoiser.py)
  timestep               [B] float32 in scheduler units (a scalar is broadcast to the batch)
  cond                   the named conditioning inputs {name: tensor} (models/conditioning.py), by the
                           manifest's (or the model's) Conditioning: e.g. {} unconditional; {"class_labels"}
                           DiT; {"encoder_hidden_states", "text_embeds", "time_ids"} SDXL. One tensor is
                           shorthand for a model's only required input; inputs with defaults (a PixArt mask,
                           SDXL's time_ids) may be left out
  mask                   shorthand for cond["encoder_attention_mask"] (PixArt; 1 attend, 0 caption padding)
  -> noise_pred          [B, C_out, H, W] float32 (FLUX: packed)
The impls get the checked feeds by graph input name, in the graphs' order and dtypes.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np
import torch

from ..errors import ModiffExportError
from ..manifest import Manifest
from ..models.conditioning import Conditioning, ConditioningError
from ..models.denoiser import ENCODER_MASK, ENCODER_STATES
from ..quant.forecast import make_forecast
from ..quant.quantization import call_role, starts_trajectory

MAX_BATCH = 4096  # far above any real batch; a larger one is a typo that would exhaust memory


class RunnerError(ModiffExportError, RuntimeError):
    """Bad input to a runner, or a runner used in the wrong state."""


class Runner(ABC):
    backend = "base"

    def __init__(self, *, keyframe_interval: int | None = None, reuse_interval: int | None = None,
                 reuse_forecast: str = "none", reuse_warmup: int = 0, uses_cache: bool = True,
                 conditioning: Conditioning | None = None, sample_shape: tuple[int, ...] | None = None,
                 image_hw: tuple[int, int] | None = None, manifest: Manifest | None = None):
        """conditioning: the named inputs checked on every call (None: unknown, passed through unchecked);
        sample_shape: the per-sample `sample` shape, (C, H, W) or packed (N, C*4), checked when known;
        image_hw: the latent (H, W) (SDXL time_ids' default; FLUX's unpacking); `manifest` supplies the
        delta-scale table and cache keys of exported graphs."""
        self.keyframe_interval = keyframe_interval
        self.reuse_interval = reuse_interval
        self.reuse_warmup = reuse_warmup  # block reuse: the first calls of a trajectory that are all full
        # block reuse with a forecast: the feature a shallow call reads (design section 1.2)
        self.forecast = make_forecast(reuse_forecast, reuse_interval)
        self.uses_cache = uses_cache
        self.conditioning = conditioning
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else None
        self.image_hw = image_hw
        self.manifest = manifest
        self.is_active = False
        self.calls = 0
        self.batch_size: int | None = None
        self.last_timestep: float | None = None

    @classmethod
    def contract_of(cls, manifest: Manifest) -> dict:
        """Constructor arguments of a runner over exported graphs/engines, from their manifest."""
        return {"keyframe_interval": manifest.keyframe_interval, "reuse_interval": manifest.reuse_interval,
                "reuse_forecast": manifest.quant_config.reuse_forecast,
                "reuse_warmup": manifest.quant_config.reuse_warmup, "uses_cache": manifest.uses_cache,
                "conditioning": manifest.conditioning, "sample_shape": manifest.model.graph_sample_shape,
                "image_hw": manifest.model.sample_size, "manifest": manifest}

    # -- what the conditioning says (models/conditioning.py) ----------------------------------
    @property
    def packed(self) -> bool:
        """The sample is packed latents [B, N, C*4] (FLUX): sampling packs before and unpacks after a call."""
        return self.sample_shape is not None and len(self.sample_shape) == 2

    @property
    def num_classes(self) -> int | None:
        labels = self.conditioning.labels if self.conditioning else None
        return labels.num_classes if labels else None

    @property
    def conditional(self) -> bool | None:
        """Takes encoder_hidden_states (None: the conditioning is not known)."""
        return None if self.conditioning is None else self.conditioning.get(ENCODER_STATES) is not None

    @property
    def encoder_shape(self) -> tuple | None:
        """(S, D) of encoder_hidden_states where fixed (graphs), else None."""
        c = self.conditioning.get(ENCODER_STATES) if self.conditioning else None
        return tuple(c.shape) if c is not None and None not in c.shape else None

    @property
    def cache_keys(self) -> list[str]:
        """'<layer>.<kind>' of every cache, in manifest order, then the reuse feature (what `caches()` returns)."""
        return [c.key for c in self.manifest.buffers] if self.manifest else []

    def describe_path(self) -> str:
        """One line for reports: the backend and the CPU-dependent path its kernels take (backends/cpu.py)."""
        return self.backend

    # -- lifecycle ---------------------------------------------------------------------------
    def activate(self) -> "Runner":
        if not self.is_active:
            self.activate_impl()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False
            self.reset()

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def activate_impl(self) -> None:
        """Load graphs/engines and allocate what does not depend on the batch."""

    def deactivate_impl(self) -> None:
        """Free what activate_impl made."""

    # -- the contract ------------------------------------------------------------------------
    def reset(self) -> None:
        """Empty the caches: a new trajectory / batch / request starts with prime."""
        self.calls = 0
        self.batch_size = None
        self.last_timestep = None
        if self.forecast is not None:
            self.forecast.reset()
        self.reset_impl()

    def prime(self, sample, timestep, cond=None, mask=None) -> torch.Tensor:
        self.activate()
        sample, timestep, feeds = self.check_inputs(sample, timestep, cond, mask)
        # a prime starts a trajectory, except the full calls of a model without caches (fp/ptq with reuse)
        fresh = self.uses_cache or self.batch_size is None or starts_trajectory(self.last_timestep, float(timestep[0]))
        out = self._finite(self.prime_impl(sample, timestep, feeds), "prime")
        self._advance(sample, timestep)
        if self.forecast is not None:
            if fresh:
                self.forecast.reset()
            self.forecast.full(self.feature_impl())
        return out

    def step(self, sample, timestep, cond=None, mask=None) -> torch.Tensor:
        if not self.uses_cache:
            return self.prime(sample, timestep, cond, mask)
        sample, timestep, feeds = self._continuing("step", sample, timestep, cond, mask)
        out = self._finite(self.step_impl(sample, timestep, feeds, self.delta_scales(float(timestep[0]))), "step")
        self._advance(sample, timestep)
        if self.forecast is not None:
            self.forecast.full(self.feature_impl())
        return out

    def shallow(self, sample, timestep, cond=None, mask=None) -> torch.Tensor:
        """Block reuse: only the outer blocks, the deep branch's output from the last prime/step."""
        if not self.reuse_interval:
            raise RunnerError(f"{self.backend} runner: shallow() needs a model exported with block reuse "
                              f"(--reuse-interval/--reuse-depth)")
        sample, timestep, feeds = self._continuing("shallow", sample, timestep, cond, mask)
        if self.forecast is not None and (feature := self.forecast.reused()) is not None:
            self.set_feature_impl(feature)
        out = self._finite(self.shallow_impl(sample, timestep, feeds), "shallow")
        self._advance(sample, timestep)
        return out

    def _continuing(self, what: str, sample, timestep, cond, mask):
        """Checked inputs of a call that continues the cached trajectory (step, shallow)."""
        if self.batch_size is None:
            raise RunnerError(f"{self.backend} runner: {what}() before prime(); caches are empty")
        sample, timestep, feeds = self.check_inputs(sample, timestep, cond, mask)
        if sample.shape[0] != self.batch_size:
            raise RunnerError(f"{self.backend} runner: batch {sample.shape[0]} does not match the cached batch "
                              f"{self.batch_size}; call reset() before a new batch")
        t = float(timestep[0])
        if starts_trajectory(self.last_timestep, t):
            raise RunnerError(f"{self.backend} runner: timestep {t:g} does not continue the trajectory (last "
                              f"{self.last_timestep:g}); call reset() before a new trajectory")
        return sample, timestep, feeds

    def schedule(self) -> str:
        """What the next call of this trajectory runs: "prime", "step" or "shallow" (design sections 1, 1.1)."""
        if self.batch_size is None:
            return "prime"
        return call_role(self.calls, self.keyframe_interval, self.reuse_interval, self.uses_cache, self.reuse_warmup)

    def __call__(self, sample, timestep, cond=None, mask=None) -> torch.Tensor:
        if self.batch_size is not None and self.new_trajectory(sample, timestep):
            self.reset()
        return getattr(self, self.schedule())(sample, timestep, cond, mask)

    def new_trajectory(self, sample, timestep) -> bool:
        """A call that cannot continue the cached trajectory: another batch size, or a timestep above
        the last one (every sampler's timesteps are non-increasing within one trajectory)."""
        b = getattr(sample, "shape", (None,))[0]
        t = torch.as_tensor(timestep, dtype=torch.float32).flatten()
        return starts_trajectory(self.last_timestep, float(t[0]) if t.numel() else -math.inf, self.batch_size, b)

    def _finite(self, out: torch.Tensor, phase: str) -> torch.Tensor:
        """A NaN/Inf output (finite inputs: damaged weights, float16 overflow) is an error, never a
        silent result; the caches it came with are dropped."""
        if not torch.isfinite(out).all():
            self.reset()
            raise RunnerError(f"{self.backend} runner: the {phase} call produced NaN or Inf in noise_pred "
                              f"(damaged weights or an overflow); caches reset")
        return out

    def _advance(self, sample, timestep) -> None:
        self.batch_size = sample.shape[0]
        self.last_timestep = float(timestep[0])
        self.calls += 1

    def delta_scales(self, timestep: float) -> np.ndarray | None:
        """delta_scales [L] float32 for this step (static multi-bucket graphs), else None."""
        return None if self.manifest is None else self.manifest.delta_scale_row(timestep)

    @abstractmethod
    def prime_impl(self, sample, timestep, cond: dict[str, torch.Tensor]) -> torch.Tensor: ...

    @abstractmethod
    def step_impl(self, sample, timestep, cond: dict[str, torch.Tensor], delta_scales: np.ndarray | None
                  ) -> torch.Tensor: ...

    def shallow_impl(self, sample, timestep, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        raise RunnerError(f"{self.backend} runner: block reuse (the shallow graph) is not supported by this backend")

    def feature_impl(self) -> torch.Tensor:
        """Block reuse: the feature the last prime/step wrote (the reuse feature cache), [B, ...] in the cache
        dtype; may be a view of the backend's buffer (Forecast.full copies and casts it)."""
        raise RunnerError(f"{self.backend} runner: reuse_forecast needs the reuse feature, which this backend "
                          f"does not expose")

    def set_feature_impl(self, feature: torch.Tensor) -> None:
        """Block reuse: replace the feature the next shallow call reads (reuse_forecast, design section 1.2)."""
        raise RunnerError(f"{self.backend} runner: reuse_forecast needs the reuse feature, which this backend "
                          f"does not expose")

    @abstractmethod
    def reset_impl(self) -> None: ...

    @abstractmethod
    def caches(self) -> dict[str, torch.Tensor]:
        """The current caches as CPU float32 copies keyed '<layer>.<kind>' ({} before prime or when the
        model has no caches); for tests and debugging."""

    # -- input validation --------------------------------------------------------------------
    def check_inputs(self, sample, timestep, cond, mask=None):
        """(sample float32, timestep [B] float32, the conditioning feeds by graph input name)."""
        name = f"{self.backend} runner"
        dims = 1 + (len(self.sample_shape) if self.sample_shape is not None else 3)
        layout = "[B, N, C*4] (packed latents)" if dims == 3 else "[B, C, H, W]"
        if not torch.is_tensor(sample) or sample.dim() != dims:
            raise RunnerError(f"{name}: 'sample' must be a {layout} tensor, got "
                              f"{getattr(sample, 'shape', type(sample).__name__)}")
        b = sample.shape[0]
        if not 1 <= b <= MAX_BATCH:
            raise RunnerError(f"{name}: batch {b} is outside 1..{MAX_BATCH}")
        if self.sample_shape is not None and tuple(sample.shape[1:]) != tuple(self.sample_shape):
            raise RunnerError(f"{name}: 'sample' is {list(sample.shape)}, the model takes [B, "
                              f"{', '.join(map(str, self.sample_shape))}]")
        sample = sample.float()
        try:
            timestep = torch.as_tensor(timestep, dtype=torch.float32).flatten()
        except (TypeError, ValueError, RuntimeError):
            raise RunnerError(f"{name}: 'timestep' must be a number or a [B] tensor, got "
                              f"{type(timestep).__name__}") from None
        if timestep.numel() == 1:
            timestep = timestep.expand(b).contiguous()
        if timestep.shape != (b,):
            raise RunnerError(f"{name}: 'timestep' must be a scalar or [B={b}], got {tuple(timestep.shape)}")
        for what, t in (("sample", sample), ("timestep", timestep)):
            if not torch.isfinite(t).all():
                raise RunnerError(f"{name}: input '{what}' contains NaN or Inf")
        if self.conditioning is None:  # unknown contract: pass through what was given
            feeds = {} if cond is None else dict(cond) if isinstance(cond, dict) else {ENCODER_STATES: cond}
            return sample, timestep, feeds
        try:
            given = self.conditioning.as_mapping(cond, name)
            if mask is not None:
                given = self._legacy_mask(name, given, mask)
            feeds = self.conditioning.check(given, b, name, self.image_hw)
        except ConditioningError as e:
            raise RunnerError(str(e)) from None
        return sample, timestep, feeds

    def _legacy_mask(self, name: str, given: dict, mask) -> dict:
        """The `mask` argument: encoder_attention_mask of models that take one; elsewhere a mask that
        attends to every token is accepted and dropped (there is nothing to mask), one with padding refused."""
        if self.conditioning.get(ENCODER_MASK) is not None:
            return {**given, ENCODER_MASK: mask}
        if self.conditioning.get(ENCODER_STATES) is None:
            raise RunnerError(f"{name}: 'encoder_attention_mask' is given, but this model takes no encoder states")
        if not torch.is_tensor(mask) or mask.is_complex():
            raise RunnerError(f"{name}: 'encoder_attention_mask' must be a [B, S] tensor, got {type(mask).__name__}")
        if not ((mask == 0) | (mask == 1)).all():
            raise RunnerError(f"{name}: 'encoder_attention_mask' must hold only 0 (padding) and 1 (attend)")
        if bool((mask == 0).any()):
            raise RunnerError(f"{name}: this model takes no 'encoder_attention_mask' (a UNet, or PixArt graphs "
                              f"exported before the mask input existed), so a mask with padding cannot be "
                              f"applied; re-export PixArt graphs to apply it")
        return given
