#!/usr/bin/env python
"""Soak test: bounded load for a long time against `cli.py serve` or the `package-triton` repository
(Python-backend UNet) on the bundled tritonserver. Loopback only; clients, duration and request count are
capped, and every call has a client deadline.

Per window (default 5 min): requests, errors, p50/p95/p99 latency, server RSS (the server process and
its children: tritonserver, Python-backend stubs). Pass criteria: 0 errors (every request is valid),
RSS after the warm-up window within +5% of its value at the end of the warm-up, and every sampled image
(one request in `--spot-every`) equal to the same (seed, steps) computed alone in this process, bit for bit.

    nice -n 5 python benchmarks/serve_soak.py --target serve --graphs graphs/digits-w8a4 --minutes 20 --clients 3
    nice -n 5 python benchmarks/serve_soak.py --target repository --graphs graphs/digits-w8a4 --minutes 20
"""
from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import numpy as np

from modiff_export.serving.client import Client, InferError, wait_ready
from modiff_export.serving.process import free_ports, rss_bytes, start_serve, stop_server

MAX_CLIENTS, MAX_MINUTES = 16, 180


def start_target(target: str, graphs: str, port: int, max_batch: int, work: Path, extra: tuple[str, ...]):
    """(process, cleanup) for the server under test; ready when this returns."""
    if target == "serve":
        proc = start_serve(graphs, port, max_batch=max_batch, log=str(work / "server.log"), extra=extra)
        wait_ready(port, proc, timeout=300)
        return proc, lambda: None
    from modiff_export.serving.model_repository import PackageOptions, local_tritonserver, write_model_repository

    repo = write_model_repository(graphs, work / "model_repository", PackageOptions(unet_backend="python",
                                                                                   max_batch=max_batch))
    proc, scratch = local_tritonserver(repo, port, port + 1, port + 2, ["modiff", "modiff_unet"], work / "server.log")
    wait_ready(port, proc, timeout=300)
    return proc, lambda: shutil.rmtree(scratch, ignore_errors=True)


class Soak:
    def __init__(self, port: int, clients: int, seconds: float, max_requests: int, steps: tuple[int, ...],
                 spot_every: int, timeout_s: float):
        self.port, self.clients, self.seconds, self.max_requests = port, clients, seconds, max_requests
        self.steps, self.spot_every, self.timeout_s = steps, spot_every, timeout_s
        self.lock = threading.Lock()
        self.records: list[tuple[float, float, bool]] = []  # (finish time since start, latency s, ok)
        self.errors: list[str] = []
        self.spots: list[tuple[int, int, np.ndarray]] = []
        self.sent = 0

    def _take(self) -> int | None:
        with self.lock:
            if self.sent >= self.max_requests:
                return None
            self.sent += 1
            return self.sent

    def worker(self, k: int, t0: float) -> None:
        proto = "http" if k % 2 == 0 else "grpc"
        cl = Client(proto, self.port if proto == "http" else self.port + 1, timeout_s=self.timeout_s)
        rng = np.random.default_rng(1000 + k)
        while time.time() - t0 < self.seconds and (n := self._take()) is not None:
            seed, steps = int(rng.integers(0, 1 << 31)), int(rng.choice(self.steps))
            t1 = time.perf_counter()
            try:
                img = cl.infer(seed, steps)
                ok = True
            except InferError as e:
                ok = False
                with self.lock:
                    self.errors.append(f"{proto} {e}")
            lat = time.perf_counter() - t1
            with self.lock:
                self.records.append((time.time() - t0, lat, ok))
                if ok and n % self.spot_every == 0:
                    self.spots.append((seed, steps, img))
        cl.close()

    def run(self, proc, window_s: float, on_window) -> None:
        t0 = time.time()
        threads = [threading.Thread(target=self.worker, args=(k, t0), daemon=True) for k in range(self.clients)]
        for t in threads:
            t.start()
        rss: list[tuple[float, int]] = []
        w = 0
        while any(t.is_alive() for t in threads):
            time.sleep(1.0)
            now = time.time() - t0
            if not rss or now - rss[-1][0] >= 10:
                rss.append((now, rss_bytes(proc.pid)))
            if now >= (w + 1) * window_s:
                on_window(w, self, rss)
                w += 1
        for t in threads:
            t.join()
        rss.append((time.time() - t0, rss_bytes(proc.pid)))
        on_window(w, self, rss, final=True)


def window_row(w: int, soak: Soak, rss, window_s: float) -> dict:
    lo, hi = w * window_s, (w + 1) * window_s
    with soak.lock:
        recs = [r for r in soak.records if lo <= r[0] < hi]
    lat = np.array([r[1] for r in recs if r[2]]) * 1e3
    in_w = [b for t, b in rss if lo <= t < hi] or [rss[-1][1]]
    pct = (lambda q: float(np.percentile(lat, q))) if lat.size else (lambda q: float("nan"))
    return {"window": w, "from_s": lo, "requests": len(recs), "errors": sum(not r[2] for r in recs),
            "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99), "rss_mib_end": in_w[-1] / 2**20,
            "rss_mib_max": max(in_w) / 2**20}


def spot_check(graphs: str, spots) -> tuple[int, float]:
    """Each sampled (seed, steps) computed alone in this process (OrtRunner): (mismatches, max abs diff)."""
    from modiff_export.backends.ort_runner import OrtRunner
    from modiff_export.manifest import Manifest
    from modiff_export.models import LoadedModel
    from modiff_export.serving.sampler import Item, generate_items

    meta = LoadedModel.from_info(Manifest.load(graphs).model)  # what serve runs with
    r = OrtRunner(graphs, threads=1)
    bad, worst = 0, 0.0
    for seed, steps, img in spots:
        solo = generate_items(r, meta.scheduler_config, [Item(seed, steps)], meta.sample_shape)[0].numpy()
        d = float(np.abs(solo - img).max())
        worst, bad = max(worst, d), bad + (d != 0.0)
    return bad, worst


@click.command()
@click.option("--target", type=click.Choice(["serve", "repository"]), required=True)
@click.option("--graphs", default="graphs/digits-w8a4", show_default=True)
@click.option("--port", type=click.IntRange(1024, 65000), default=None, help="HTTP port [default: a free one].")
@click.option("--clients", type=click.IntRange(1, MAX_CLIENTS), default=3, show_default=True)
@click.option("--minutes", type=click.FloatRange(0.1, MAX_MINUTES), default=20.0, show_default=True)
@click.option("--max-requests", type=click.IntRange(1, 1_000_000), default=200_000, show_default=True)
@click.option("--window-s", type=click.FloatRange(10, 3600), default=300.0, show_default=True)
@click.option("--steps", default="10,20", show_default=True)
@click.option("--max-batch", type=click.IntRange(1, 64), default=8, show_default=True)
@click.option("--spot-every", type=click.IntRange(1), default=50, show_default=True)
@click.option("--timeout-s", type=click.FloatRange(1, 600), default=120.0, show_default=True,
              help="Client deadline per request.")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="Write the figures as JSON.")
def main(target, graphs, port, clients, minutes, max_requests, window_s, steps, max_batch, spot_every, timeout_s,
         json_out):
    import os

    port = port or free_ports()
    work = Path(tempfile.mkdtemp(prefix=f"soak-{target}-"))
    click.echo(f"soak {target}: {graphs}, {clients} clients, {minutes:g} min (max {max_requests} requests), "
               f"windows of {window_s:g} s, port {port}, log {work}/server.log; load average {os.getloadavg()[0]:.2f}")
    t0 = time.time()
    proc, cleanup = start_target(target, graphs, port, max_batch, work, ())
    click.echo(f"server ready in {time.time() - t0:.1f} s, RSS {rss_bytes(proc.pid) / 2**20:.0f} MiB")
    rows: list[dict] = []
    click.echo("| window | requests | errors | p50 ms | p95 ms | p99 ms | RSS end MiB | RSS max MiB |")
    click.echo("|---:|---:|---:|---:|---:|---:|---:|---:|")

    def on_window(w, soak, rss, final=False):
        row = window_row(w, soak, rss, window_s)
        if final and row["requests"] == 0:
            return
        rows.append(row)
        span = f"{row['from_s'] / 60:.0f}-{(row['from_s'] + window_s) / 60:.0f} min"
        click.echo(f"| {w} ({span}){' partial' if final else ''} | {row['requests']} | {row['errors']} | "
                   f"{row['p50_ms']:.0f} | {row['p95_ms']:.0f} | {row['p99_ms']:.0f} | {row['rss_mib_end']:.1f} | "
                   f"{row['rss_mib_max']:.1f} |")

    soak = Soak(port, clients, minutes * 60, max_requests, tuple(int(s) for s in steps.split(",")), spot_every,
                timeout_s)
    try:
        soak.run(proc, window_s, on_window)
        load = os.getloadavg()[0]
    finally:
        rc = stop_server(proc, signal.SIGTERM, timeout=120)
        cleanup()
    full = [r for r in rows if r["from_s"] + window_s <= minutes * 60 + 1e-6]
    base = full[0]["rss_mib_end"] if full else rows[0]["rss_mib_end"]
    growth = max((r["rss_mib_max"] / base - 1 for r in rows[1:]), default=0.0)
    bad, worst = spot_check(graphs, soak.spots)
    total, errors = len(soak.records), len(soak.errors)
    click.echo(f"total {total} requests, {errors} errors, RSS after warm-up window: max +{growth * 100:.2f}% over "
               f"{base:.1f} MiB; spot check {len(soak.spots)} images vs solo: {bad} differ (max abs diff {worst:g}); "
               f"server exit code {rc} (SIGTERM); load average at the end {load:.2f}")
    for e in sorted(set(soak.errors))[:5]:
        click.echo(f"  error: {e}")
    if json_out:
        Path(json_out).write_text(json.dumps({"target": target, "clients": clients, "minutes": minutes,
                                              "windows": rows, "total": total, "errors": errors,
                                              "rss_growth": growth, "spots": len(soak.spots), "spot_mismatches": bad,
                                              "exit_code": rc}, indent=2) + "\n")
    if not errors:  # keep the server log when something failed
        shutil.rmtree(work, ignore_errors=True)
    if errors or bad or growth > 0.05 or not soak.spots:
        sys.exit(1)


if __name__ == "__main__":
    main()
