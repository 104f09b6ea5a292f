"""Shared CLI argument groups (Polygraphy style): each group defines its click options once and turns
the parsed values into one typed object in one place.

    @QUANT.options()            every QuantConfig field as an option, plus --recipe
    def export(..., **quant):
        config = QUANT.config(quant, model=loaded)   # pops the group's values, applies the recipe to
                                                     # the model's layers, returns a validated QuantConfig

    @SAMPLING.options()         model / backend / folders / scheduler / steps / batch / seed / guidance
"""
from __future__ import annotations

import click

from ..backends import BACKENDS
from ..backends.base import MAX_BATCH
from ..calibration.recipe import DEFAULT_RECIPE, RECIPES, apply_recipe
from ..config import GRANULARITIES, MODES, REUSE_FORECASTS, SCALE_MODES, QuantConfig
from ..sampling import MAX_SEED, SCHEDULER_CHOICES

BACKEND_HELP = ("torch: PyTorch reference (quantizes --model); ort: ONNX Runtime on --graphs; openvino: OpenVINO "
                "CPU on --graphs; trt: TensorRT on --engines")


class _Group:
    """A named set of click options; `options(exclude=..., **defaults)` decorates a command."""

    def __init__(self, specs: list[tuple[str, str, dict]]):
        self.specs = specs  # (parameter name, option declaration, click.option kwargs)

    def options(self, exclude: tuple[str, ...] = (), **overrides):
        def decorate(f):
            for name, decl, kwargs in reversed(self.specs):
                if name in exclude:
                    continue
                kw = dict(kwargs)
                if name in overrides:
                    kw.update(overrides[name])
                f = click.option(*decl.split(), name, **kw)(f)
            return f

        return decorate

    def pop(self, values: dict) -> dict:
        return {name: values.pop(name) for name, _, _ in self.specs if name in values}


class _QuantGroup(_Group):
    def config(self, values: dict, model=None, **fixed) -> QuantConfig:
        """Pop this group's values from a command's kwargs and build the QuantConfig (fixed fields win);
        with `model` (a LoadedModel) the --recipe adds the W8A8 layers that model has (quant/recipe.py)."""
        v = {**self.pop(values), **fixed}
        recipe = v.pop("recipe", DEFAULT_RECIPE)
        for flag, field in (("no_error_compensation", "error_compensation"),
                            ("no_reuse_compensation", "reuse_compensation")):
            if flag in v:
                v[field] = not v.pop(flag)
        for name in ("skip_layers", "int8_layers"):
            if name in v:
                v[name] = tuple(v[name])
        config = QuantConfig(**v)
        return config if model is None or model.unet is None else apply_recipe(config, model.unet, recipe)

    @staticmethod
    def recipe(values: dict) -> str:
        """The --recipe value (without popping it)."""
        return values.get("recipe", DEFAULT_RECIPE)


QUANT = _QuantGroup([
    ("recipe", "--recipe", dict(type=click.Choice(RECIPES), default=DEFAULT_RECIPE, show_default=True,
                                help="recommended: MoDiff plus what docs/quality.md measured to help on two models "
                                     "(conv_in/conv_out/time-embedding layers at W8A8 when bits are below 8, "
                                     "+0.3-1.1% BOPs; calibrate adds GPTQ rounding of the weights). "
                                     "paper: MoDiff exactly as published.")),
    ("mode", "--mode", dict(type=click.Choice(MODES), default="modiff", show_default=True,
                            help="fp: full precision; ptq: plain Q/DQ of inputs (baseline); "
                                 "modiff: quantize the change of each input, caches as graph I/O.")),
    ("weight_bits", "--weight-bits", dict(type=click.IntRange(2, 8), default=8, show_default=True,
                                          help="Weight bits (symmetric, per output channel).")),
    ("act_bits", "--act-bits", dict(type=click.IntRange(2, 8), default=8, show_default=True,
                                    help="Activation (delta) bits; < 8 are exact inside int8 via Clip.")),
    ("scale_mode", "--scale-mode", dict(type=click.Choice(SCALE_MODES), default="dynamic", show_default=True,
                                        help="dynamic: per-sample absmax at run time; static: calibrated scales "
                                             "(--calibration).")),
    ("granularity", "--granularity", dict(type=click.Choice(GRANULARITIES), default="sample", show_default=True,
                                          help="One activation scale per sample (batch-invariant) or per tensor "
                                               "(the paper).")),
    ("no_error_compensation", "--no-error-compensation",
     dict(is_flag=True, help="Ablation: a_hat = x instead of a_hat + Q(delta).")),
    ("keyframe_interval", "--keyframe-interval", dict(type=click.IntRange(1), default=None,
                                                      help="Re-run the full-precision prime step every K steps.")),
    ("skip_layers", "--skip-layers", dict(multiple=True, metavar="PATTERN",
                                          help="Leave layers matching this fnmatch pattern in full precision "
                                               "(repeatable; a pattern matching no layer is an error).")),
    ("int8_layers", "--int8-layers", dict(multiple=True, metavar="PATTERN",
                                          help="Keep layers matching this pattern at W8A8 (repeatable; a pattern "
                                               "matching no layer is an error).")),
    ("weight_block_size", "--weight-block-size",
     dict(type=click.IntRange(2), default=None, metavar="N",
          help="INT4 block quantization of Linear weights (N inputs per scale, e.g. 16..128; TensorRT weight-only "
               "INT4); needs --weight-bits <= 4 (and --opset 21 to export).")),
    ("reuse_interval", "--reuse-interval",
     dict(type=click.IntRange(1), default=None, metavar="N",
          help="Block reuse: only every N-th step computes the whole model; the others compute its outer "
               "--reuse-depth blocks and reuse the deep branch's last output (UNets: DeepCache; transformers: "
               "the middle blocks' residual). Export adds shallow.onnx.")),
    ("reuse_depth", "--reuse-depth",
     dict(type=click.IntRange(0), default=None, metavar="D",
          help="Block reuse: what reused steps still compute at each end: UNets, outer down/up block pairs "
               "(1..the block count); transformers, blocks at each end (0..(blocks - 1) / 2; 0 reuses every block).")),
    ("reuse_forecast", "--reuse-forecast",
     dict(type=click.Choice(REUSE_FORECASTS), default="none", show_default=True,
          help="Block reuse: what reused steps read as the deep branch's output: 'none' (the last full step's), "
               "'linear' (extrapolated from the last two full steps; better at intervals >= 3 with many-step "
               "samplers, docs/quality.md) or 'taylor' (second order from the last three, TaylorSeer-style).")),
    ("reuse_warmup", "--reuse-warmup",
     dict(type=click.IntRange(0), default=0, show_default=True, metavar="W",
          help="Block reuse: the first W steps of every trajectory are full, then every N-th (the features change "
               "fastest early, and the forecast learns its trend there; 3 is TaylorSeer's default).")),
    ("no_reuse_compensation", "--no-reuse-compensation",
     dict(is_flag=True, help="Ablation: the reused (deep) layers update a_hat = x on full steps (no error "
                             "compensation there).")),
])

class _SamplingGroup(_Group):
    def trajectories(self, values: dict, model, model_spec: str | None, samples: int | None = None):
        """Pop the trajectory options and build sampling.Trajectories for `model` (a LoadedModel; its text
        encoder folder `model_spec` encodes --prompts). `samples` images (default: one batch)."""
        from ..sampling import Trajectories

        v = self.pop(values)
        prompts = None
        if v.get("prompts"):
            from ..models.prompts import encode_prompts

            prompts = encode_prompts(model, model_spec, v["prompts"])
        return Trajectories(v["scheduler"], v["steps"], samples or v["batch_size"], v["batch_size"], v["seed"],
                            v["guidance_scale"], prompts, parse_labels(v.get("labels")))


def parse_labels(text: str | None) -> tuple[int, ...] | None:
    """--labels '3,1,4' -> (3, 1, 4); None stays None (default: labels cycle over the classes)."""
    if text is None:
        return None
    try:
        labels = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated integers, e.g. 3,1,4",
                                 param_hint="'--labels'") from None
    if not labels:
        raise click.BadParameter(f"{text!r}: expected at least one class label", param_hint="'--labels'")
    return labels


LABELS_HELP = ("Class-conditional models (DiT): class labels, comma-separated, cycled over the images "
               "(num_classes = the null class); default: image i gets (seed + i) % num_classes.")


SAMPLING = _SamplingGroup([
    ("model", "--model", dict(default=None, help="'digits' (embedded, the default), 'digits_b', 'digits_dit', "
                                                 "'digits_dit_b' or a local diffusers model/pipeline "
                                                 "folder. With a graph/engine folder the model comes from its "
                                                 "manifest; --model then checks it is the same model.")),
    ("backend", "--backend", dict(type=click.Choice(BACKENDS), default="torch",
                                  show_default=True,
                                  help=BACKEND_HELP)),
    ("graphs", "--graphs", dict(type=click.Path(file_okay=False), default=None,
                                help="Graph folder from `cli.py export` (--backend ort, openvino).")),
    ("engines", "--engines", dict(type=click.Path(file_okay=False), default=None,
                                  help="Engine folder from `cli.py build-engine` (--backend trt).")),
    ("scheduler", "--scheduler", dict(type=click.Choice(SCHEDULER_CHOICES), default="auto", show_default=True,
                                      help="diffusers scheduler (MoDiff never knows which one runs); auto: ddim, or "
                                           "the model's own flow-matching one (flow_euler / flow_heun) for flow "
                                           "models.")),
    ("steps", "--steps", dict(type=click.IntRange(1, 1000), default=25, show_default=True, help="Sampling steps.")),
    ("batch_size", "--batch-size", dict(type=click.IntRange(1, MAX_BATCH), default=16, show_default=True,
                                        help="Images per batch.")),
    ("seed", "--seed", dict(type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
                            help="Noise seed (batch i uses seed+i).")),
    ("guidance_scale", "--guidance-scale", dict(type=click.FloatRange(0, 100), default=1.0, show_default=True,
                                                help="Classifier-free guidance (conditional models; batch doubled).")),
    ("prompts", "--prompts", dict(type=click.Path(dir_okay=False), default=None,
                                  help="Text file, one prompt per line, encoded by --model's (a pipeline folder) text "
                                       "encoder instead of random encoder states; cycled over the images.")),
    ("labels", "--labels --class-label", dict(default=None, metavar="L[,L...]", help=LABELS_HELP)),
])
