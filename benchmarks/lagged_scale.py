"""Issue 21's open question, in the PyTorch reference: can the delta scale come from the previous step?

    python benchmarks/lagged_scale.py [--models digits,digits_b] [--samplers ddim:25,dpmpp:20] [--bits 4,3]
                                      [--margins 1.0,1.5] [--num-samples 128] [--out docs/lagged_scale.md]

Today every step graph computes s = absmax(x - a_hat) / qmax per sample and layer before it can quantize:
a reduction over the whole delta that splits OpenVINO's fused element-wise subgraph in two and reads the
delta twice (docs/speed.md). A lagged scale, s_k = margin * absmax(d_{k-1}) / qmax (the first step after the
prime keeps the dynamic scale), would let the step quantize in one pass, the absmax for the next step being a
side output. Error compensation keeps what the clip cuts in x - a_hat, so the next step carries it.
This measures the quality of that algorithm change before any graph is built: MoDiff W8A<bits> with the
recommended recipe (no calibration file), dynamic vs lagged at each margin, FD relative to FP and PSNR to FP,
the same noise for every row. Nothing here changes the package: the lagged scale is patched in.
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from modiff_export import QuantConfig  # noqa: E402
from modiff_export.backends.torch_runner import TorchRunner  # noqa: E402
from modiff_export.calibration.recipe import apply_recipe  # noqa: E402
from modiff_export.evaluation.metrics import DigitsEvaluator, psnr  # noqa: E402
from modiff_export.fsutil import atomic_write_text  # noqa: E402
from modiff_export.models import load_model  # noqa: E402
from modiff_export.quant import quantization as qz  # noqa: E402
from modiff_export.sampling import Trajectories, run_batches  # noqa: E402


def lagged(margin: float):
    """A MoDiffLayer._act_scale that returns margin x the previous step's absmax scale (per sample)."""
    dynamic = qz.MoDiffLayer._act_scale

    def act_scale(self, t):
        now = dynamic(self, t)  # [B, 1, ...]: this step's absmax scale, kept for the next step
        prev = getattr(self, "_lag", None)
        self._lag = now
        if self.calls <= 1 or prev is None or prev.shape != now.shape:  # the first delta after the prime
            return now
        return prev * margin
    return act_scale


def images(model, cfg: QuantConfig | None, traj: Trajectories, margin: float | None) -> torch.Tensor:
    unet = copy.deepcopy(model.unet)
    runner = TorchRunner(unet if cfg is None else qz.quantize(unet, apply_recipe(cfg, unet)))
    saved = qz.MoDiffLayer._act_scale
    if margin is not None:
        qz.MoDiffLayer._act_scale = lagged(margin)
    try:
        return run_batches(runner, model, traj, progress=False)
    finally:
        qz.MoDiffLayer._act_scale = saved


@click.command()
@click.option("--models", default="digits,digits_b", show_default=True)
@click.option("--samplers", default="ddim:25,dpmpp:20", show_default=True)
@click.option("--bits", default="4,3", show_default=True, help="Activation bits of MoDiff W8A<bits>.")
@click.option("--margins", default="1.0,1.5", show_default=True, help="Lagged scale = margin x last absmax.")
@click.option("--num-samples", default=128, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Also write the table here (markdown).")
def main(models, samplers, bits, margins, num_samples, out):
    torch.set_num_threads(1)
    ev = DigitsEvaluator()
    lines = ["| model | sampler | row | FD | FD vs FP | PSNR to FP |", "|---|---|---|---:|---:|---:|"]
    t0 = time.time()
    for name in models.split(","):
        model = load_model(name)
        for spec in samplers.split(","):
            sched, steps = spec.split(":")
            traj = Trajectories(sched, int(steps), num_samples, min(num_samples, 128), 0)
            fp = images(model, None, traj, None)
            fd_fp = ev.frechet_distance(fp)
            lines.append(f"| {name} | {spec} | fp | {fd_fp:.1f} | | |")
            for b in map(int, bits.split(",")):
                for m in [None] + [float(x) for x in margins.split(",")]:
                    img = images(model, QuantConfig(act_bits=b), traj, m)
                    fd = ev.frechet_distance(img)
                    row = f"W8A{b} " + ("dynamic" if m is None else f"lagged x{m:g}")
                    lines.append(f"| {name} | {spec} | {row} | {fd:.1f} | {100 * (fd / fd_fp - 1):+.1f}% | "
                                 f"{psnr(img, fp):.1f} dB |")
                    print(lines[-1], f"({time.time() - t0:.0f} s)", flush=True)
    table = "\n".join(lines)
    print(table)
    if out is not None:
        cmd = (f"python benchmarks/lagged_scale.py --models {models} --samplers {samplers} --bits {bits} "
               f"--margins {margins} --num-samples {num_samples}")
        atomic_write_text(out, f"`{cmd}`\n\n{table}\n")


if __name__ == "__main__":
    main()
