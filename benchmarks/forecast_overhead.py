"""What the linear feature forecast (docs/design.md section 1.2) adds to OpenVINO reuse calls.

    python benchmarks/forecast_overhead.py [--work /tmp/runtime_speed] [--rounds 12]

Uses the CIFAR-size reuse folders runtime_speed.py exports (`modiff-w8a4-d1`, `modiff-w8a4-d1-lin`; run it first).
Interleaved rounds: a shallow call and a step on each runner, then the forecast's own work alone (full(): the copy
and velocity after a full call; reused() + set_feature_impl: the extrapolation and its write into the link
tensor the shallow call reads). Medians and minima in ms; one thread; print the CPU flags beside them.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from modiff_export.backends.openvino_runner import OpenVinoRunner  # noqa: E402
from modiff_export.harness.latency import cpu_line, loadavg  # noqa: E402


@click.command()
@click.option("--work", default="/tmp/runtime_speed", show_default=True, type=click.Path(file_okay=False))
@click.option("--rounds", default=12, show_default=True, type=click.IntRange(1))
def main(work, rounds):
    torch.set_num_threads(1)
    root = Path(work) / "graphs" / "cifar"
    lin = OpenVinoRunner(root / "modiff-w8a4-d1-lin", threads=1).activate()
    plain = OpenVinoRunner(root / "modiff-w8a4-d1", threads=1).activate()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=g)
    x2 = x + 0.01 * torch.randn(4, 3, 32, 32, generator=g)
    for r in (lin, plain):
        r.prime(x, 520.0)
        r.step(x2, 500.0)
    res: dict[str, list[float]] = {}

    def timed(key, fn):
        t0 = time.perf_counter()
        fn()
        res.setdefault(key, []).append(time.perf_counter() - t0)

    print(f"CPU: {cpu_line()}; load before {loadavg()}")
    t = 480.0
    for _ in range(rounds):
        for name, r in (("forecast", lin), ("plain", plain)):
            for role in ("shallow", "step"):
                timed(f"{name} {role}", lambda: getattr(r, role)(x2, t))  # noqa: B023
        timed("forecast.full()", lambda: lin.forecast.full(lin.feature_impl()))
        timed("reused() + set_feature_impl", lambda: lin.set_feature_impl(lin.forecast.reused()))
        t -= 1.0
    for key, v in res.items():
        print(f"| {key} | {1e3 * statistics.median(v):.2f} | {1e3 * min(v):.2f} |")
    print(f"load after {loadavg()}")


if __name__ == "__main__":
    main()
