"""Ping-pong cache buffers: the caches of one trajectory, allocated once per batch, never copied per step.

    prime:   writes set `current`
    step:    reads `current`, writes `spare`; then swap(): what it wrote is the next step's `current`

A backend supplies `allocate(cache, batch)` (an OrtValue, an ov.Tensor, ...) of `cache.concrete(batch)`
= [B, ...] in `cache.dtype`; this class owns when to allocate and which set is which.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..manifest import CacheSpec


class PingPongBuffers:
    """{cache key: buffer} sets for the manifest's caches. `sets=2` for ping-pong; `sets=1` when the
    backend keeps the step's caches itself and needs a buffer only for prime's outputs (OpenVINO states)."""

    def __init__(self, caches: Sequence[CacheSpec], allocate: Callable[[CacheSpec, int], Any], sets: int = 2):
        self.caches, self.allocate, self.n_sets = tuple(caches), allocate, sets
        self.batch: int | None = None
        self._sets: list[dict] = []

    def ensure(self, batch: int) -> None:
        """Allocate for `batch` unless the buffers already have that batch (then they are reused)."""
        if batch != self.batch:
            self._sets = [{c.key: self.allocate(c, batch) for c in self.caches} for _ in range(self.n_sets)]
            self.batch = batch

    def clear(self) -> None:
        self._sets, self.batch = [], None

    def __bool__(self) -> bool:
        return bool(self._sets)

    @property
    def current(self) -> dict:
        """What the last prime/step wrote: the caches of the trajectory now."""
        return self._sets[0]

    @property
    def spare(self) -> dict:
        return self._sets[-1]

    def step_pairs(self) -> Iterator[tuple[CacheSpec, Any, Any]]:
        """(cache, buffer to read as cache.input, buffer to write as cache.output) for one step."""
        for c in self.caches:
            yield c, self.current[c.key], self.spare[c.key]

    def swap(self) -> None:
        """After a step: its outputs become the next step's inputs (no tensor is copied)."""
        self._sets.reverse()
