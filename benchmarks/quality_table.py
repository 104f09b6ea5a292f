"""Quality of the embedded digits model under PTQ vs MoDiff, written to docs/quality.md.

    python benchmarks/quality_table.py [--num-samples 256] [--steps 25]

For each scheduler: full precision, then ptq and modiff at W8A8, W8A4, W8A3, W4A4 (dynamic scales,
per-sample granularity), all from the same noise (seed), so PSNR-to-FP compares like with like.

Any other model (issue 32: digits_flux, flow matching, class labels through its label encoder) writes its raw
rows to --raw-out instead of the page, over steps x guidance scales, with the recommended recipe if asked:

    python benchmarks/quality_table.py --model digits_flux --schedulers flow_euler --steps 28,50 --guidance 1,2 \
        --recipe recommended --gptq w4a4 --spread-seeds 1000,2000 --batch-size 32 \
        --raw-out docs/digits_flux_quality_run1.txt --results docs/digits_flux_quality.jsonl

Rows there: `<mode>-wWaA` plus `+R` (the recipe's W8A8 layers, calibration.recipe.apply_recipe, on PTQ and MoDiff
alike; nothing at W8A8) and `+gptq` (every quantized weight rounded with GPTQ over the calibration Hessians, what
the recipe does with a calibration file; benchmarks/quality_ablation.py's `+gptq8`). FD relative to FP from the
same noise, PSNR to FP, label accuracy (the digits classifier reads the requested digit) for class-conditional
models, BOPs per trajectory vs FP32. --spread-seeds: FP alone from other noise seeds (the FD seed-to-seed spread).
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks (quality_ablation, quality_recipe)
from modiff_export import QuantConfig  # noqa: E402
from modiff_export.evaluation.metrics import DigitsEvaluator, psnr  # noqa: E402
from modiff_export.fsutil import atomic_write_text  # noqa: E402
from modiff_export.models import load_model  # noqa: E402
from modiff_export.sampling import Trajectories, sample_model  # noqa: E402

BITS = [(8, 8), (8, 4), (8, 3), (4, 4)]
FINDINGS_HEADER = "## What this model shows"


@click.command()
@click.option("--model", "model_name", default="digits", show_default=True,
              help="digits: the table of docs/quality.md; any other load_model name needs --raw-out.")
@click.option("--schedulers", default="ddim,dpmpp", show_default=True, help="Comma list (flow models: flow_euler).")
@click.option("--steps", default="25", show_default=True, help="Sampling steps, comma list (--raw-out only: several).")
@click.option("--guidance", default="1", show_default=True,
              help="Classifier-free guidance scales, comma list (class-conditional models; --raw-out only).")
@click.option("--bits", default="w8a8,w8a4,w8a3,w4a4", show_default=True, help="Comma list of wWaA.")
@click.option("--recipe", default="paper", show_default=True, type=click.Choice(["paper", "recommended"]),
              help="recommended: the recipe's W8A8 layers in every sub-8-bit PTQ and MoDiff row (--raw-out only).")
@click.option("--gptq", "gptq_bits", default="",
              help="Comma list of wWaA whose rows round every quantized weight with GPTQ (the recipe with a "
                   "calibration file; --raw-out only).")
@click.option("--spread-seeds", default="", help="FP alone from these other noise seeds (FD seed spread; --raw-out).")
@click.option("--num-samples", default=256, show_default=True)
@click.option("--batch-size", default=128, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--raw-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the raw rows and summary tables here (command line at the top) instead of --out.")
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="--raw-out: JSON lines, one per cell; cells already there are not recomputed.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("/tmp/qa_cache"),
              show_default=True, help="--raw-out: FP samples (shared with quality_recipe.py layers).")
@click.option("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "quality.md"), show_default=True)
def main(model_name, schedulers, steps, guidance, bits, recipe, gptq_bits, spread_seeds, num_samples, batch_size, seed,
         raw_out, results, cache_dir, out):
    torch.set_num_threads(1)  # the CPU is shared: one thread is faster than two fighting
    if raw_out is not None:
        return raw_table(model_name, schedulers, [int(v) for v in steps.split(",")],
                         [float(v) for v in guidance.split(",")], bits, recipe, gptq_bits, spread_seeds, num_samples,
                         batch_size, seed, raw_out, results, cache_dir)
    if model_name != "digits" or "," in steps or guidance != "1" or recipe != "paper" or gptq_bits or spread_seeds:
        raise click.UsageError("--model other than digits, several --steps, --guidance, --recipe recommended, --gptq "
                               "and --spread-seeds write raw rows: give --raw-out")
    steps = int(steps)
    BITS[:] = [tuple(int(v) for v in wa[1:].split("a")) for wa in bits.split(",")]
    model, ev = load_model("digits"), DigitsEvaluator()
    configs = [QuantConfig(mode="fp")] + [QuantConfig(mode=m, weight_bits=w, act_bits=a)
                                          for w, a in BITS for m in ("ptq", "modiff")]
    rows, t_all = [], time.time()
    for sched in schedulers.split(","):
        ref = None
        for cfg in configs:
            t0 = time.time()
            x = sample_model(model, cfg, Trajectories(sched, steps, num_samples, batch_size, seed), progress=False)
            ref = x if ref is None else ref
            p = psnr(x, ref)
            row = (sched, cfg.tag, f"{ev.frechet_distance(x):.2f}", f"{ev.confidence(x):.3f}",
                   "inf" if math.isinf(p) else f"{p:.2f}", f"{time.time() - t0:.0f}")
            rows.append(row)
            print(" | ".join(row), flush=True)
    from modiff_export.models.data import digits_split  # (was modiff_export.data, which no longer exists)

    real = ev.frechet_distance(digits_split("train")[0][:num_samples])
    table = ["| scheduler | config | FD-digits (lower is better) | confidence | PSNR-to-FP (dB) | seconds |",
             "|---|---|---:|---:|---:|---:|"] + [f"| {' | '.join(r)} |" for r in rows]
    cmd = (f"python benchmarks/quality_table.py --schedulers {schedulers} --steps {steps} "
           f"--num-samples {num_samples} --batch-size {batch_size} --seed {seed}")
    text = OUT_TEMPLATE.format(table="\n".join(table), cmd=cmd, n=num_samples, steps=steps, real=real,
                               minutes=(time.time() - t_all) / 60, hash=model.content_hash[:19])
    # the findings are written by a person who read the table: keep them across reruns
    old = Path(out).read_text() if Path(out).is_file() else ""
    findings = old.split(FINDINGS_HEADER,
                         1)[1].strip() if FINDINGS_HEADER in old else "(to be written after reading the table)"
    atomic_write_text(out, text.replace("{FINDINGS}", findings))
    print(f"wrote {out}")


def row_config(model, mode: str, w: int, a: int, recipe: str) -> QuantConfig:
    from modiff_export.calibration.recipe import apply_recipe

    cfg = QuantConfig(mode=mode, weight_bits=w, act_bits=a)
    return apply_recipe(cfg, model.unet, recipe)


def raw_table(model_name, schedulers, steps_list, guidances, bits, recipe, gptq_bits, spread_seeds, n, bs, seed,
              raw_out: Path, results: Path | None, cache_dir: Path):
    """Issue 32 (any model, flow matching and class labels included): rows over schedulers x steps x guidance,
    FD relative to FP from the same noise, PSNR to FP, label accuracy; raw text to `raw_out`."""
    from quality_ablation import build_runner, fp_samples

    from modiff_export.evaluation.cost import bops_per_trajectory, model_macs
    from modiff_export.sampling import class_labels, label_classes

    model, ev = load_model(model_name), DigitsEvaluator()
    macs = model_macs(model)
    gptq = set(gptq_bits.split(",")) - {""}
    rows = [("fp", QuantConfig(mode="fp"), set())]
    for wa in bits.split(","):
        w, a = (int(v) for v in wa[1:].split("a"))
        for mode in ("ptq", "modiff"):
            cfg = row_config(model, mode, w, a, recipe)
            feats = {"gptq8"} if wa in gptq else set()
            rows.append((cfg.tag + ("+R" if cfg.int8_layers else "") + ("+gptq" if feats else ""), cfg, feats))
    cmd = "python benchmarks/quality_table.py " + " ".join(sys.argv[1:])
    done = {}
    if results is not None and results.is_file():
        for line in results.read_text().splitlines():
            r = json.loads(line)
            done[(r["model"], r["sampler"], r["guidance"], r["row"], r["n"], r["bs"], r["seed"])] = r
    lines = [f"# {cmd}", f"# torch {torch.__version__}, one thread; model {model.content_hash[:19]}; "
                         f"started {time.strftime('%Y-%m-%dT%H:%M:%S%z')}"]
    raw_out.parent.mkdir(parents=True, exist_ok=True)
    raw_out.write_text("\n".join(lines) + "\n")
    recs, t_all = [], time.time()

    def emit(rec):
        recs.append(rec)
        line = json.dumps(rec)
        print(line, flush=True)
        with raw_out.open("a") as f:
            f.write(line + "\n")
        if results is not None and not rec.get("cached"):
            with results.open("a") as f:
                f.write(line + "\n")

    seeds = [seed] + [int(v) for v in spread_seeds.split(",") if v]
    for g in guidances:
        for sched in schedulers.split(","):
            for steps in steps_list:
                sampler = f"{sched}:{steps}"
                for s in seeds:
                    traj = Trajectories(sched, steps, n, bs, s, guidance_scale=g)
                    labels = class_labels(model, traj, 0, n)[0] if label_classes(model) else None
                    ref = None
                    for row, cfg, feats in rows if s == seed else rows[:1]:
                        key = (model_name, sampler, g, row, n, bs, s)
                        if key in done:
                            emit({**done[key], "cached": True})
                            continue
                        t0 = time.time()
                        if ref is None:
                            ref = fp_samples(model, sched, steps, n, bs, s,
                                             cache_dir if bs == n else cache_dir / f"bs{bs}", g)
                        if row == "fp":
                            x, info = ref, {}
                        else:
                            runner, info = build_runner(model, cfg, feats)
                            x = sample_model(model, cfg, traj, progress=False, runner=runner)
                        fd, fd_fp, p = ev.frechet_distance(x), ev.frechet_distance(ref), psnr(x, ref)
                        b = bops_per_trajectory(macs, cfg, steps)
                        emit({"model": model_name, "sampler": sampler, "guidance": g, "row": row, "n": n, "bs": bs,
                              "seed": s, "fd": round(fd, 3), "fd_fp": round(fd_fp, 3),
                              "fd_rel": round(100 * (fd - fd_fp) / fd_fp, 2),
                              "psnr": None if math.isinf(p) else round(p, 2),
                              **({} if labels is None else {"label_acc": round(ev.label_accuracy(x, labels), 4)}),
                              "confidence": round(ev.confidence(x), 4),
                              "bops_vs_fp": round(b / bops_per_trajectory(macs, QuantConfig(mode="fp"), steps), 5),
                              "int8_layers": list(cfg.int8_layers), "seconds": round(time.time() - t0, 1), **info})
    summary = summarize(recs, seed, [r for r, _, _ in rows])
    summary.append(f"\n({(time.time() - t_all) / 60:.1f} min; cached cells not counted)")
    with raw_out.open("a") as f:
        f.write("\n".join(summary) + "\n")
    print("\n".join(summary))


def summarize(recs: list[dict], seed: int, row_names: list[str]) -> list[str]:
    """Markdown: rows x (sampler, guidance) columns, FD relative to FP (PSNR); then the FP seed spread."""
    cols = list(dict.fromkeys((r["sampler"], r["guidance"]) for r in recs))
    get = {(r["row"], r["sampler"], r["guidance"]): r for r in recs if r["seed"] == seed}
    out = ["| row | BOPs vs FP32 | " + " | ".join(f"{s} g{g:g}" for s, g in cols) + " |",
           "|---|---:|" + "---:|" * len(cols)]
    for row in row_names:
        cells = [get.get((row, s, g)) for s, g in cols]
        first = next((c for c in cells if c), None)
        if first is None:
            continue
        fmt = (lambda c: f"{c['fd']:.1f} ({c['label_acc']:.2f})" if "label_acc" in c else f"{c['fd']:.1f}") \
            if row == "fp" else (lambda c: f"{c['fd_rel']:+.1f}% ({c['psnr']:.1f} dB)")
        name = "fp (FD, label acc.)" if row == "fp" and "label_acc" in first else row
        out.append(f"| {name} | {first['bops_vs_fp']:.4g} | " + " | ".join("-" if c is None else fmt(c)
                                                                              for c in cells) + " |")
    spread = []
    for s, g in cols:
        fds = [(r["seed"], r["fd"]) for r in recs if r["row"] == "fp" and r["sampler"] == s and r["guidance"] == g]
        if len(fds) > 1:
            v = [fd for _, fd in fds]
            mean, sd = statistics.mean(v), statistics.stdev(v)
            spread.append(f"- {s} g{g:g}: FD " + ", ".join(f"{fd:.1f} (seed {k})" for k, fd in fds)
                          + f"; mean {mean:.1f}, sd {sd:.1f} ({100 * sd / mean:.1f}% of the mean), "
                          f"max - min {max(v) - min(v):.1f} ({100 * (max(v) - min(v)) / mean:.1f}%)")
    if spread:
        out += ["", "FP seed-to-seed spread (FD of FP from other noise seeds):", *spread]
    return out


OUT_TEMPLATE = """# Quality: plain PTQ vs MoDiff on the embedded digits model

Model `digits` ({hash}...), {n} samples per row, {steps} sampling steps, seed fixed, so every row starts
from the same noise. Dynamic activation scales, per-sample granularity, weights per output channel.
FD-digits: Frechet distance to the 359 held-out test digits in the feature space of the digits
classifier (real training digits, {n} of them, score {real:.2f}: the floor for this sample size).
Confidence: mean max softmax probability of that classifier. PSNR-to-FP: against the full-precision
samples from the same noise (data range 2). Measured on a shared 2-core CPU in {minutes:.1f} min.

{table}

Regenerate:

    {cmd}

## What this model shows

{{FINDINGS}}
"""

if __name__ == "__main__":
    main()
