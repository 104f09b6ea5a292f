"""`train-demo`, `sample` and `evaluate`: the embedded digits model, sampling and quality metrics."""
from __future__ import annotations

import math
import time
from pathlib import Path

import click

from ..config import QuantConfig
from .options import QUANT, SAMPLING


@click.command("train-demo")
@click.option("--steps", type=click.IntRange(1), default=None,
              help="Denoiser training steps, batch 64 [default: digits 2000 (~28 min on a shared 2-core CPU), "
                   "digits_b 1500, digits_dit 3000 (~35 min), digits_dit_b 3000].")
@click.option("--epochs", type=click.IntRange(1), default=30, show_default=True, help="Classifier training epochs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Training seed.")
@click.option("--arch", type=click.Choice(["digits", "digits_b", "digits_dit", "digits_dit_b", "digits_flux",
                                           "digits_sd3"]),
              default="digits",
              show_default=True,
              help="Denoiser + noise schedule: digits (shipped demo UNet), digits_b (second validation UNet: "
                   "no attention, 2 resnets per level, linear betas; shipped with --seed 1) or digits_dit (third "
                   "validation model: a class-conditional DiT, labels 0-9, CFG label dropout; shipped with --seed 2) "
                   "or digits_dit_b (second DiT: 6 blocks of hidden 96, linear betas; shipped with --seed 3) or "
                   "digits_flux (FluxTransformer2DModel, 2 double + 4 single blocks, flow matching, labels through a "
                   "learned label encoder; 2400 steps, ~21 min; shipped with --seed 4) or digits_sd3 "
                   "(SD3Transformer2DModel, 4 joint-attention blocks, flow matching, a label encoder; shipped with "
                   "--seed 5).")
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
        if arch in ("digits_flux", "digits_sd3"):
            from ..models.train_mmdit import train_mmdit

            wall = train_mmdit(arch, steps=steps, seed=seed, out=out)
        else:
            wall = train_unet(steps=steps, seed=seed, out=out, arch=arch)
        click.echo(f"denoiser ({arch}): {steps or 'default'} steps in {wall / 60:.1f} min -> {out}")


@click.command("sample")
@SAMPLING.options()
@QUANT.options()
@click.option("--calibration", type=click.Path(dir_okay=False), default=None,
              help="--backend torch: a file from `cli.py calibrate` whose weights (GPTQ, clips) the PyTorch reference "
                   "uses, as `export --calibration` does (its static scales with --scale-mode static).")
@click.option("--out", type=click.Path(dir_okay=False), default="samples.png", show_default=True,
              help="PNG grid to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
def sample(calibration, out, overwrite, **options):
    """Generate one batch and save it as a PNG grid. --backend torch quantizes --model with the
    quantization options; ort/trt run exported graphs/engines, whose config is in their manifest."""
    from ..fsutil import check_writable
    from ..sampling import resolve_scheduler, sample_model, save_grid

    check_writable(out, overwrite, kind="file")
    resolved, traj = resolve(options, calibration)
    images = sample_model(resolved.model, resolved.config, traj, runner=resolved.runner)
    path = save_grid(images, out, overwrite=overwrite)
    m, cfg = resolved.model, resolved.config
    sched = resolve_scheduler(traj.scheduler, m.scheduler_config)
    click.echo(f"{m.name} {cfg.tag} [{resolved.runner.backend}] {sched}x{traj.steps}: wrote {path}")


def resolve(options: dict, calibration: str | None, samples: int | None = None):
    """(Resolved, Trajectories) for sample/evaluate: the runner the SAMPLING and QUANT options name
    (modiff_export/resolve.py) and the trajectories to run (`samples` images, default one batch)."""
    from ..backends import RunnerError
    from ..resolve import RunnerOptions, resolve_runner

    model, backend, graphs, engines = (options.pop(k) for k in ("model", "backend", "graphs", "engines"))
    if backend == "torch" and (graphs or engines):
        raise RunnerError("--graphs/--engines are for the graph/engine backends; --backend torch samples --model")
    opts = RunnerOptions(backend, model, engines if backend == "trt" else graphs, calibration)
    config = loaded = None
    if backend == "torch":
        from ..models import load_model

        loaded = load_model(model or "digits")
        config = QUANT.config(options, model=loaded)
    else:
        QUANT.config(options)  # validated even though the folder's manifest decides
    resolved = resolve_runner(opts, config, loaded)
    return resolved, SAMPLING.trajectories(options, resolved.model, model, samples)


@click.command("evaluate")
@SAMPLING.options()
@QUANT.options()
@click.option("--calibration", type=click.Path(dir_okay=False), default=None,
              help="--backend torch: a file from `cli.py calibrate` whose weights (GPTQ, clips) the PyTorch reference "
                   "uses, as `export --calibration` does (its static scales with --scale-mode static).")
@click.option("--num-samples", type=click.IntRange(2, 100_000), default=128, show_default=True,
              help="Samples per config.")
def evaluate(calibration, num_samples, **options):
    """FD-digits, classifier confidence and PSNR-to-FP (same noise) for one config vs full precision.
    The FP reference always runs on PyTorch; the quantized config runs on --backend (with ort/trt its
    config comes from the folder). FD-digits and confidence exist for the embedded (digits-trained) models:
    digits, digits_b, digits_dit, digits_dit_b."""
    from ..evaluation.metrics import DigitsEvaluator, psnr
    from ..models import load_model
    from ..models.loading import EMBEDDED
    from ..sampling import SamplingError, resolve_scheduler, sample_model

    model, backend = options["model"], options["backend"]
    resolved, traj = resolve(options, calibration, num_samples)
    meta, qcfg = resolved.model, resolved.config
    m = meta if meta.unet is not None else load_model(model or "digits")
    if m.content_hash != meta.content_hash:
        raise SamplingError(f"the folder was exported from another model than {model or 'digits'}; pass its --model")
    ev = DigitsEvaluator() if m.name in EMBEDDED else None  # every embedded model draws 16x16 digits
    rows, ref = [], None
    runs = [(QuantConfig(mode="fp"), "torch", None)]
    if not (qcfg.mode == "fp" and backend == "torch"):
        runs.append((qcfg, backend, resolved.runner))
    for cfg, be, r in runs:
        t0 = time.time()
        x = sample_model(m, cfg, traj, be, runner=r)
        ref = x if ref is None else ref
        fd = f"{ev.frechet_distance(x):.2f}" if ev else "n/a"
        conf = f"{ev.confidence(x):.3f}" if ev else "n/a"
        p = psnr(x, ref)
        rows.append((f"{cfg.tag} [{be}]", fd, conf, "inf" if math.isinf(p) else f"{p:.2f}", f"{time.time() - t0:.1f}"))
    sched = resolve_scheduler(traj.scheduler, m.scheduler_config)  # "auto": the name of the sampler it ran
    click.echo(f"{m.name} {sched}x{traj.steps}, {num_samples} samples, seed {traj.seed}, "
               f"granularity {qcfg.granularity}")
    head = ("config", "FD-digits", "confidence", "PSNR-to-FP dB", "seconds")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        click.echo("  ".join(str(v).rjust(w) for v, w in zip(r, widths)))


COMMANDS = [train_demo, sample, evaluate]
