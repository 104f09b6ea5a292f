"""Latency measurement for benchmarks and the demo: ONNX Runtime sessions timed in interleaved rounds
(every session once per round, so all see the same machine load), and the CPU facts printed beside
every speed figure."""
from __future__ import annotations

import time

from ..backends.cpu import cpu_int8_flags


def make_session(path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # as OrtRunner
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def session_feeds(session, batch: int, seed: int = 0) -> dict:
    """Random feeds for every input of a session at `batch` (caches and scales included)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds = {}
    for i in session.get_inputs():
        shape = [batch if not isinstance(d, int) else d for d in i.shape]
        dtype = np.float16 if "float16" in i.type else np.float32
        if i.name == "timestep":
            feeds[i.name] = np.full(shape, 500.0, dtype)
        elif i.name == "delta_scales":
            feeds[i.name] = np.full(shape, 0.01, dtype)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(dtype) * (0.05 if i.name.startswith("cache_in") else 1.0)
    return feeds


def measure_latency(sessions: dict, feeds: dict, rounds: int = 5, warmup: int = 2, min_time: float = 0.0) -> dict:
    """Median seconds per call of each session, interleaved (round r runs every session once), so
    all of them see the same machine load. sessions/feeds: {name: session} / {name: feed dict}."""
    import statistics

    for name, s in sessions.items():
        for _ in range(warmup):
            s.run(None, feeds[name])
    times = {name: [] for name in sessions}
    r = 0
    start = time.perf_counter()
    while r < rounds or time.perf_counter() - start < min_time:
        for name, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds[name])
            times[name].append(time.perf_counter() - t0)
        r += 1
    return {name: statistics.median(v) for name, v in times.items()}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def loadavg() -> str:
    """The 1-minute load average (this machine is shared: printed beside timings)."""
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "unknown"


def cpu_line() -> str:
    """One line for the top of every speed table: CPU model and its int8/bf16 instruction sets."""
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu_int8_flags().items())
    return f"{cpu_name()} ({flags}); load average {loadavg()}"
