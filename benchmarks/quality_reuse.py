"""Issue 22, point 3: quality of block reuse (DeepCache-style), MoDiff beside its baselines, through the CLI.

    python benchmarks/quality_reuse.py run --models digits,digits_b --intervals 2,3,5 --depths 1,2
    python benchmarks/quality_reuse.py table
    python benchmarks/quality_reuse.py plot --out docs/quality_reuse.png

Variants (M = model; every one exported with `--reuse-interval N --reuse-depth D`, sampled by ONNX Runtime,
1 thread, from the same noise as full precision):
    deepcache     export --model M --mode fp                                    (DeepCache itself)
    ptq-w8a8      export --model M --mode ptq --weight-bits 8 --act-bits 8      (plain PTQ with the same reuse)
    modiff-w8a4   calibrate (recommended recipe, no reuse) + export --calibration F
    modiff-w4a4   the same at W4A4
    nocomp-w8a4   modiff-w8a4 with --no-reuse-compensation (the reused layers update a_hat = x)
    *-lin         the same with --reuse-forecast linear (reused calls read the deep feature extrapolated from
                  the last two full calls, docs/design.md section 1.2)
    modiff-w8a4-lin-deep8   modiff-w8a4-lin with the deep (reused) branch at W8A8 (--int8-layers, calibrated so)

One JSON line per (model, sampler, variant, interval, depth) in --results (done cells are skipped): FD relative
to FP, PSNR to FP, BOPs per trajectory vs FP, and the fraction of the full UNet's MACs the trajectory computes
(`macs_frac`: what a runtime whose 4-bit activations execute as 8-bit pays for). The rows without reuse
(interval 1) are in docs/quality_recipe.jsonl (`calibrated`), same noise, same n.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import click
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from quality_recipe import cli, fp_reference  # noqa: E402

from modiff_export import QuantConfig  # noqa: E402
from modiff_export.backends import make_runner  # noqa: E402
from modiff_export.evaluation import cost  # noqa: E402
from modiff_export.evaluation.cost import bops_per_trajectory, model_macs  # noqa: E402
from modiff_export.evaluation.metrics import DigitsEvaluator, psnr  # noqa: E402
from modiff_export.manifest import Manifest  # noqa: E402
from modiff_export.models import load_model  # noqa: E402
from modiff_export.sampling import Trajectories, sample_model  # noqa: E402

RESULTS = ROOT / "docs" / "quality_reuse.jsonl"
VARIANTS = {  # name -> (export options, calibration bits or None)
    "deepcache": (["--mode", "fp"], None),
    "ptq-w8a8": (["--mode", "ptq", "--weight-bits", "8", "--act-bits", "8"], None),
    "modiff-w8a4": (["--weight-bits", "8", "--act-bits", "4"], (8, 4)),
    "modiff-w4a4": (["--weight-bits", "4", "--act-bits", "4"], (4, 4)),
    "nocomp-w8a4": (["--weight-bits", "8", "--act-bits", "4", "--no-reuse-compensation"], (8, 4)),
    "deepcache-lin": (["--mode", "fp", "--reuse-forecast", "linear"], None),
    "modiff-w8a4-lin": (["--weight-bits", "8", "--act-bits", "4", "--reuse-forecast", "linear"], (8, 4)),
    "modiff-w4a4-lin": (["--weight-bits", "4", "--act-bits", "4", "--reuse-forecast", "linear"], (4, 4)),
    "ptq-w8a8-lin": (["--mode", "ptq", "--weight-bits", "8", "--act-bits", "8", "--reuse-forecast", "linear"], None),
    "nocomp-w8a4-lin": (["--weight-bits", "8", "--act-bits", "4", "--no-reuse-compensation", "--reuse-forecast",
                         "linear"], (8, 4)),
    # the second-order (Taylor) forecast, design section 1.2 (issue 33)
    "deepcache-tay": (["--mode", "fp", "--reuse-forecast", "taylor"], None),
    "ptq-w8a8-tay": (["--mode", "ptq", "--weight-bits", "8", "--act-bits", "8", "--reuse-forecast", "taylor"], None),
    "modiff-w8a4-tay": (["--weight-bits", "8", "--act-bits", "4", "--reuse-forecast", "taylor"], (8, 4)),
    "modiff-w4a4-tay": (["--weight-bits", "4", "--act-bits", "4", "--reuse-forecast", "taylor"], (4, 4)),
    "nocomp-w8a4-tay": (["--weight-bits", "8", "--act-bits", "4", "--no-reuse-compensation", "--reuse-forecast",
                         "taylor"], (8, 4)),
    # the deep (reused) branch at W8A8 through --int8-layers, calibrated so: free where 4-bit activations run
    # as 8-bit, and its multi-step deltas are the large ones
    "modiff-w8a4-lin-deep8": (["--weight-bits", "8", "--act-bits", "4", "--reuse-forecast", "linear"], (8, 4)),
}
DEEP8 = ("modiff-w8a4-lin-deep8",)


def deep_patterns(model: str, depth: int) -> list[str]:
    """--int8-layers options that keep the deep branch of `depth` at W8A8 (quant/reuse.deep_branch)."""
    from modiff_export.quant.reuse import deep_branch

    prefixes, _ = deep_branch(load_model(model).unet, depth)
    return [arg for p in prefixes for arg in ("--int8-layers", p + ".*")]


def build(work: Path, model: str, variant: str, interval: int, depth: int, warmup: int = 0) -> tuple[Path, dict]:
    """The graph folder of one cell (made with the CLI unless already there) and its CLI seconds."""
    opts, cal_bits = VARIANTS[variant]
    secs, extra = {}, []
    deep8 = deep_patterns(model, depth) if variant in DEEP8 else []
    opts = [*opts, *deep8]
    if cal_bits is not None:
        w, a = cal_bits
        cal = work / (f"{model}-w{w}a{a}" + (f"-deep8-d{depth}" if deep8 else "") + ".json")
        if not cal.exists():  # calibrated without reuse: the weights (GPTQ) do not depend on the schedule
            secs["calibrate_s"] = cli("calibrate", "--model", model, "--weight-bits", str(w), "--act-bits", str(a),
                                      *deep8, "--out", str(cal))
        extra = ["--calibration", str(cal)]
    graphs = work / (f"{model}-{variant}-r{interval}d{depth}" + (f"w{warmup}" if warmup else ""))
    if not graphs.exists():
        secs["export_s"] = cli("export", "--model", model, *opts, *extra, "--reuse-interval", str(interval),
                               "--reuse-depth", str(depth), *(["--reuse-warmup", str(warmup)] if warmup else []),
                               "--target", "ort", "--out", str(graphs))
    return graphs, secs


def macs_fraction(macs, manifest: Manifest, steps: int) -> float:
    """Computed MACs over the trajectory / (steps x a full call): the schedule's work, bits aside."""
    return cost.macs_fraction(macs, manifest.quant_config, steps, frozenset(manifest.reuse.deep_layers))


@click.group()
def main():
    """Quality of block reuse through export + ONNX Runtime."""


@main.command()
@click.option("--models", default="digits,digits_b", show_default=True)
@click.option("--variants", default=",".join(VARIANTS), show_default=True)
@click.option("--intervals", default="2,3,5", show_default=True)
@click.option("--depths", default="1,2", show_default=True)
@click.option("--samplers", default="ddim:50,dpmpp:20", show_default=True)
@click.option("--num-samples", "n", default=256, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("/tmp/quality_reuse"),
              show_default=True, help="Calibration files and graph folders (reused when present).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("/tmp/qa_cache"),
              show_default=True, help="FP samples (shared with quality_ablation.py).")
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=RESULTS, show_default=True)
def run(models, variants, intervals, depths, samplers, n, seed, work, cache_dir, results):
    """Build each cell with the CLI, sample it with ONNX Runtime from the same noise as FP."""
    torch.set_num_threads(1)
    work.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    ev = DigitsEvaluator()
    done = set()
    if results.is_file():
        for r in map(json.loads, results.read_text().splitlines()):
            done.add((r["model"], r["sampler"], r["variant"], r["interval"], r["depth"], r["n"], r["seed"]))
    for name in models.split(","):
        model = load_model(name)
        macs = model_macs(model)
        for depth in map(int, depths.split(",")):
            for interval in map(int, intervals.split(",")):
                for variant in variants.split(","):
                    graphs, secs = build(work, name, variant, interval, depth)
                    manifest = Manifest.load(graphs)
                    cfg = manifest.quant_config
                    for sampler in samplers.split(","):
                        if (name, sampler, variant, interval, depth, n, seed) in done:
                            continue
                        sched, steps = sampler.split(":")
                        steps = int(steps)
                        ref = fp_reference(model, sched, steps, n, seed, cache_dir)
                        t0 = time.time()
                        runner = make_runner("ort", folder=graphs, threads=1)
                        x = sample_model(model, cfg, Trajectories(sched, steps, n, n, seed), backend="ort",
                                         progress=False, runner=runner)
                        runner.deactivate()  # frees its caches now (batch n: ~0.8 GB), not when gc finds the cycle
                        fd, fd_fp, p = ev.frechet_distance(x), ev.frechet_distance(ref), psnr(x, ref)
                        deep = frozenset(manifest.reuse.deep_layers)
                        b = bops_per_trajectory(macs, cfg, steps, deep)
                        rec = {"model": name, "model_hash": model.content_hash[:19], "sampler": sampler,
                               "variant": variant, "tag": cfg.tag, "interval": interval, "depth": depth, "n": n,
                               "seed": seed, "fd": round(fd, 3), "fd_fp": round(fd_fp, 3),
                               "fd_rel": round(100 * (fd - fd_fp) / fd_fp, 2),
                               "psnr": None if math.isinf(p) else round(p, 2),
                               "bops_vs_fp": round(b / bops_per_trajectory(macs, QuantConfig(mode="fp"), steps), 5),
                               "macs_frac": round(macs_fraction(macs, manifest, steps), 4),
                               "sample_s": round(time.time() - t0, 1), **secs}
                        secs = {}
                        with results.open("a") as f:
                            f.write(json.dumps(rec) + "\n")
                        print(json.dumps(rec), flush=True)


def _records(results: Path, seed: int) -> list[dict]:
    return [r for r in map(json.loads, results.read_text().splitlines()) if r["seed"] == seed]


@main.command()
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=RESULTS, show_default=True)
@click.option("--seed", default=0, show_default=True)
def table(results, seed):
    """Markdown: one line per (depth, interval, variant), models x samplers as columns: FD rel. to FP (PSNR)."""
    recs = _records(results, seed)
    cols = sorted({(r["model"], r["sampler"]) for r in recs}, key=lambda c: (c[0], c[1] != "ddim:50"))
    get = {(r["model"], r["sampler"], r["depth"], r["interval"], r["variant"]): r for r in recs}
    rows = sorted({(r["depth"], r["interval"], r["variant"]) for r in recs},
                  key=lambda k: (k[0], k[1], list(VARIANTS).index(k[2])))
    print("| depth | interval | variant | MACs computed (DDIM-50) | " + " | ".join(f"{m} {s}" for m, s in cols) + " |")
    print("|---:|---:|---|---:|" + "---:|" * len(cols))
    for depth, interval, variant in rows:
        cells = [get.get((m, s, depth, interval, variant)) for m, s in cols]
        ddim = next((r for r, (m, s) in zip(cells, cols) if r and s == "ddim:50"), None)
        frac = "-" if ddim is None else f"{ddim['macs_frac']:.2f}"
        print(f"| {depth} | {interval} | {variant} | {frac} | " + " | ".join(
            "-" if r is None else f"{r['fd_rel']:+.1f}% ({r['psnr']:.1f} dB)" for r in cells) + " |")


@main.command()
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=RESULTS, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=ROOT / "docs" / "quality_reuse.png",
              show_default=True)
@click.option("--variants", default="deepcache,ptq-w8a8,modiff-w8a4,modiff-w4a4,nocomp-w8a4", show_default=True,
              help="Comma list of the variants to draw (the forecast plot: deepcache,deepcache-lin,modiff-w8a4,...).")
@click.option("--depths", default=None, help="Comma list of depths to draw (default: all).")
def plot(results, seed, out, variants, depths):
    """FD relative to FP against trajectory cost (BOPs vs FP, log), one panel per (model, sampler)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    chosen = variants.split(",")
    recs = [r for r in _records(results, seed) if r["variant"] in chosen
            and (depths is None or str(r["depth"]) in depths.split(","))]
    cols = sorted({(r["model"], r["sampler"]) for r in recs}, key=lambda c: (c[0], c[1] != "ddim:50"))
    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 3.8), squeeze=False)
    markers = {1: "o", 2: "s", 3: "^"}
    for ax, (m, s) in zip(axes[0], cols):
        for i, variant in enumerate(chosen):
            for depth in sorted({r["depth"] for r in recs}):
                pts = sorted((r["bops_vs_fp"], r["fd_rel"], r["interval"]) for r in recs
                             if (r["model"], r["sampler"], r["variant"], r["depth"]) == (m, s, variant, depth))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers.get(depth, "x"), color=f"C{i}",
                            label=f"{variant} D={depth}", linestyle="-" if depth == 1 else "--")
                    for x, y, k in pts:
                        ax.annotate(str(k), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.axhline(5, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # the minor labels overlap
        ax.set_title(f"{m} {s}")
        ax.set_xlabel("BOPs per trajectory / FP (labels: interval)")
        ax.set_ylabel("FD vs FP (%)")
    axes[0][-1].legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
