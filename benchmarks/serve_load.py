#!/usr/bin/env python
"""Load test of `cli.py serve`: N concurrent tritonclient clients (HTTP and gRPC, loopback), mixed seeds
and step counts, bounded time. Reports p50/p95 latency, images/s, errors, the batch sizes Triton formed
(from its Prometheus metrics), and checks every image against a solo request of the same seed/steps
sent afterwards to the same server, one at a time (exact equality: batching must not change an image).

    python benchmarks/serve_load.py --graphs graphs/digits-w8a4 --clients 8 --duration 30
"""
from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from modiff_export.serving.client import Client, InferError, batch_stats, wait_ready
from modiff_export.serving.process import start_serve as start_server
from modiff_export.serving.process import stop_server


@dataclass
class LoadResult:
    latencies: list = field(default_factory=list)   # seconds per request
    images: dict = field(default_factory=dict)      # (client, i) -> (seed, steps, image)
    errors: list = field(default_factory=list)
    kinds: dict = field(default_factory=dict)       # InferError.kind -> count (busy: rejected by the queue bound)
    wall: float = 0.0


def run_load(port: int, clients: int, duration: float, steps_choices=(10, 20), max_requests: int | None = None,
             seed0: int = 1000) -> LoadResult:
    """`clients` threads (even: HTTP, odd: gRPC) send requests until `duration` s or `max_requests` each."""
    res, lock = LoadResult(), threading.Lock()
    t_end = time.time() + duration

    def worker(k):
        cl = Client("http", port) if k % 2 == 0 else Client("grpc", port + 1)
        rng = np.random.default_rng(k)
        i = 0
        while time.time() < t_end and (max_requests is None or i < max_requests):
            seed, steps = int(seed0 + rng.integers(0, 10_000)), int(rng.choice(steps_choices))
            t0 = time.perf_counter()
            try:
                img = cl.infer(seed, steps)
                with lock:
                    res.latencies.append(time.perf_counter() - t0)
                    res.images[(k, i)] = (seed, steps, img)
            except InferError as e:  # every failure is counted and reported
                with lock:
                    res.errors.append(f"{cl.protocol}: {e}")
                    res.kinds[e.kind] = res.kinds.get(e.kind, 0) + 1
                if e.kind == "busy":
                    time.sleep(0.2)  # what a client told "busy, retry" does: back off a little
            i += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res.wall = time.perf_counter() - t0
    return res


def solo_mismatches(port: int, res: LoadResult) -> tuple[int, float]:
    """Re-ask every (seed, steps) alone (one request in flight) and compare: (mismatches, max abs diff)."""
    cl = Client("http", port)
    solo, bad, worst = {}, 0, 0.0
    for seed, steps, img in res.images.values():
        key = (seed, steps)
        if key not in solo:
            solo[key] = cl.infer(seed, steps)
        d = float(np.abs(solo[key] - img).max())
        worst = max(worst, d)
        bad += d != 0.0
    return bad, worst


@click.command()
@click.option("--graphs", default="graphs/digits-w8a4", show_default=True, help="Graph folder to serve.")
@click.option("--backend", default="ort", show_default=True)
@click.option("--port", type=int, default=18200, show_default=True)
@click.option("--clients", type=int, default=8, show_default=True, help="Concurrent clients (half HTTP, half gRPC).")
@click.option("--duration", type=float, default=30.0, show_default=True, help="Seconds of load.")
@click.option("--steps", default="10,20", show_default=True, help="Step counts requests pick from (mixed groups).")
@click.option("--max-batch", type=int, default=8, show_default=True)
@click.option("--max-queue-size", type=int, default=32, show_default=True, help="serve --max-queue-size.")
@click.option("--log", default="/tmp/serve_load_server.log", show_default=True, help="Server log file.")
def main(graphs, backend, port, clients, duration, steps, max_batch, max_queue_size, log):
    import platform

    cpuinfo = Path("/proc/cpuinfo").read_text()
    flags = [f for f in ("avx512_vnni", "avx512_bf16", "amx_bf16", "avx_vnni") if f in cpuinfo]
    click.echo(f"cpu: {platform.processor() or platform.machine()}, flags {flags}, load average "
               f"{os.getloadavg()[0]:.2f}")
    proc = start_server(graphs, port, backend, max_batch, log, extra=("--max-queue-size", str(max_queue_size)))
    try:
        t0 = time.time()
        wait_ready(port, proc)
        click.echo(f"server ready in {time.time() - t0:.1f} s ({graphs}, {backend}, max batch {max_batch})")
        res = run_load(port, clients, duration, tuple(int(s) for s in steps.split(",")))
        n_req, n_exec = batch_stats(port + 2)
        lat = np.array(res.latencies) * 1e3
        click.echo(f"{clients} clients, {duration:.0f} s: {len(lat)} images, {len(res.errors)} errors {res.kinds}, "
                   f"{len(lat) / res.wall:.2f} images/s, latency p50 {np.percentile(lat, 50):.0f} ms, "
                   f"p95 {np.percentile(lat, 95):.0f} ms; Triton: {n_req:.0f} requests in {n_exec:.0f} executions "
                   f"(mean batch {n_req / max(n_exec, 1):.2f})")
        for e in sorted(set(res.errors))[:5]:
            click.echo(f"  error: {e}")
        bad, worst = solo_mismatches(port, res)
        click.echo(f"isolation: {len(res.images)} images vs solo requests of the same seed/steps: "
                   f"{bad} differ (max abs diff {worst:g})")
        load = os.getloadavg()[0]
    finally:
        rc = stop_server(proc) if proc.poll() is None else proc.returncode
    click.echo(f"server stopped by SIGINT, exit code {rc}; load average at the end of the load {load:.2f}")
    if len(res.errors) > res.kinds.get("busy", 0) or bad:  # "busy" is the queue bound doing its job
        sys.exit(1)


if __name__ == "__main__":
    main()
