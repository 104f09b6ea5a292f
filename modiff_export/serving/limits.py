"""Overload and lifetime limits of a Triton deployment (`serve` and `package-triton`): one frozen,
validated dataclass, written into the model configs as Triton's own settings.

    max_queue_size    requests waiting in the dynamic batcher's queue (not counting the batch being
                      computed); one more is rejected at once: UNAVAILABLE, HTTP 503, "Exceeds maximum
                      queue size". 0 = unbounded (Triton's default; latency then grows without limit).
    queue_timeout_us  a request that waited this long in the queue is rejected (timeout_action REJECT);
                      0 = no timeout. Clients may ask for a shorter one (request parameter `timeout`).
    sequence_idle_us  (model repository) a UNet sequence without a request for this long is ended by
                      Triton and its caches are freed (max_sequence_idle_microseconds).
    max_inflight      (model repository) trajectories the sampler runs at once; one more is rejected at
                      once (UNAVAILABLE). The sampler's `execute` is async, so Triton's queue in front of
                      it empties at once and cannot bound the load by itself.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModiffExportError

DEFAULT_MAX_QUEUE_SIZE = 32  # 4 batches of the default max batch 8: a few seconds of work on a CPU


class LimitsError(ModiffExportError, ValueError):
    pass


@dataclass(frozen=True)
class ServingLimits:
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE
    queue_timeout_us: int = 0
    sequence_idle_us: int = 60_000_000
    max_inflight: int = 64

    def __post_init__(self) -> None:
        for name, low in (("max_queue_size", 0), ("queue_timeout_us", 0), ("sequence_idle_us", 1),
                          ("max_inflight", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise LimitsError(f"ServingLimits.{name}={v!r} must be an integer >= {low}")

    def pytriton_queue_policy(self):
        """PyTriton's QueuePolicy for the dynamic batcher of `serve`."""
        from pytriton.model_config import QueuePolicy, TimeoutAction

        return QueuePolicy(timeout_action=TimeoutAction.REJECT, default_timeout_microseconds=self.queue_timeout_us,
                           allow_timeout_override=True, max_queue_size=self.max_queue_size)

    def fill_queue_policy(self, policy) -> None:
        """Set a model_config_pb2 ModelQueuePolicy (dynamic_batching.default_queue_policy)."""
        policy.timeout_action = policy.REJECT
        policy.default_timeout_microseconds = self.queue_timeout_us
        policy.allow_timeout_override = True
        policy.max_queue_size = self.max_queue_size
