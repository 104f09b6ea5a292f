"""Issue 11, point 3-4: the user's path, measured. For each model and W/A, the real CLI writes the
graphs (`cli.py calibrate` / `cli.py export --target ort`, defaults unless the variant says
otherwise) and ONNX Runtime samples them from the same noise as full precision (PyTorch FP).

    python benchmarks/quality_recipe.py run --models digits,digits_b --bits w8a4,w8a3,w4a4
    python benchmarks/quality_recipe.py table
    python benchmarks/quality_recipe.py layers --model digits_flux --bits w8a4,w4a4 --guidance 1,2   # issue 32

Variants (the CLI commands each runs; M = model, W/A = bits):
    paper       export --model M --weight-bits W --act-bits A --recipe paper          (MoDiff as published)
    default     export --model M --weight-bits W --act-bits A                         (calibration-free default)
    calibrated  calibrate --model M --weight-bits W --act-bits A --out F
                export --model M --weight-bits W --act-bits A --calibration F         (the recommended path)
    static      the calibrated file, exported with --scale-mode static               (static delta scales)

One JSON line per (model, sampler, bits, variant) in --results (done cells are skipped): FD-digits,
FD relative to FP from the same noise, PSNR to FP, BOPs per trajectory vs FP32 and vs uniform W/A
(from the exported manifest's layer bits), and the seconds of each CLI step. ONNX Runtime, 1 thread.

`layers` (issue 32) is the study behind the recipe's W8A8 layer list for MMDiT / FLUX: PyTorch reference,
dynamic scales, no calibration (as the DiT study in docs/transformers.md), one row per set of layers kept at
W8A8 (LAYER_GROUPS, unions with "+"), FD relative to FP from the same noise, PSNR to FP, label accuracy.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import click
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from modiff_export import QuantConfig
from modiff_export.backends import make_runner
from modiff_export.evaluation.cost import bops_per_trajectory, model_macs
from modiff_export.evaluation.metrics import DigitsEvaluator, psnr
from modiff_export.manifest import Manifest
from modiff_export.models import load_model
from modiff_export.sampling import Trajectories, sample_model

RESULTS = ROOT / "docs" / "quality_recipe.jsonl"
VARIANTS = ("paper", "default", "calibrated", "static")


def cli(*args: str) -> float:
    """Run `python cli.py ARGS` (quiet), fail loudly; returns its seconds."""
    t0 = time.time()
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args, "--quiet"], capture_output=True, text=True,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    if r.returncode:
        raise SystemExit(f"cli.py {' '.join(args)} failed:\n{r.stderr}")
    return round(time.time() - t0, 1)


def build(work: Path, model: str, w: int, a: int, variant: str, backend: str = "ort") -> tuple[Path, dict]:
    """The graph folder of one variant (made with the CLI unless already there) and its CLI seconds:
    `export --target ort` for ONNX Runtime, the default export for OpenVINO (its runner rewrites the step)."""
    bits = ["--model", model, "--weight-bits", str(w), "--act-bits", str(a)]
    suffix = "" if backend == "ort" else "-ov"
    graphs, cal = work / f"{model}-w{w}a{a}-{variant}{suffix}", work / f"{model}-w{w}a{a}.json"
    secs = {}
    if variant in ("calibrated", "static") and not cal.exists():
        secs["calibrate_s"] = cli("calibrate", *bits, "--out", str(cal))
    if not graphs.exists():
        extra = {"paper": ["--recipe", "paper"], "default": [], "calibrated": ["--calibration", str(cal)],
                 "static": ["--calibration", str(cal), "--scale-mode", "static"]}[variant]
        target = ["--target", "ort"] if backend == "ort" else []
        secs["export_s"] = cli("export", *bits, *extra, *target, "--out", str(graphs))
    return graphs, secs


def fp_reference(model, sched: str, steps: int, n: int, seed: int, cache_dir: Path,
                 guidance: float = 1.0, batch_size: int | None = None) -> torch.Tensor:
    """FP samples from the same noise, shared with quality_ablation.py through its cache (one batch of n; another
    batch size draws other noise, batch i from seed + i, so its samples are cached apart, in cache_dir/bs<B>)."""
    from quality_ablation import fp_samples  # the sibling script (benchmarks/ is on sys.path when run)

    bs = batch_size or n
    return fp_samples(model, sched, steps, n, bs, seed, cache_dir if bs == n else cache_dir / f"bs{bs}", guidance)


@click.group()
def main():
    """Quality of the CLI's recipes through export + ONNX Runtime."""


@main.command()
@click.option("--models", default="digits,digits_b", show_default=True)
@click.option("--bits", default="w8a4,w8a3,w4a4", show_default=True, help="Comma list of wWaA.")
@click.option("--variants", default="paper,default,calibrated", show_default=True,
              help=f"Comma list of {', '.join(VARIANTS)}.")
@click.option("--samplers", default="ddim:50,dpmpp:20", show_default=True)
@click.option("--num-samples", "n", default=256, show_default=True)
@click.option("--seed", default=0, show_default=True, help="Noise seed of every row and of FP.")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("/tmp/quality_recipe"),
              show_default=True, help="Calibration files and graph folders go here (reused when present).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("/tmp/qa_cache"),
              show_default=True, help="FP samples (shared with quality_ablation.py).")
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=RESULTS, show_default=True)
@click.option("--backend", default="ort", show_default=True, type=click.Choice(["ort", "openvino"]),
              help="Runtime that samples the graphs (its runner's defaults).")
@click.option("--guidance", default=1.0, show_default=True, type=float,
              help="Classifier-free guidance scale of FP and every row (class-conditional models).")
def run(models, bits, variants, samplers, n, seed, work, cache_dir, results, backend, guidance):
    """Build each variant with the CLI, sample it with `--backend` from the same noise as FP."""
    torch.set_num_threads(1)
    work.mkdir(parents=True, exist_ok=True)
    ev = DigitsEvaluator()
    done = set()
    if results.is_file():
        for line in results.read_text().splitlines():
            r = json.loads(line)
            done.add((r["model"], r["sampler"], r["bits"], r["variant"], r["n"], r["seed"], r.get("backend", "ort"),
                      r.get("guidance", 1.0)))
    for name in models.split(","):
        model = load_model(name)
        macs = model_macs(model)
        for wa in bits.split(","):
            w, a = (int(v) for v in wa[1:].split("a"))
            for variant in variants.split(","):
                graphs, secs = build(work, name, w, a, variant, backend)
                cfg = Manifest.load(graphs).quant_config
                for sampler in samplers.split(","):
                    if (name, sampler, wa, variant, n, seed, backend, guidance) in done:
                        continue
                    sched, steps = sampler.split(":")
                    steps = int(steps)
                    ref = fp_reference(model, sched, steps, n, seed, cache_dir, guidance)
                    t0 = time.time()
                    traj = Trajectories(sched, steps, n, n, seed, guidance_scale=guidance)
                    x = sample_model(model, cfg, traj, backend=backend,
                                     progress=False, runner=make_runner(backend, folder=graphs, threads=1))
                    fd, fd_fp, p = ev.frechet_distance(x), ev.frechet_distance(ref), psnr(x, ref)
                    # kept for `quality_ablation.py bootstrap` (paired bootstrap sd of FD relative to FP)
                    tag = ("" if backend == "ort" else f"-{backend}") + ("" if guidance == 1.0 else f"-g{guidance:g}")
                    stem = f"{name}-{sampler.replace(':', '')}-n{n}-s{seed}-cli-{wa}-{variant}{tag}"
                    torch.save(x, cache_dir / f"{stem}.pt")
                    uniform = QuantConfig(mode=cfg.mode, weight_bits=w, act_bits=a)
                    b = bops_per_trajectory(macs, cfg, steps)
                    rec = {"model": name, "backend": backend, "model_hash": model.content_hash[:19], "sampler": sampler,
                           "bits": wa, **({"guidance": guidance} if guidance != 1.0 else {}),
                           "variant": variant, "n": n, "seed": seed, "fd": round(fd, 3), "fd_fp": round(fd_fp, 3),
                           "fd_rel": round(100 * (fd - fd_fp) / fd_fp, 2),
                           "psnr": None if math.isinf(p) else round(p, 2), "confidence": round(ev.confidence(x), 4),
                           "bops_vs_fp": round(b / bops_per_trajectory(macs, QuantConfig(mode="fp"), steps), 5),
                           "bops_vs_uniform": round(b / bops_per_trajectory(macs, uniform, steps), 4),
                           "int8_layers": list(cfg.int8_layers), "scale_mode": cfg.scale_mode,
                           "gptq_layers": sum(1 for lay in Manifest.load(graphs).layers if lay.weight_rounding),
                           "sample_s": round(time.time() - t0, 1), **secs}
                    secs = {}
                    with results.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                    print(json.dumps(rec), flush=True)


@main.command()
@click.option("--models", default="digits,digits_b", show_default=True)
@click.option("--bits", default="w8a8,w8a4", show_default=True)
@click.option("--variants", default="default,calibrated", show_default=True)
@click.option("--samplers", default="ddim:25,dpmpp:20", show_default=True)
@click.option("--num-samples", "n", default=64, show_default=True)
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("/tmp/quality_recipe"),
              show_default=True)
@click.option("--backend", default="ort", show_default=True, type=click.Choice(["ort", "openvino"]))
@click.option("--prime-precision", default=None, type=click.Choice(["f32", "bf16", "default"]),
              help="openvino: the prime graph's precision (default: the runner's default).")
@click.option("--guidance", default=1.0, show_default=True, type=float, help="CFG scale (class-conditional models).")
def parity(models, bits, variants, samplers, n, work, backend, prime_precision, guidance):
    """ONNX Runtime vs the PyTorch reference on the CLI's graphs: whole trajectories from the same noise,
    PSNR between the two runtimes' images (the issue asks >= 40 dB at W8A8, >= 30 dB at W8A4)."""
    import copy

    from modiff_export.calibration.file import load_calibration
    from modiff_export.quant.quantization import quantize

    torch.set_num_threads(1)
    work.mkdir(parents=True, exist_ok=True)
    extra = {"prime_precision": prime_precision} if backend == "openvino" and prime_precision else {}
    label = f" (prime {prime_precision})" if extra else ""
    for name in models.split(","):
        model = load_model(name)
        for wa in bits.split(","):
            w, a = (int(v) for v in wa[1:].split("a"))
            for variant in variants.split(","):
                graphs, _ = build(work, name, w, a, variant, backend)
                cfg = Manifest.load(graphs).quant_config
                unet = quantize(copy.deepcopy(model.unet), cfg)
                if variant in ("calibrated", "static"):
                    load_calibration(work / f"{name}-w{w}a{a}.json", model.content_hash, cfg).apply(unet)
                for sampler in samplers.split(","):
                    sched, steps = sampler.split(":")
                    traj = Trajectories(sched, int(steps), n, n, 0, guidance_scale=guidance)
                    ref = sample_model(model, cfg, traj, progress=False,
                                       runner=make_runner("torch", unet))
                    x = sample_model(model, cfg, traj, backend=backend,
                                     progress=False, runner=make_runner(backend, folder=graphs, threads=1, **extra))
                    print(f"{name} {wa} {variant} {sampler} guidance {guidance:g}: {backend}{label} vs PyTorch "
                          f"PSNR {psnr(x, ref):.1f} dB ({n} samples)", flush=True)


@main.command()
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=RESULTS, show_default=True)
@click.option("--seed", default=0, show_default=True, help="Noise seed of the rows shown.")
def table(results, seed):
    """Markdown: one line per (bits, variant), models x samplers as columns: FD rel. to FP (PSNR)."""
    recs = [r for r in map(json.loads, results.read_text().splitlines()) if r["seed"] == seed]
    cols = sorted({(r["model"], r["sampler"]) for r in recs}, key=lambda c: (c[0], c[1] != "ddim:50"))
    get = {(r["model"], r["sampler"], r["bits"], r["variant"]): r for r in recs}
    rows = list(dict.fromkeys((r["bits"], r["variant"]) for r in recs))
    print("| W/A | CLI path | BOPs vs uniform (DDIM-50) | " + " | ".join(f"{m} {s}" for m, s in cols) + " |")
    print("|---|---|---:|" + "---:|" * len(cols))
    for wa, variant in rows:
        cells = [get.get((m, s, wa, variant)) for m, s in cols]
        ddim = next((r for r, (m, s) in zip(cells, cols) if r and s == "ddim:50"), None)
        bops = "-" if ddim is None else f"{ddim['bops_vs_uniform']:.3f}"
        print(f"| {wa.upper()} | {variant} | {bops} | " + " | ".join(
            "-" if r is None else f"{r['fd_rel']:+.1f}% ({r['psnr']:.1f} dB)" for r in cells) + " |")


# issue 32: which layers the recommended recipe keeps at W8A8 on MMDiT / FLUX, measured. Groups of fnmatch patterns
# (FLUX names; SD3 shares most: pos_embed.proj, context_embedder, time_text_embed.*, norm1(_context).linear,
# norm_out.linear, proj_out); a set is a group or a "+"-union of groups; patterns a model lacks are left out.
# "previous": RECIPE_INT8_LAYERS before issue 32 (measured on DiT only); "recipe": the module's constant today.
PREVIOUS_RECIPE_INT8_LAYERS = ("conv_in", "conv_out", "time_embedding.*", "*.time_emb_proj", "pos_embed.proj",
                               "proj_out*", "*timestep_embedder.*", "*.norm1.linear", "adaln_single.linear",
                               "caption_projection.*")
LAYER_GROUPS = {
    "uniform": (),
    "previous": PREVIOUS_RECIPE_INT8_LAYERS,
    "embedders": ("x_embedder", "pos_embed.proj", "context_embedder", "time_text_embed.*"),
    "modulation": ("*.norm1.linear", "*.norm1_context.linear", "single_transformer_blocks.*.norm.linear",
                   "norm_out.linear"),
    "final": ("proj_out",),
    "context": ("transformer_blocks.*.attn.add_q_proj", "transformer_blocks.*.attn.add_k_proj",
                "transformer_blocks.*.attn.add_v_proj", "transformer_blocks.*.attn.to_add_out",
                "transformer_blocks.*.ff_context.*"),
}
LAYERS_RESULTS = ROOT / "docs" / "quality_layers.jsonl"


def layer_set(spec: str, names: list[str]) -> tuple[tuple[str, ...], list[str]]:
    """(patterns, matched layer names) of a set spec ("recipe", a LAYER_GROUPS key, or keys joined by "+"),
    only the patterns that match one of `names`."""
    import fnmatch

    from modiff_export.calibration.recipe import RECIPE_INT8_LAYERS

    pats: list[str] = []
    for part in spec.split("+"):
        group = RECIPE_INT8_LAYERS if part == "recipe" else LAYER_GROUPS.get(part)
        if group is None:
            raise click.BadParameter(f"unknown layer set {part!r}: expected recipe or one of {list(LAYER_GROUPS)}")
        pats += [p for p in group if p not in pats and any(fnmatch.fnmatchcase(n, p) for n in names)]
    return tuple(pats), [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]


@main.command()
@click.option("--model", "name", default="digits_flux", show_default=True)
@click.option("--bits", default="w8a4,w4a4", show_default=True, help="Comma list of wWaA.")
@click.option("--sets", default="uniform,previous,embedders,modulation,final,context,embedders+modulation+final",
              show_default=True, help="Comma list of layer sets kept at W8A8 (LAYER_GROUPS keys, 'recipe', "
                                      "unions with '+').")
@click.option("--samplers", default="flow_euler:28", show_default=True)
@click.option("--guidance", default="1,2", show_default=True, help="Comma list of CFG scales (FP sampled with each).")
@click.option("--mode", default="modiff", show_default=True, type=click.Choice(["modiff", "ptq"]))
@click.option("--num-samples", "n", default=256, show_default=True)
@click.option("--batch-size", "bs", default=32, show_default=True,
              help="Images per batch (batch i from noise seed + i); 32 runs ~2x faster than one batch of 256 on one "
                   "thread (cache), with other noise than quality_ablation.py's one batch.")
@click.option("--seed", default=0, show_default=True, help="Noise seed of every row and of FP.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("/tmp/qa_cache"),
              show_default=True, help="FP samples (shared with quality_ablation.py / quality_table.py).")
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=LAYERS_RESULTS, show_default=True)
def layers(name, bits, sets, samplers, guidance, mode, n, bs, seed, cache_dir, results):
    """Issue 32: FD relative to FP (PSNR) per set of layers kept at W8A8, PyTorch reference, dynamic scales,
    one batch of n from the same noise as FP. One JSON line per cell in --results (done cells are skipped)."""
    import copy

    from modiff_export.calibration.recipe import linear_layer_names
    from modiff_export.quant.quantization import quantize
    from modiff_export.sampling import class_labels, label_classes

    torch.set_num_threads(1)
    ev, model = DigitsEvaluator(), load_model(name)
    names = linear_layer_names(model.unet)
    macs = model_macs(model)
    done = set()
    if results.is_file():
        for line in results.read_text().splitlines():
            r = json.loads(line)
            done.add((r["model"], r["sampler"], r["bits"], r["mode"], r["set"], r["n"], r["bs"], r["seed"],
                      r["guidance"]))
    for g in (float(v) for v in guidance.split(",")):
        for sampler in samplers.split(","):
            sched, steps = sampler.split(":")
            steps = int(steps)
            traj = Trajectories(sched, steps, n, bs, seed, guidance_scale=g)
            ref = fp_reference(model, sched, steps, n, seed, cache_dir, g, bs)
            fd_fp = ev.frechet_distance(ref)
            labels = class_labels(model, traj, 0, n)[0] if label_classes(model) else None
            for wa in bits.split(","):
                w, a = (int(v) for v in wa[1:].split("a"))
                uniform = QuantConfig(mode=mode, weight_bits=w, act_bits=a)
                for spec in sets.split(","):
                    if (name, sampler, wa, mode, spec, n, bs, seed, g) in done:
                        continue
                    pats, matched = layer_set(spec, names)
                    cfg = uniform.replace(int8_layers=pats)
                    t0 = time.time()
                    x = sample_model(model, cfg, traj, progress=False,
                                     runner=make_runner("torch", quantize(copy.deepcopy(model.unet), cfg)))
                    fd, p = ev.frechet_distance(x), psnr(x, ref)
                    per = sorted(psnr(x[i], ref[i]) for i in range(n))  # per-sample PSNR: robust to a few outliers
                    b = bops_per_trajectory(macs, cfg, steps)
                    torch.save(x, cache_dir / f"{name}-{sampler.replace(':', '')}-n{n}-bs{bs}-s{seed}-g{g:g}-layers-"
                                              f"{mode}-{wa}-{spec}.pt")
                    rec = {"model": name, "model_hash": model.content_hash[:19], "sampler": sampler, "guidance": g,
                           "bits": wa, "mode": mode, "set": spec, "n": n, "bs": bs, "seed": seed, "fd": round(fd, 3),
                           "fd_fp": round(fd_fp, 3), "fd_rel": round(100 * (fd - fd_fp) / fd_fp, 2),
                           "psnr": None if math.isinf(p) else round(p, 2),
                           "psnr_median": round(per[n // 2], 2), "psnr_p10": round(per[n // 10], 2),
                           **({} if labels is None else {"label_acc": round(ev.label_accuracy(x, labels), 4),
                                                         "label_acc_fp": round(ev.label_accuracy(ref, labels), 4)}),
                           "bops_vs_uniform": round(b / bops_per_trajectory(macs, uniform, steps), 4),
                           "int8_layers": list(pats), "int8_layer_count": len(matched),
                           "sample_s": round(time.time() - t0, 1)}
                    with results.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                    print(json.dumps(rec), flush=True)


@main.command("layers-table")
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=LAYERS_RESULTS, show_default=True)
@click.option("--model", "name", default="digits_flux", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--num-samples", "n", default=256, show_default=True)
def layers_table(results, name, seed, n):
    """Markdown: one line per layer set, bits x sampler x guidance as columns: FD rel. to FP (PSNR)."""
    recs = [r for r in map(json.loads, results.read_text().splitlines())
            if r["model"] == name and r["seed"] == seed and r["n"] == n]
    cols = list(dict.fromkeys((r["bits"], r["mode"], r["sampler"], r["guidance"]) for r in recs))
    get = {(r["set"], r["bits"], r["mode"], r["sampler"], r["guidance"]): r for r in recs}
    sets = list(dict.fromkeys(r["set"] for r in recs))
    print("| layers at W8A8 | layers | BOPs vs uniform | " + " | ".join(
        f"{m} {wa.upper()} {s} g{g:g}" for wa, m, s, g in cols) + " |")
    print("|---|---:|---:|" + "---:|" * len(cols))
    for spec in sets:
        cells = [get.get((spec, *c)) for c in cols]
        first = next(r for r in cells if r)
        print(f"| {spec} | {first['int8_layer_count']} | {first['bops_vs_uniform']:.4f} | " + " | ".join(
            "-" if r is None else f"{r['fd_rel']:+.1f}% ({r['psnr']:.1f} dB)" for r in cells) + " |")
    fps = {(r["sampler"], r["guidance"]): (r["fd_fp"], r.get("label_acc_fp")) for r in recs}
    print("\nFP from the same noise: " + "; ".join(f"{s} g{g:g} FD {fd:.1f}" + (
        "" if acc is None else f", label acc. {acc:.3f}") for (s, g), (fd, acc) in fps.items()))


if __name__ == "__main__":
    main()
