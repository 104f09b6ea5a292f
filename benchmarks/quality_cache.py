"""Issue 33, point 4: caching for diffusion transformers, ours beside diffusers' own cache hooks.

    python benchmarks/quality_cache.py run --models digits_dit,digits_dit_b --samplers ddim:50 --guidance 1,2
    python benchmarks/quality_cache.py table
    python benchmarks/quality_cache.py plot --out docs/quality_cache.png

Methods (one spec each, comma-separated in --methods):
    ours:VARIANT:N:D:W our block reuse through the CLI (quality_reuse.py's variants: deepcache = FP reuse,
                       ptq-w8a8, modiff-w8a4, modiff-w4a4, nocomp-w8a4, each with -lin / -tay forecasts),
                       exported with --reuse-interval N --reuse-depth D --reuse-warmup W (W may be left out: 0)
                       and sampled by ONNX Runtime, 1 thread
    taylorseer:N:O     diffusers' TaylorSeerCache on the FP model: cache_interval N, max_order O, every
                       transformer block cached (cache_identifiers), factors in float32
    fbcache:T          diffusers' FirstBlockCache, threshold T (the adaptive rule: first block's residual change)
    magcache:T         diffusers' MagCache, threshold T, magnitude ratios calibrated on this model and sampler
                       (one FP trajectory of 16 samples with calibrate=True, as its docs ask)

Every row starts from the same noise as the FP reference (quality_recipe.fp_reference). Compute: `macs_frac` is
the Conv/Linear MACs a trajectory computes over steps x the full model's (attention score products are not
counted by either side). Ours: from the schedule and the deep layers (quality_reuse.macs_fraction); the hooks:
counted, every Linear/Conv2d call's MACs summed by forward hooks during the trajectory, since what they skip is
decided at run time.
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
from quality_recipe import fp_reference  # noqa: E402
from quality_reuse import _records, build, macs_fraction  # noqa: E402

from modiff_export.backends import make_runner  # noqa: E402
from modiff_export.evaluation.cost import model_macs  # noqa: E402
from modiff_export.evaluation.metrics import DigitsEvaluator, psnr  # noqa: E402
from modiff_export.harness.cache_peers import HOOKS, sample_hook  # noqa: E402
from modiff_export.manifest import Manifest  # noqa: E402
from modiff_export.models import load_model  # noqa: E402
from modiff_export.sampling import Trajectories, sample_model  # noqa: E402

RESULTS = ROOT / "docs" / "quality_cache.jsonl"


def sample_ours(work: Path, model, name: str, spec: str, traj: Trajectories) -> tuple[torch.Tensor, float, dict]:
    _, variant, n, d, *w = spec.split(":")
    graphs, secs = build(work, name, variant, int(n), int(d), int(w[0]) if w else 0)
    manifest = Manifest.load(graphs)
    runner = make_runner("ort", folder=graphs, threads=1)
    x = sample_model(model, manifest.quant_config, traj, backend="ort", progress=False, runner=runner)
    runner.deactivate()
    return x, macs_fraction(model_macs(model), manifest, traj.steps), {"tag": manifest.quant_config.tag, **secs}


@click.group()
def main():
    """Caching for diffusion transformers: quality against compute, ours and diffusers' hooks."""


@main.command()
@click.option("--models", default="digits_dit,digits_dit_b", show_default=True)
@click.option("--methods", required=True, help="Comma list of method specs (module docstring).")
@click.option("--samplers", default="ddim:50", show_default=True)
@click.option("--guidance", default="1,2", show_default=True, help="Comma list of guidance scales.")
@click.option("--num-samples", "n", default=256, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("/tmp/quality_cache"),
              show_default=True, help="Calibration files and graph folders (reused when present).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("/tmp/qa_cache"),
              show_default=True, help="FP samples (shared with quality_recipe.py).")
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=RESULTS, show_default=True)
def run(models, methods, samplers, guidance, n, seed, work, cache_dir, results):
    """Sample every (model, sampler, guidance, method) cell not yet in --results; one JSON line each."""
    torch.set_num_threads(1)
    work.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    ev = DigitsEvaluator()
    done = set()
    if results.is_file():
        done = {(r["model"], r["sampler"], r["guidance"], r["method"], r["n"], r["seed"])
                for r in map(json.loads, results.read_text().splitlines())}
    for name in models.split(","):
        model = load_model(name)
        for sampler in samplers.split(","):
            sched, steps = sampler.split(":")
            for g in map(float, guidance.split(",")):
                ref = None
                for spec in methods.split(","):
                    if (name, sampler, g, spec, n, seed) in done:
                        continue
                    ref = ref if ref is not None else fp_reference(model, sched, int(steps), n, seed, cache_dir, g)
                    traj = Trajectories(sched, int(steps), n, n, seed, guidance_scale=g)
                    t0 = time.time()
                    if spec.split(":")[0] in HOOKS:
                        x, frac, extra = (*sample_hook(model, spec, traj), {})
                    else:
                        x, frac, extra = sample_ours(work, model, name, spec, traj)
                    fd, fd_fp, p = ev.frechet_distance(x), ev.frechet_distance(ref), psnr(x, ref)
                    rec = {"model": name, "model_hash": model.content_hash[:19], "sampler": sampler, "guidance": g,
                           "method": spec, "n": n, "seed": seed, "fd": round(fd, 3), "fd_fp": round(fd_fp, 3),
                           "fd_rel": round(100 * (fd - fd_fp) / fd_fp, 2),
                           "psnr": None if math.isinf(p) else round(p, 2), "macs_frac": round(frac, 4),
                           "sample_s": round(time.time() - t0, 1), **extra}
                    with results.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                    print(json.dumps(rec), flush=True)


def _family(method: str) -> str:
    """The curve a row belongs to: the method without its compute knob (interval / threshold)."""
    parts = method.split(":")
    if parts[0] == "ours":
        return f"{parts[1]} D={parts[3]}" + (f" W={parts[4]}" if len(parts) > 4 and parts[4] != "0" else "")
    return f"{parts[0]} order {parts[2]}" if parts[0] == "taylorseer" else parts[0]


@main.command()
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=RESULTS, show_default=True)
@click.option("--seed", default=0, show_default=True)
def table(results, seed):
    """Markdown: one line per method, (model, sampler, guidance) as columns: MACs computed, FD rel. to FP, PSNR."""
    recs = _records(results, seed)
    cols = sorted({(r["model"], r["sampler"], r["guidance"]) for r in recs})
    get = {(r["model"], r["sampler"], r["guidance"], r["method"]): r for r in recs}
    methods = sorted({r["method"] for r in recs}, key=lambda m: (_family(m), m))
    print("| method | " + " | ".join(f"{m} {s} g{g:g}" for m, s, g in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for meth in methods:
        cells = [get.get((*c, meth)) for c in cols]
        print(f"| {meth} | " + " | ".join("-" if r is None else f"{r['macs_frac']:.2f}: {r['fd_rel']:+.1f}% "
                                          f"({r['psnr']:.1f} dB)" for r in cells) + " |")


@main.command()
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=RESULTS, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=ROOT / "docs" / "quality_cache.png",
              show_default=True)
@click.option("--metric", type=click.Choice(["fd_rel", "psnr"]), default="fd_rel", show_default=True)
def plot(results, seed, out, metric):
    """Quality against the fraction of MACs computed, one curve per method family, a panel per column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = _records(results, seed)
    cols = sorted({(r["model"], r["sampler"], r["guidance"]) for r in recs})
    fams = sorted({_family(r["method"]) for r in recs})
    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 3.8), squeeze=False)
    for ax, col in zip(axes[0], cols):
        for i, fam in enumerate(fams):
            pts = sorted((r["macs_frac"], r[metric]) for r in recs
                         if (r["model"], r["sampler"], r["guidance"]) == col and _family(r["method"]) == fam
                         and r[metric] is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, color=f"C{i % 10}", ls="-" if i < 10 else "--", label=fam)
        if metric == "fd_rel":
            ax.axhline(5, color="grey", lw=0.8, ls=":")
        ax.axvline(0.40, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{col[0]} {col[1]} guidance {col[2]:g}", fontsize=9)
        ax.set_xlabel("fraction of the full model's MACs computed")
        ax.set_ylabel("FD vs FP (%)" if metric == "fd_rel" else "PSNR to FP (dB)")
    axes[0][-1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
