"""Static delta scales: the table of calibrated scales per quantized layer and timestep bucket, and the
bucket rule every user of it shares (docs/design.md sections 1-3). Calibration fills it, the PyTorch
reference selects a row per call, the manifest stores it and runners feed its rows as `delta_scales`."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import Fields


def timestep_bucket(t: float, n_buckets: int, num_train_timesteps: int = 1000) -> int:
    """Bucket b of n uniform buckets over [0, num_train_timesteps)."""
    return max(0, min(n_buckets - 1, int(float(t) * n_buckets / num_train_timesteps)))


@dataclass(frozen=True)
class ScaleTable:
    """Static delta scales: one per quantized layer (graph order) and timestep bucket."""

    source: str
    n_buckets: int
    num_train_timesteps: int
    layers: tuple[str, ...]
    table: dict  # {layer: (scale per bucket, ...)}

    def bucket(self, timestep: float) -> int:
        """Uniform buckets over [0, T) (timestep_bucket)."""
        return timestep_bucket(float(timestep), self.n_buckets, self.num_train_timesteps)

    def for_layers(self, layers: tuple[str, ...]) -> "ScaleTable":
        """This table with its rows in `layers` order (the graph's order of quantized layers)."""
        return ScaleTable(self.source, self.n_buckets, self.num_train_timesteps, tuple(layers), dict(self.table))

    def row(self, timestep: float) -> np.ndarray:
        """delta_scales [L] float32 for the bucket of `timestep`."""
        b = self.bucket(timestep)
        return np.array([self.table[name][b] for name in self.layers], dtype=np.float32)

    @classmethod
    def parse(cls, f: Fields) -> "ScaleTable":
        n = f.get("n_buckets", int)
        T = f.get("num_train_timesteps", int, optional=True) or 1000
        if n < 1 or T < 1:
            f.fail("n_buckets", f"and num_train_timesteps must be >= 1, got {n} and {T}")
        table = f.get("table", dict)
        layers = tuple(f.get("layers", list, optional=True) or sorted(table))
        if not all(isinstance(name, str) for name in layers):
            f.fail("layers", f"must be a list of layer names (strings), got {str(list(layers))[:60]}")
        for name in layers:
            v = table.get(name)
            if not isinstance(v, list) or len(v) != n or not all(
                    isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0 for s in v):
                f.fail(f"table[{name!r}]", f"must be {n} positive finite scale(s), got {str(v)[:60]}")
        return cls(f.get("source", str, optional=True) or "", n, T, layers,
                   {k: tuple(float(s) for s in v) for k, v in table.items()})

    def to_dict(self) -> dict:
        return {"source": self.source, "n_buckets": self.n_buckets, "num_train_timesteps": self.num_train_timesteps,
                "layers": list(self.layers), "table": {k: list(v) for k, v in self.table.items()}}
