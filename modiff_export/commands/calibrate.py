"""`calibrate`: static delta scales per layer and timestep bucket, and weight clipping, from
calibration trajectories (calibration/<name>.json)."""
from __future__ import annotations

import time

import click

from ..sampling import SCHEDULER_CHOICES
from .options import LABELS_HELP, QUANT, parse_labels


@click.command("calibrate")
@click.option("--model", default="digits", show_default=True,
              help="'digits' (embedded) or a local diffusers UNet/pipeline folder.")
@click.option("--scheduler", type=click.Choice(SCHEDULER_CHOICES), default="auto", show_default=True,
              help="Sampler of the calibration trajectories.")
@click.option("--steps", type=click.IntRange(1, 1000), default=25, show_default=True,
              help="Sampling steps per trajectory.")
@click.option("--samples", type=click.IntRange(1), default=64, show_default=True,
              help="Calibration trajectories (images).")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True, help="Trajectories per batch.")
@click.option("--seed", type=int, default=1000, show_default=True,
              help="Noise seed (batch i uses seed+i); use a different seed than the evaluation.")
@click.option("--buckets", type=click.IntRange(1, 1000), default=1, show_default=True,
              help="Timestep buckets: one scale per layer and bucket of uniform width over the training timesteps.")
@click.option("--method", type=click.Choice(["absmax", "percentile", "mse"]), default="mse", show_default=True,
              help="absmax of the deltas; a percentile of |delta|; or the clip ratio of the absmax minimizing "
                   "quantization MSE.")
@click.option("--percentile", type=click.FloatRange(0, 100, min_open=True), default=99.9, show_default=True,
              help="Percentile of |delta| for --method percentile.")
@QUANT.options(exclude=("scale_mode",), mode=dict(type=click.Choice(["modiff", "ptq"]),
                                                 help="modiff: calibrate the deltas x - a_hat; ptq: the inputs x."),
               granularity=dict(help="Granularity of the dynamic scales during the calibration trajectories "
                                     "(must match the export)."))
@click.option("--guidance-scale", type=float, default=1.0, show_default=True,
              help="Classifier-free guidance (conditional models).")
@click.option("--subsample", type=click.IntRange(100), default=20_000, show_default=True,
              help="Values kept per layer and bucket for the percentile and MSE searches.")
@click.option("--labels", "--class-label", "labels", default=None, metavar="L[,L...]", help=LABELS_HELP)
@click.option("--prompts", type=click.Path(dir_okay=False), default=None,
              help="Text file, one prompt per line, encoded by --model's (a pipeline folder) text encoder: calibrate "
                   "on the conditioning the model will serve instead of random encoder states.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Output file [default: calibration/<model>-<config>-<method>.json].")
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def calibrate(model, scheduler, steps, samples, batch_size, seed, buckets, method, percentile, guidance_scale,
              subsample, prompts, labels, out, overwrite, quiet, **quant):
    """Run calibration trajectories (dynamic scales) and write static delta scales per layer and
    timestep bucket, per-channel weight clipping ratios (MSE search) and provenance (model hash,
    config, sampler, seed) to a JSON file for `export --calibration`. With the recommended recipe,
    every quantized weight is first rounded with GPTQ on full-precision trajectories of the same
    sampler and seed; their codes go into <out>.weights.safetensors beside the JSON."""
    from ..calibration.file import weights_path, write_calibration
    from ..calibration.recipe import calibrate_recipe, gptq_layers
    from ..fsutil import check_writable
    from ..models import load_model
    from ..models.prompts import encode_prompts
    from ..sampling import Trajectories

    loaded = load_model(model)
    recipe = QUANT.recipe(quant)
    config = QUANT.config(quant, model=loaded, scale_mode="static")
    out = check_writable(out or f"calibration/{loaded.name}-{config.tag}-{method}.json", overwrite, kind="file")
    if gptq_layers(config, loaded.unet, recipe):
        check_writable(weights_path(out), overwrite, kind="file")
    traj = Trajectories(scheduler, steps, samples, batch_size, seed, guidance_scale,
                        encode_prompts(loaded, model, prompts) if prompts else None, parse_labels(labels))
    t0 = time.perf_counter()
    data, rounded = calibrate_recipe(loaded, config, recipe, traj, progress=not quiet, buckets=buckets, method=method,
                                     percentile=percentile, subsample=subsample, in_place=True)
    write_calibration(out, data, overwrite, weights=rounded)
    extra = f", GPTQ weights of {len(rounded)} layers in {weights_path(out).name}" if rounded else ""
    click.echo(f"wrote {out}: {len(data['scales'])} layers x {buckets} bucket(s), method {method}, "
               f"{samples} trajectories of {scheduler}x{steps}{extra}, {time.perf_counter() - t0:.1f} s")


COMMANDS = [calibrate]
