"""Calibrated static delta scales vs dynamic (run-time absmax) scales for MoDiff on `digits`,
written to docs/static_vs_dynamic.md.

    python benchmarks/static_vs_dynamic.py [--num-samples 128] [--steps 25] [--buckets 1,4]

For W8A8, W8A4 and W8A3 (modiff, per-sample granularity, error compensation): full precision, then
dynamic scales, then static scales calibrated by `calibration.calibrate` (DDIM trajectories from a
*different* seed than the evaluation) with 1 and more timestep buckets. Every configuration samples
from the same noise as full precision (batch i uses seed + i), so PSNR-to-FP compares like with like.
Static runs load the calibration file through load_calibration and Calibration.apply, i.e. the
numbers the exported static graphs use.
"""
from __future__ import annotations

import copy
import math
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from modiff_export import QuantConfig  # noqa: E402
from modiff_export.backends.torch_runner import TorchRunner  # noqa: E402
from modiff_export.calibration.file import load_calibration, write_calibration  # noqa: E402
from modiff_export.calibration.observe import calibrate  # noqa: E402
from modiff_export.evaluation.metrics import DigitsEvaluator, psnr  # noqa: E402
from modiff_export.fsutil import atomic_write_text  # noqa: E402
from modiff_export.models import load_model  # noqa: E402
from modiff_export.quant.quantization import quantize  # noqa: E402
from modiff_export.sampling import Trajectories, generate, make_scheduler  # noqa: E402

BITS = [(8, 8), (8, 4), (8, 3)]

OUT_TEMPLATE = """# Static (calibrated) vs dynamic delta scales, MoDiff on `digits`

{table}

- Model: `{model}` ({hash}...), DDIM {steps} steps, {n} samples, evaluation seed {seed}; MoDiff with error
  compensation, per-sample granularity, weights per output channel.
- dynamic: scale = absmax(delta) / qmax computed at run time for every sample and layer (the paper's setting).
- static: one scale per layer (and timestep bucket) from `calibration.calibrate`: {cal_samples} DDIM trajectories
  with seed {cal_seed} (not the evaluation seed), method `{method}` (clip ratio of the absmax minimizing the
  quantization MSE of a 20k-value subsample of the deltas), plus per-channel weight clipping (MSE search).
  Static runs load the file through `load_calibration` + `Calibration.apply`, the numbers the exported static
  graphs use.
- FD-digits: Frechet distance in the digits classifier's feature space against the held-out split (lower is
  better; {n} samples, so compare rows with each other, not with other sample counts). PSNR-to-FP: same noise
  as the full-precision run.
- Wall time {minutes:.1f} min on a shared 2-core CPU (1 thread).

Command:

    {cmd}
"""


def sample_with(unet, model, steps: int, num_samples: int, batch_size: int, seed: int) -> torch.Tensor:
    """Like sampling.sample_model (batch i uses seed + i) but for an already prepared UNet."""
    runner, out = TorchRunner(unet), []
    for i, start in enumerate(range(0, num_samples, batch_size)):
        b = min(batch_size, num_samples - start)
        out.append(generate(runner, make_scheduler("ddim", model.scheduler_config), steps, b, seed + i,
                            model.sample_shape, progress=False))
    return torch.cat(out)


@click.command()
@click.option("--model", "model_spec", default="digits", show_default=True,
              help="'digits' or a folder with the same model.")
@click.option("--steps", default=25, show_default=True)
@click.option("--num-samples", default=128, show_default=True)
@click.option("--batch-size", default=128, show_default=True)
@click.option("--seed", default=0, show_default=True, help="Evaluation seed.")
@click.option("--cal-samples", default=32, show_default=True, help="Calibration trajectories.")
@click.option("--cal-seed", default=1000, show_default=True, help="Calibration seed (must differ from --seed).")
@click.option("--buckets", default="1,4", show_default=True, help="Timestep bucket counts to calibrate.")
@click.option("--method", type=click.Choice(["absmax", "percentile", "mse"]), default="mse", show_default=True)
@click.option("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "static_vs_dynamic.md"),
              show_default=True)
def main(model_spec, steps, num_samples, batch_size, seed, cal_samples, cal_seed, buckets, method, out):
    if cal_seed == seed:
        raise click.BadParameter("calibrate with a different seed than the evaluation", param_hint="--cal-seed")
    torch.set_num_threads(1)  # the CPU is shared: one thread is faster than two fighting
    model, ev = load_model(model_spec), DigitsEvaluator()
    bucket_counts = [int(k) for k in buckets.split(",")]
    t_all = time.time()
    rows = []

    def add(bits, scales, x, ref, t0):
        p = psnr(x, ref)
        row = (bits, scales, f"{ev.frechet_distance(x):.2f}", f"{ev.confidence(x):.3f}",
               "inf" if math.isinf(p) else f"{p:.2f}", f"{time.time() - t0:.0f}")
        rows.append(row)
        print(" | ".join(row), flush=True)

    t0 = time.time()
    ref = sample_with(copy.deepcopy(model.unet), model, steps, num_samples, batch_size, seed)
    add("fp", "-", ref, ref, t0)
    with tempfile.TemporaryDirectory() as tmp:
        for w, a in BITS:
            dyn = QuantConfig(mode="modiff", weight_bits=w, act_bits=a)
            t0 = time.time()
            add(f"W{w}A{a}", "dynamic", sample_with(quantize(copy.deepcopy(model.unet), dyn), model, steps, num_samples,
                                                   batch_size, seed), ref, t0)
            static = dyn.replace(scale_mode="static")
            for k in bucket_counts:
                t0 = time.time()
                data = calibrate(model, static, Trajectories("ddim", steps, cal_samples, cal_samples, cal_seed),
                                 method=method, buckets=k, progress=False)
                path = write_calibration(Path(tmp) / f"w{w}a{a}-k{k}.json", data)
                cal = load_calibration(path, model.content_hash, static)
                unet = quantize(copy.deepcopy(model.unet), static)
                cal.apply(unet)
                x = sample_with(unet, model, steps, num_samples, batch_size, seed)
                add(f"W{w}A{a}", f"static, {k} bucket{'s' if k > 1 else ''}", x, ref, t0)

    table = ["| config | delta scales | FD-digits (lower is better) | confidence | PSNR-to-FP (dB) "
             "| seconds (incl. calibration) |",
             "|---|---|---:|---:|---:|---:|"] + [f"| {' | '.join(r)} |" for r in rows]
    cmd = (f"python benchmarks/static_vs_dynamic.py --model {model_spec} --steps {steps} --num-samples {num_samples} "
           f"--batch-size {batch_size} --seed {seed} --cal-samples {cal_samples} --cal-seed {cal_seed} "
           f"--buckets {buckets} --method {method}")
    text = OUT_TEMPLATE.format(table="\n".join(table), model=model.name, hash=model.content_hash[:19], steps=steps,
                               n=num_samples, seed=seed, cal_samples=cal_samples, cal_seed=cal_seed, method=method,
                               minutes=(time.time() - t_all) / 60, cmd=cmd)
    print("\n".join(table))
    atomic_write_text(out, text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
