"""The runner contract every backend implements (design.md section 4).

A runner owns the MoDiff caches of one trajectory. `prime` runs the full-precision first step and
fills them; `step` consumes and replaces them; `reset` empties them. `__call__` picks prime or
step (keyframes included), so a sampling loop only ever calls `runner(sample, timestep, ehs)`.
Polygraphy-style lifecycle: activate() / deactivate(), or use the runner as a context manager.

Tensors in and out are torch tensors on the CPU:
  sample                 [B, C, H, W] float32
  timestep               [B] float32 (a scalar is broadcast to the batch)
  encoder_hidden_states  [B, S, D] float32, conditional UNets only
  -> noise_pred          [B, C_out, H, W] float32
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..errors import ModiffExportError


class RunnerError(ModiffExportError, RuntimeError):
    """Bad input to a runner, or a runner used in the wrong state."""


class Runner(ABC):
    backend = "base"

    def __init__(self, keyframe_interval: int | None = None, uses_cache: bool = True):
        self.keyframe_interval = keyframe_interval
        self.uses_cache = uses_cache
        self.is_active = False
        self.calls = 0
        self.batch_size: int | None = None

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

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def activate_impl(self) -> None:
        pass

    def deactivate_impl(self) -> None:
        pass

    # -- the contract ------------------------------------------------------------------------
    def reset(self) -> None:
        """Empty the caches: call at the start of every trajectory / batch / request."""
        self.calls = 0
        self.batch_size = None
        self.reset_impl()

    def prime(self, sample, timestep, encoder_hidden_states=None) -> torch.Tensor:
        sample, timestep, ehs = self.check_inputs(sample, timestep, encoder_hidden_states)
        out = self.prime_impl(sample, timestep, ehs)
        self.batch_size = sample.shape[0]
        self.calls += 1
        return out

    def step(self, sample, timestep, encoder_hidden_states=None) -> torch.Tensor:
        if not self.uses_cache:
            return self.prime(sample, timestep, encoder_hidden_states)
        if self.batch_size is None:
            raise RunnerError(f"{self.backend} runner: step() before prime(); caches are empty")
        sample, timestep, ehs = self.check_inputs(sample, timestep, encoder_hidden_states)
        if sample.shape[0] != self.batch_size:
            raise RunnerError(
                f"{self.backend} runner: batch {sample.shape[0]} does not match the cached batch "
                f"{self.batch_size}; call reset() before a new batch")
        out = self.step_impl(sample, timestep, ehs)
        self.calls += 1
        return out

    def __call__(self, sample, timestep, encoder_hidden_states=None) -> torch.Tensor:
        k = self.keyframe_interval
        if self.batch_size is None or not self.uses_cache or (k is not None and self.calls % k == 0):
            return self.prime(sample, timestep, encoder_hidden_states)
        return self.step(sample, timestep, encoder_hidden_states)

    @abstractmethod
    def prime_impl(self, sample, timestep, ehs) -> torch.Tensor: ...

    @abstractmethod
    def step_impl(self, sample, timestep, ehs) -> torch.Tensor: ...

    @abstractmethod
    def reset_impl(self) -> None: ...

    def caches(self) -> dict[str, torch.Tensor]:
        """Current caches by graph input name (copies on the CPU; for tests and debugging)."""
        return {}

    # -- input validation --------------------------------------------------------------------
    def check_inputs(self, sample, timestep, ehs):
        if not torch.is_tensor(sample) or sample.dim() != 4:
            raise RunnerError(f"{self.backend} runner: 'sample' must be a [B, C, H, W] tensor, got "
                              f"{getattr(sample, 'shape', type(sample).__name__)}")
        sample = sample.float()
        b = sample.shape[0]
        timestep = torch.as_tensor(timestep, dtype=torch.float32).flatten()
        if timestep.numel() == 1:
            timestep = timestep.expand(b).contiguous()
        if timestep.shape != (b,):
            raise RunnerError(f"{self.backend} runner: 'timestep' must be a scalar or [B={b}], got {tuple(timestep.shape)}")
        for name, t in (("sample", sample), ("timestep", timestep), ("encoder_hidden_states", ehs)):
            if t is not None and not torch.isfinite(t).all():
                raise RunnerError(f"{self.backend} runner: input '{name}' contains NaN or Inf")
        if ehs is not None:
            ehs = ehs.float()
            if ehs.dim() != 3 or ehs.shape[0] != b:
                raise RunnerError(f"{self.backend} runner: 'encoder_hidden_states' must be [B={b}, S, D], "
                                  f"got {tuple(ehs.shape)}")
        return sample, timestep, ehs
