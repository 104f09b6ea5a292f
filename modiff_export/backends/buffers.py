"""Ping-pong cache buffers: the caches of one trajectory, allocated once per batch, never copied per step.

    prime:   writes set `current`
    step:    reads `current`, writes `spare`; then swap(written): what it wrote is the next call's `current`

A backend supplies `allocate(cache, batch)` (an OrtValue, an ov.Tensor, ...) of `cache.concrete(batch)`
= [B, ...] in `cache.dtype`; this class owns when to allocate and which set is which.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..manifest import CacheSpec


class PingPongBuffers:
    """{cache key: buffer} sets for the manifest's caches. `sets=2` for ping-pong; `sets=1` when the
    backend keeps the step's caches itself and needs a buffer only for prime's outputs (OpenVINO states).
    Each key swaps on its own: a graph that writes only some caches (the shallow graph of block reuse)
    swaps only those, the others keep what the last full call wrote."""

    def __init__(self, caches: Sequence[CacheSpec], allocate: Callable[[CacheSpec, int], Any], sets: int = 2):
        self.caches, self.allocate, self.n_sets = tuple(caches), allocate, sets
        self.batch: int | None = None
        self._pairs: dict[str, list] = {}

    def ensure(self, batch: int) -> None:
        """Allocate for `batch` unless the buffers already have that batch (then they are reused)."""
        if batch != self.batch:
            self._pairs = {c.key: [self.allocate(c, batch) for _ in range(self.n_sets)] for c in self.caches}
            self.batch = batch

    def clear(self) -> None:
        self._pairs, self.batch = {}, None

    def __bool__(self) -> bool:
        return bool(self._pairs)

    @property
    def current(self) -> dict:
        """What the last prime/step wrote: the caches of the trajectory now."""
        return {k: p[0] for k, p in self._pairs.items()}

    @property
    def spare(self) -> dict:
        return {k: p[-1] for k, p in self._pairs.items()}

    def swap(self, caches: Sequence[CacheSpec] | None = None) -> None:
        """After a step: its outputs become the next step's inputs (no tensor is copied); only `caches`
        (default all)."""
        for c in self.caches if caches is None else caches:
            self._pairs[c.key].reverse()
