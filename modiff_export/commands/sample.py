"""`train-demo`, `sample` and `evaluate`: the embedded digits model, sampling and quality metrics."""
from __future__ import annotations

import math
import time
from pathlib import Path

import click

from ..config import QuantConfig
from .options import QUANT, SAMPLING


@click.command("train-demo")
@click.option("--steps", type=click.IntRange(1), default=2000, show_default=True,
              help="UNet training steps (batch 64, ~28 min on a shared 2-core CPU).")
@click.option("--epochs", type=click.IntRange(1), default=30, show_default=True, help="Classifier training epochs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Training seed.")
@click.option("--arch", type=click.Choice(["digits", "digits_b"]), default="digits", show_default=True,
              help="UNet + noise schedule: digits (shipped demo model) or digits_b (second validation model: "
                   "no attention, 2 resnets per level, linear betas; shipped with --seed 1 --steps 1500).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder [default: trained/<arch>]. Never the shipped assets unless named and --overwrite.")
@click.option("--overwrite", is_flag=True, help="Write into an existing --out.")
@click.option("--what", type=click.Choice(["all", "unet", "classifier"]), default="all", show_default=True,
              help="What to train.")
def train_demo(steps, epochs, seed, arch, out, overwrite, what):
    """Train a digits DDPM UNet and the metrics classifier on scikit-learn's digits (16x16, 80/20
    split with a fixed seed). With the defaults it reproduces the shipped `digits` weights (CPU, 1
    thread) into trained/digits; compare with modiff_export/assets/digits."""
    from ..fsutil import check_writable
    from ..models.train import train_classifier, train_unet

    out = check_writable(out if out is not None else Path("trained") / arch, overwrite)  # never replaced unasked
    if what in ("all", "classifier"):
        acc = train_classifier(epochs=epochs, seed=seed, out=out)
        click.echo(f"classifier: held-out accuracy {acc:.4f} -> {out}")
    if what in ("all", "unet"):
        wall = train_unet(steps=steps, seed=seed, out=out, arch=arch)
        click.echo(f"unet ({arch}): {steps} steps in {wall / 60:.1f} min -> {out}")


@click.command("sample")
@SAMPLING.options()
@QUANT.options()
@click.option("--calibration", type=click.Path(dir_okay=False), default=None,
              help="--backend torch: a file from `cli.py calibrate` whose weights (GPTQ, clips) the PyTorch reference "
                   "uses, as `export --calibration` does (its static scales with --scale-mode static).")
@click.option("--out", type=click.Path(dir_okay=False), default="samples.png", show_default=True,
              help="PNG grid to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
def sample(model, backend, graphs, engines, scheduler, steps, batch_size, seed, guidance_scale, prompts, calibration,
           out, overwrite, **quant):
    """Generate one batch and save it as a PNG grid. --backend torch quantizes --model with the
    quantization options; ort/trt run exported graphs/engines, whose config is in their manifest."""
    from ..fsutil import check_writable
    from ..sampling import sample_model, save_grid

    check_writable(out, overwrite, kind="file")
    m, cfg, runner = resolve_runner(model, backend, graphs, engines, quant, calibration)
    if prompts:
        from ..serving.prompts import attach_prompts

        attach_prompts(m, model, prompts)
    images = sample_model(m, cfg, scheduler, steps, batch_size, batch_size, seed, guidance_scale, backend,
                          runner=runner)
    path = save_grid(images, out, overwrite=overwrite)
    click.echo(f"{m.name} {cfg.tag} [{backend}] {scheduler}x{steps}: wrote {path}")


def resolve_runner(model, backend, graphs, engines, quant: dict, calibration: str | None = None):
    """(model, config, runner or None) for a backend: torch quantizes --model with the quantization
    options `quant` (and their --recipe); graph/engine runners read everything from their folder's
    manifest (whose graph files are digest-checked), and --model must be the same model."""
    from ..backends import FOLDER_OPTION, RunnerError, make_runner
    from ..models import LoadedModel, load_model

    if backend == "torch":
        if graphs or engines:
            raise RunnerError("--graphs/--engines are for the graph/engine backends; --backend torch samples --model")
        loaded = load_model(model or "digits")
        config = QUANT.config(quant, model=loaded)
        if calibration is None:
            if config.scale_mode == "static":
                raise RunnerError("--scale-mode static needs --calibration (the file with the static scales)")
            return loaded, config, None
        import copy

        from ..quant.calibration_file import load_calibration
        from ..quant.quantization import quantize

        cal = load_calibration(calibration, loaded.content_hash, config)
        unet = quantize(copy.deepcopy(loaded.unet), config)
        cal.apply(unet)
        return loaded, config, make_runner("torch", unet)
    if calibration is not None:
        raise RunnerError(f"--calibration is for --backend torch; the {backend} backend runs a folder that already "
                          f"carries its calibration")
    folder = engines if backend == "trt" else graphs
    if folder is None:
        raise RunnerError(f"--backend {backend} needs {FOLDER_OPTION[backend]}")
    runner = make_runner(backend, folder=folder)
    meta = LoadedModel.from_info(runner.manifest.model)
    if model is not None:
        want = load_model(model).content_hash
        if want != meta.content_hash:
            raise RunnerError(f"{folder} was exported from model {meta.name} ({meta.content_hash[:19]}...), "
                              f"not {model} ({want[:19]}...)")
    QUANT.config(quant)  # validated even though the folder's manifest decides
    return meta, runner.manifest.quant_config, runner


@click.command("evaluate")
@SAMPLING.options()
@QUANT.options()
@click.option("--calibration", type=click.Path(dir_okay=False), default=None,
              help="--backend torch: a file from `cli.py calibrate` whose weights (GPTQ, clips) the PyTorch reference "
                   "uses, as `export --calibration` does (its static scales with --scale-mode static).")
@click.option("--num-samples", type=click.IntRange(2, 100_000), default=128, show_default=True,
              help="Samples per config.")
def evaluate(model, backend, graphs, engines, scheduler, steps, batch_size, seed, guidance_scale, prompts,
             calibration, num_samples, **quant):
    """FD-digits, classifier confidence and PSNR-to-FP (same noise) for one config vs full precision.
    The FP reference always runs on PyTorch; the quantized config runs on --backend (with ort/trt its
    config comes from the folder). FD-digits and confidence exist only for the `digits` model."""
    from ..evaluation.metrics import DigitsEvaluator, psnr
    from ..models import load_model
    from ..sampling import SamplingError, sample_model

    meta, qcfg, runner = resolve_runner(model, backend, graphs, engines, quant, calibration)
    m = meta if meta.unet is not None else load_model(model or "digits")
    if m.content_hash != meta.content_hash:
        raise SamplingError(f"the folder was exported from another model than {model or 'digits'}; pass its --model")
    if prompts:
        from ..serving.prompts import attach_prompts

        attach_prompts(m, model, prompts)
    ev = DigitsEvaluator() if m.name in ("digits", "digits_b") else None
    rows, ref = [], None
    runs = [(QuantConfig(mode="fp"), "torch", None)]
    if not (qcfg.mode == "fp" and backend == "torch"):
        runs.append((qcfg, backend, runner))
    for cfg, be, r in runs:
        t0 = time.time()
        x = sample_model(m, cfg, scheduler, steps, num_samples, batch_size, seed, guidance_scale, be, runner=r)
        ref = x if ref is None else ref
        fd = f"{ev.frechet_distance(x):.2f}" if ev else "n/a"
        conf = f"{ev.confidence(x):.3f}" if ev else "n/a"
        p = psnr(x, ref)
        rows.append((f"{cfg.tag} [{be}]", fd, conf, "inf" if math.isinf(p) else f"{p:.2f}", f"{time.time() - t0:.1f}"))
    click.echo(f"{m.name} {scheduler}x{steps}, {num_samples} samples, seed {seed}, granularity {qcfg.granularity}")
    head = ("config", "FD-digits", "confidence", "PSNR-to-FP dB", "seconds")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        click.echo("  ".join(str(v).rjust(w) for v, w in zip(r, widths)))


COMMANDS = [train_demo, sample, evaluate]
