"""`train-demo`, `sample` and `evaluate`: the embedded digits model, sampling and quality metrics."""
from __future__ import annotations

import math
import time
from pathlib import Path

import click

from ..config import GRANULARITIES, MODES, QuantConfig
from ..sampling import SCHEDULERS

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "digits"


def quant_options(f):
    """--mode/--weight-bits/--act-bits/--granularity, shared by `sample` and `evaluate`."""
    opts = [
        click.option("--mode", type=click.Choice(MODES), default="modiff", show_default=True,
                     help="fp: full precision; ptq: plain fake quantization; modiff: quantize the change of each input."),
        click.option("--weight-bits", type=click.IntRange(2, 8), default=8, show_default=True, help="Weight bits (per output channel)."),
        click.option("--act-bits", type=click.IntRange(2, 8), default=8, show_default=True, help="Activation (delta) bits."),
        click.option("--granularity", type=click.Choice(GRANULARITIES), default="sample", show_default=True,
                     help="Activation scale per sample (batch-invariant) or per tensor (paper)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def sampling_options(f):
    opts = [
        click.option("--model", default=None, help="'digits' (embedded, the default) or a local diffusers UNet/pipeline folder. "
                     "With --backend ort/trt the model comes from the folder's manifest; --model then only checks it is the same model."),
        click.option("--backend", type=click.Choice(["torch", "ort", "trt"]), default="torch", show_default=True,
                     help="torch: PyTorch reference; ort: ONNX Runtime on --graphs; trt: TensorRT on --engines."),
        click.option("--graphs", type=click.Path(file_okay=False), default=None, help="Graph folder from `cli.py export` (--backend ort)."),
        click.option("--engines", type=click.Path(file_okay=False), default=None, help="Engine folder from `cli.py build-engine` (--backend trt)."),
        click.option("--scheduler", type=click.Choice(sorted(SCHEDULERS)), default="ddim", show_default=True, help="diffusers scheduler."),
        click.option("--steps", type=click.IntRange(1, 1000), default=25, show_default=True, help="Sampling steps."),
        click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True, help="Images per batch."),
        click.option("--seed", type=int, default=0, show_default=True, help="Noise seed (batch i uses seed+i)."),
        click.option("--guidance-scale", type=float, default=1.0, show_default=True,
                     help="Classifier-free guidance (conditional UNets; batch doubled)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@click.command("train-demo")
@click.option("--steps", type=click.IntRange(1), default=2000, show_default=True, help="UNet training steps (batch 64, ~28 min on a shared 2-core CPU).")
@click.option("--epochs", type=click.IntRange(1), default=30, show_default=True, help="Classifier training epochs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Training seed.")
@click.option("--arch", type=click.Choice(["digits", "digits_b"]), default="digits", show_default=True,
              help="UNet + noise schedule: digits (shipped demo model) or digits_b (second validation model: "
                   "no attention, 2 resnets per level, linear betas; shipped with --seed 1 --steps 1500).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder [default: trained/<arch>]. Never the shipped assets unless named and --overwrite.")
@click.option("--overwrite", is_flag=True, help="Allow writing into a folder that already holds weights.")
@click.option("--what", type=click.Choice(["all", "unet", "classifier"]), default="all", show_default=True, help="What to train.")
def train_demo(steps, epochs, seed, arch, out, overwrite, what):
    """Train a digits DDPM UNet and the metrics classifier on scikit-learn's digits (16x16, 80/20
    split with a fixed seed). With the defaults it reproduces the shipped `digits` weights (CPU, 1
    thread) into trained/digits; compare with modiff_export/assets/digits."""
    from ..errors import ModiffExportError
    from ..metrics import CLASSIFIER_FILE
    from ..train import WEIGHTS_FILE, train_classifier, train_unet

    out = Path(out) if out is not None else Path("trained") / arch
    existing = [f for f in (WEIGHTS_FILE, CLASSIFIER_FILE) if (out / f).exists()]
    if existing and not overwrite:
        raise ModiffExportError(f"{out}: already holds {', '.join(existing)}; pass --overwrite or another --out")
    if what in ("all", "classifier"):
        acc = train_classifier(epochs=epochs, seed=seed, out=out)
        click.echo(f"classifier: held-out accuracy {acc:.4f} -> {out}")
    if what in ("all", "unet"):
        wall = train_unet(steps=steps, seed=seed, out=out, arch=arch)
        click.echo(f"unet ({arch}): {steps} steps in {wall / 60:.1f} min -> {out}")


@click.command("sample")
@sampling_options
@quant_options
@click.option("--out", type=click.Path(dir_okay=False), default="samples.png", show_default=True, help="PNG grid to write.")
def sample(model, backend, graphs, engines, scheduler, steps, batch_size, seed, guidance_scale, mode, weight_bits,
           act_bits, granularity, out):
    """Generate one batch and save it as a PNG grid. --backend torch quantizes --model with the
    quantization options; ort/trt run exported graphs/engines, whose config is in their manifest."""
    from ..sampling import sample_model, save_grid

    m, cfg, runner = resolve_runner(model, backend, graphs, engines, QuantConfig(
        mode=mode, weight_bits=weight_bits, act_bits=act_bits, granularity=granularity))
    images = sample_model(m, cfg, scheduler, steps, batch_size, batch_size, seed, guidance_scale, backend, runner=runner)
    click.echo(f"{m.name} {cfg.tag} [{backend}] {scheduler}x{steps}: wrote {save_grid(images, out)}")


def resolve_runner(model, backend, graphs, engines, cfg):
    """(model meta, config, runner or None) for a backend; ort/trt read everything from their folder."""
    from ..backends import RunnerError, make_runner
    from ..models import load_model, model_from_manifest

    if backend == "torch":
        if graphs or engines:
            raise RunnerError("--graphs/--engines are for --backend ort/trt; --backend torch samples --model directly")
        return load_model(model or "digits"), cfg, None
    folder = graphs if backend == "ort" else engines
    if folder is None:
        raise RunnerError(f"--backend {backend} needs {'--graphs graphs/<name>' if backend == 'ort' else '--engines engines/<name>'}")
    runner = make_runner(backend, folder=folder)
    meta = model_from_manifest(runner.manifest)
    if model is not None:
        want = load_model(model).content_hash
        if want != meta.content_hash:
            raise RunnerError(f"{folder} was exported from model {meta.content_hash[:19]}, not {model} ({want[:19]})")
    return meta, QuantConfig.from_dict(runner.manifest["quant_config"]), runner


@click.command("evaluate")
@sampling_options
@quant_options
@click.option("--num-samples", type=click.IntRange(2), default=128, show_default=True, help="Samples per config.")
def evaluate(model, backend, graphs, engines, scheduler, steps, batch_size, seed, guidance_scale, mode, weight_bits,
             act_bits, granularity, num_samples):
    """FD-digits, classifier confidence and PSNR-to-FP (same noise) for one config vs full precision.
    The FP reference always runs on PyTorch; the quantized config runs on --backend (with ort/trt its
    config comes from the folder). FD-digits and confidence exist only for the `digits` model."""
    from ..metrics import DigitsEvaluator, psnr
    from ..models import load_model
    from ..sampling import sample_model

    meta, qcfg, runner = resolve_runner(model, backend, graphs, engines, QuantConfig(
        mode=mode, weight_bits=weight_bits, act_bits=act_bits, granularity=granularity))
    m = meta if meta.unet is not None else load_model(model or "digits")
    if m.content_hash != meta.content_hash:
        raise click.ClickException(f"the folder was exported from another model than {model or 'digits'}; pass its --model")
    ev = DigitsEvaluator() if m.name in ("digits", "digits_b") else None
    rows, ref = [], None
    runs = [(QuantConfig(mode="fp"), "torch", None)] + ([] if qcfg.mode == "fp" and backend == "torch" else [(qcfg, backend, runner)])
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
