"""Quality ablation: models x samplers x configs (+ improvements), same noise for every row.

    python benchmarks/quality_ablation.py run --models digits,digits_b --rows fp,modiff-w8a3,modiff-w8a3+clip
    python benchmarks/quality_ablation.py spread --models digits,digits_b --seeds 1000,2000,3000
    python benchmarks/quality_ablation.py table            # Markdown from the results file

A row is `<mode>-w<W>a<A>` (or `fp`) plus optional `+feature`s:
    +io8    conv_in / conv_out kept at W8A8 (transformers: the patch embedding pos_embed.proj and proj_out*)
    +t8     time-embedding Linears at W8A8 (transformers: every *timestep_embedder.* Linear)
    +ada8   transformers: adaLN modulation Linears (*.norm1.linear, adaln_single.linear) and the caption
            projection at W8A8
    +clip   calibrated constant clip ratio on the dynamic per-sample delta scale (benchmarks/delta_clip.py)
    +kf<K>  keyframe refresh: a full-precision-activation prime call every K steps
    +gptq   GPTQ rounding of the <= 4-bit weights (quant/gptq.py)
    +gptq8  GPTQ rounding of all quantized weights, 8-bit ones too
    +wclip  per-channel MSE weight clip ratios (calibration.weight_clip_ratios)
Each row: FD-digits, FD relative to FP from the same noise, PSNR to FP, BOPs per trajectory vs FP32 and
vs the uniform W/A row. PyTorch reference, one thread. Results are appended to a JSON-lines file (a row
already there is not recomputed), FP samples are kept in --cache-dir for PSNR.
"""
from __future__ import annotations

import copy
import fnmatch
import json
import math
import statistics
import sys
import time
from pathlib import Path

import click
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from modiff_export import QuantConfig
from modiff_export.backends import make_runner
from modiff_export.calibration.recipe import linear_layer_names
from modiff_export.evaluation.cost import bops_per_trajectory, model_macs
from modiff_export.evaluation.metrics import DigitsEvaluator, frechet_distance_from_features, psnr
from modiff_export.models import load_model
from modiff_export.quant.quantization import modiff_layers, quantize
from modiff_export.sampling import Trajectories, sample_model

RESULTS = ROOT / "docs" / "quality_ablation.jsonl"
IO_LAYERS = ("conv_in", "conv_out", "pos_embed.proj", "proj_out*")  # UNets' convs; DiT/PixArt patchify + final
TIME_LAYERS = ("time_embedding.*", "*.time_emb_proj", "*timestep_embedder.*")
ADA_LAYERS = ("*.norm1.linear", "adaln_single.linear", "caption_projection.*")


def parse_row(row: str) -> tuple[QuantConfig, set[str]]:
    base, *feats = row.split("+")
    if base == "fp":
        return QuantConfig(mode="fp"), set(feats)
    mode, wa = base.split("-")
    w, a = wa[1:].split("a")
    int8 = ((IO_LAYERS if "io8" in feats else ()) + (TIME_LAYERS if "t8" in feats else ())
            + (ADA_LAYERS if "ada8" in feats else ()))
    kf = next((int(f[2:]) for f in feats if f.startswith("kf")), None)
    return QuantConfig(mode=mode, weight_bits=int(w), act_bits=int(a), int8_layers=int8,
                       keyframe_interval=kf), set(feats)


_HESSIANS: dict[str, dict] = {}


def build_runner(model, cfg: QuantConfig, feats: set[str]):
    from delta_clip import apply_delta_clip, calibrate_delta_clip

    from modiff_export.calibration.hessians import collect_hessians
    from modiff_export.quant.gptq import apply_gptq
    from modiff_export.quant.search import weight_clip_ratios

    unet = quantize(copy.deepcopy(model.unet), cfg)
    info = {}
    if "wclip" in feats:
        for layer in modiff_layers(unet):
            if not layer.skipped and layer.weight_bits < 8:
                layer.set_weight_clip(weight_clip_ratios(layer.inner.weight, layer.weight_bits))
    if "gptq" in feats or "gptq8" in feats:
        if model.name not in _HESSIANS:
            _HESSIANS[model.name] = collect_hessians(model)
        info["gptq_layers"] = len(apply_gptq(unet, _HESSIANS[model.name], 8 if "gptq8" in feats else 4))
    if "clip" in feats:
        ratios = calibrate_delta_clip(model, cfg)  # on the unmodified weights' deltas; ratios are bit-width driven
        apply_delta_clip(unet, ratios)
        info["clip_median"] = statistics.median(ratios.values())
    return make_runner("torch", unet), info


def load_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def guided(guidance: float) -> str:
    """File-name / row tag of a guidance scale ('' at 1.0, so the UNets' existing caches and rows stay valid)."""
    return "" if guidance == 1.0 else f"-g{guidance:g}"


def fp_samples(model, sched, steps, n, bs, seed, cache_dir: Path, guidance: float = 1.0) -> torch.Tensor:
    f = cache_dir / f"{model.name}-{model.content_hash[7:19]}-{sched}{steps}-n{n}-s{seed}{guided(guidance)}.pt"
    if f.is_file():
        return torch.load(f)
    x = sample_model(model, QuantConfig(mode="fp"), Trajectories(sched, steps, n, bs, seed, guidance_scale=guidance),
                     progress=False)
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save(x, f)
    return x


def measure(models, samplers, rows, n, bs, seed, results, cache_dir, guidance: float = 1.0):
    torch.set_num_threads(1)
    ev = DigitsEvaluator()
    done = {(r["model"], r["sampler"], r["n"], r["seed"], r["row"], r.get("guidance", 1.0))
            for r in load_results(results)}
    for name in models.split(","):
        model = load_model(name)
        macs = model_macs(model)
        for sampler in samplers.split(","):
            sched, steps = sampler.split(":")
            steps = int(steps)
            for row in rows.split(","):
                key = (name, sampler, n, seed, row, guidance)
                if key in done:
                    continue
                t0 = time.time()
                cfg, feats = parse_row(row)
                cfg = cfg.replace(int8_layers=tuple(p for p in cfg.int8_layers if any(  # this model's patterns only
                    fnmatch.fnmatchcase(n, p) for n in linear_layer_names(model.unet))))
                ref = fp_samples(model, sched, steps, n, bs, seed, cache_dir, guidance)
                fd_fp = ev.frechet_distance(ref)
                if row == "fp":
                    x, info = ref, {}
                else:
                    runner, info = build_runner(model, cfg, feats)
                    x = sample_model(model, cfg, Trajectories(sched, steps, n, bs, seed, guidance_scale=guidance),
                                     progress=False, runner=runner)
                fd, p = ev.frechet_distance(x), psnr(x, ref)
                torch.save(x, cache_dir / f"{name}-{sampler.replace(':', '')}-n{n}-s{seed}{guided(guidance)}-{row}.pt")
                uniform = QuantConfig(mode=cfg.mode, weight_bits=cfg.weight_bits, act_bits=cfg.act_bits)
                b = bops_per_trajectory(macs, cfg, steps)
                rec = {"model": name, "model_hash": model.content_hash[:19], "sampler": sampler, "n": n, "seed": seed,
                       "row": row, **({"guidance": guidance} if guidance != 1.0 else {}),
                       "fd": round(fd, 3), "fd_fp": round(fd_fp, 3),
                       "fd_rel": round(100 * (fd - fd_fp) / fd_fp, 2), "psnr": None if math.isinf(p) else round(p, 2),
                       "confidence": round(ev.confidence(x), 4), **label_agreement(ev, model, x, n, seed),
                       "bops_vs_fp": round(b / bops_per_trajectory(macs, QuantConfig(mode="fp"), steps), 5),
                       "bops_vs_uniform": round(b / bops_per_trajectory(macs, uniform, steps), 4),
                       "seconds": round(time.time() - t0, 1), **info}
                with results.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(json.dumps(rec), flush=True)


def label_agreement(ev, model, x, n, seed) -> dict:
    """Class-conditional models: the share of samples the metrics classifier reads as the requested digit."""
    if getattr(model, "num_classes", None) is None:
        return {}
    from modiff_export.sampling import class_labels

    labels, _ = class_labels(model, Trajectories(samples=n, batch_size=n, seed=seed), 0, n)
    return {"label_acc": round(ev.label_accuracy(x, labels), 4)}


COMMON = [
    click.option("--models", default="digits,digits_b", show_default=True,
                 help="Comma list: digits, digits_b, digits_dit, digits_dit_b."),
    click.option("--guidance", default=1.0, show_default=True, type=float,
                 help="Classifier-free guidance scale (class-conditional models; FP sampled with the same)."),
    click.option("--samplers", default="ddim:50,dpmpp:20", show_default=True, help="scheduler:steps, comma list."),
    click.option("--num-samples", "n", default=256, show_default=True),
    click.option("--batch-size", "bs", default=256, show_default=True),
    click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=RESULTS, show_default=True),
    click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("/tmp/qa_cache"),
                 show_default=True, help="FP samples kept here for PSNR."),
]


def common(f):
    for o in reversed(COMMON):
        f = o(f)
    return f


@click.group()
def cli():
    """Quality ablation of MoDiff configs and improvements on the digits models."""


@cli.command()
@common
@click.option("--rows", required=True, help="Comma list of rows (see module docstring).")
@click.option("--seed", default=0, show_default=True, help="Noise seed of every row.")
def run(models, guidance, samplers, n, bs, results, cache_dir, rows, seed):
    """Measure rows from the same noise."""
    measure(models, samplers, rows, n, bs, seed, results, cache_dir, guidance)


@cli.command()
@common
@click.option("--seeds", default="1000,2000,3000", show_default=True,
              help="Extra FP noise seeds (seed 0 comes from `run`).")
def spread(models, guidance, samplers, n, bs, results, cache_dir, seeds):
    """FD of full precision with other noise seeds: the seed-to-seed spread at this sample size."""
    for s in seeds.split(","):
        measure(models, samplers, "fp", n, bs, int(s), results, cache_dir, guidance)


@cli.command()
@common
@click.option("--rounds", default=200, show_default=True)
@click.option("--seed", default=0, show_default=True, help="Noise seed of the saved rows.")
def bootstrap(models, guidance, samplers, n, bs, results, cache_dir, rounds, seed):
    """Paired bootstrap of FD relative to FP (same resampled indices for the row and FP): its sd says
    which differences between rows from the same noise are real. Uses the samples saved by `run`."""
    ev = DigitsEvaluator()
    g = torch.Generator().manual_seed(0)
    for name in models.split(","):
        for sampler in samplers.split(","):
            tag = f"-s{seed}{guided(guidance)}-"
            files = [f for f in sorted(cache_dir.glob(f"{name}-{sampler.replace(':', '')}-n{n}{tag}*.pt"))
                     if not f.name.split(tag, 1)[1][:2].startswith("g")]  # another guidance scale's rows
            fp = next(iter(cache_dir.glob(f"{name}-*-{sampler.replace(':', '')}-n{n}{tag[:-1]}.pt")), None)
            if fp is None:
                continue
            ffp = ev.features(torch.load(fp))
            idx = [torch.randint(0, n, (n,), generator=g).numpy() for _ in range(rounds)]
            for f in files:
                fx = ev.features(torch.load(f))
                rel = [100 * (frechet_distance_from_features(fx[i], ev.real_features)
                              / frechet_distance_from_features(ffp[i], ev.real_features) - 1) for i in idx]
                row = f.name.split(tag, 1)[1][:-3]
                print(f"{name} {sampler} {row}: FD rel. to FP {statistics.mean(rel):+.1f}% "
                      f"(paired bootstrap sd {statistics.stdev(rel):.1f} points)", flush=True)


@cli.command()
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=RESULTS, show_default=True)
@click.option("--num-samples", "n", default=256, show_default=True)
def table(results, n):
    """Markdown table: one line per row, models x samplers as columns, FD rel. to FP (PSNR) and BOPs."""
    recs = [r for r in load_results(results) if r["n"] == n]
    for r in recs:  # a column per model x sampler (x guidance scale, class-conditional models)
        r["col"] = r["sampler"] + (f" g{r['guidance']:g}" if r.get("guidance", 1.0) != 1.0 else "")
    cols = sorted({(r["model"], r["col"]) for r in recs}, key=lambda c: (c[0], "g" in c[1], c[1][:4] != "ddim"))
    rows = list(dict.fromkeys(r["row"] for r in recs if r["seed"] == 0))
    get = {(r["model"], r["col"], r["row"]): r for r in recs if r["seed"] == 0}
    head = "| row | BOPs vs FP32 (DDIM-50) | BOPs vs uniform | " + " | ".join(f"{m} {s}" for m, s in cols) + " |"
    print(head + "\n|---|---:|---:|" + "---:|" * len(cols))
    for row in rows:
        cells = []
        for m, s in cols:
            r = get.get((m, s, row))
            cells.append("-" if r is None else f"{r['fd']:.1f}" if row == "fp" else
                         f"{r['fd_rel']:+.1f}% ({r['psnr']:.1f} dB)")
        any_r = next((get[(m, s, row)] for m, s in cols if (m, s, row) in get and s.startswith("ddim:50")), None)
        bops = "- | -" if any_r is None else f"{any_r['bops_vs_fp']:.4f} | {any_r['bops_vs_uniform']:.3f}"
        print(f"| {row} | {bops} | " + " | ".join(cells) + " |")
    print("\nFD of FP with other noise seeds (seed-to-seed spread):\n")
    for m, s in cols:
        fds = [r["fd"] for r in recs if r["model"] == m and r["col"] == s and r["row"] == "fp"]
        if len(fds) > 1:
            mean, sd = statistics.mean(fds), statistics.stdev(fds)
            print(f"- {m} {s}: FD {', '.join(f'{v:.1f}' for v in fds)}; mean {mean:.1f}, "
                  f"sd {sd:.1f} ({100 * sd / mean:.1f}% of the mean), range {min(fds):.1f}-{max(fds):.1f}")


if __name__ == "__main__":
    cli()
