"""Small helpers of the measuring harness: a runner wrapper that records calls, and a per-phase timer."""
from __future__ import annotations

import time

import torch


class Recorder:
    """Wraps a runner; keeps every call's inputs (calibration data for the peer) and outputs (parity)."""

    def __init__(self, runner):
        self.runner, self.inputs, self.outputs = runner, [], []

    @property
    def conditioning(self):
        return getattr(self.runner, "conditioning", None)

    @property
    def packed(self) -> bool:
        return bool(getattr(self.runner, "packed", False))

    def reset(self):
        self.runner.reset()

    def __call__(self, sample, t, cond=None, mask=None):
        out = self.runner(sample, t, cond, mask)  # a Runner: mask None attends to every caption token
        # sample, one timestep per call, the conditioning {name: tensor} as given (a tensor: the model's only
        # required input); a caption mask (PixArt) is passed on, not recorded: the peer's calibration attends
        # to every token
        if torch.is_tensor(cond) and self.conditioning is not None:
            cond = self.conditioning.as_mapping(cond, "recorder")
        elif torch.is_tensor(cond):
            cond = {"encoder_hidden_states": cond}
        self.inputs.append((sample.clone(), float(t), {k: v.clone() for k, v in (cond or {}).items()}))
        self.outputs.append(out.clone())
        return out


class Phases:
    """Wall seconds per named phase: `with phases("export"): ...`; phases.seconds is {name: s}."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        return _Phase(self, name)

    def summary(self) -> str:
        return ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items())


class _Phase:
    def __init__(self, owner: Phases, name: str):
        self.owner, self.name = owner, name

    def __enter__(self):
        self.t0 = time.time()

    def __exit__(self, *exc):
        self.owner.seconds[self.name] = self.owner.seconds.get(self.name, 0.0) + time.time() - self.t0
