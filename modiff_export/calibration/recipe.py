"""The recommended recipe: what `calibrate`, `export` and `sample --backend torch` do by default
(measured in docs/quality.md; docs/design.md section 2).

    config = apply_recipe(config, model.unet, "recommended")    # + the W8A8 layers this model has
    gptq_layers(config, unet)                                  # which layers calibration rounds with GPTQ

"recommended" = MoDiff as published, plus
  - `conv_in`, `conv_out` and the time-embedding Linears kept at W8A8 (INT8_IO_TIME_LAYERS; patterns
    a model does not have are left out, so any diffusers UNet works); for transformers the patch
    embedding, final projections, timestep embedders, adaLN modulation and caption projection;
    whenever the config has sub-8-bit weights or activations;
  - with a calibration file: every quantized weight, 8-bit ones included, rounded with GPTQ on
    calibration trajectories (calibration/hessians.py), stored beside the calibration file and baked
    in by `export`.
What each part buys, measured on two models: docs/quality.md.
"paper" = MoDiff exactly as published (uniform bits, nearest rounding).
"""
from __future__ import annotations

import fnmatch

from torch import nn

from ..config import QuantConfig
from ..quant.quantization import MoDiffLayer
from ..sampling import Trajectories
from .hessians import gptq_round
from .observe import CALIBRATION_TRAJECTORIES, calibrate

RECIPES = ("recommended", "paper")
DEFAULT_RECIPE = "recommended"
# kept at W8A8 by the recommended recipe; docs/quality.md measures it on two models. Transformers (DiT, PixArt):
# the patch embedding, the final projections, every timestep embedder, the adaLN modulation and the caption
# projection, measured on digits_dit (docs/transformers.md, W4A4 FD over FP, DDIM-50 / DPM++-20): uniform
# +104% / +64%, + patch/final/timestep at W8A8 +30% / +27%, + adaLN/caption +22% / +21%.
# MMDiT (FLUX, SD3), issue 32, measured on digits_flux (docs/quality.md "FLUX"; docs/digits_flux_recipe_run1.txt;
# MoDiff, dynamic scales, no calibration, flow-Euler 28, 128 samples, median per-sample PSNR to FP, guidance 1 / 2):
# uniform W8A4 45.9 / 42.3 dB (FD +3.0% / -2.3%), W4A4 30.8 / 30.2 dB (+11.9% / -10.8%); the patterns below kept
# at W8A8 on top of TRANSFORMER_INT8_LAYERS' (16 of 60 Linears: the embedders x_embedder, context_embedder,
# time_text_embed.*; the modulation of both streams, norm1(_context).linear, single blocks' norm.linear,
# norm_out.linear; the final proj_out), W8A4 50.9 / 45.2 dB (+1.2% / -0.3%), W4A4 35.0 / 33.8 dB (+9.7% / -10.8%),
# for +0.8% (W8A4) / +2.5% (W4A4) BOPs: the best median PSNR in all four cells of the five sets that recorded it
# (tied within 0.1 dB at W8A4 with previous+embedders). The embedders carry W8A4 (embedders+final 50.8 / 44.9 dB),
# modulation + final W4A4 (34.4 / 33.2 dB); the context stream at W8A8 (12 Linears, +1.5% / +4.9% BOPs) did not
# help (mean PSNR W8A4 43.8 / 40.3 dB, W4A4 28.9 / 29.1 dB vs uniform 44.9 / 41.3, 28.9 / 28.2), so it keeps the
# config's bits. SD3, measured on digits_sd3 (docs/quality.md "SD3"; docs/digits_sd3_layers.jsonl; same protocol):
# the same 16 Linears (pos_embed.proj in place of x_embedder; SD3 has no single blocks) are the best or tied-best
# set in every cell: W8A4 FD +2.0% / -3.4% (46.0 / 40.0 dB median PSNR) vs uniform +4.0% / -4.8% (39.8 / 38.0),
# W4A4 +15.9% / -4.1% (33.1 / 31.6 dB) vs uniform +43.0% / -12.0% (30.1 / 28.8); the context stream at W8A8
# (21 Linears) again gained nothing (W4A4 +37.9%, 30.1 dB at g1).
INT8_IO_TIME_LAYERS = ("conv_in", "conv_out", "time_embedding.*", "*.time_emb_proj")  # UNets
TRANSFORMER_INT8_LAYERS = ("pos_embed.proj", "proj_out*", "*timestep_embedder.*",
                           "*.norm1.linear", "adaln_single.linear", "caption_projection.*")
MMDIT_INT8_LAYERS = ("x_embedder", "context_embedder", "time_text_embed.*", "*.norm1_context.linear",
                     "single_transformer_blocks.*.norm.linear", "norm_out.linear")
RECIPE_INT8_LAYERS = INT8_IO_TIME_LAYERS + TRANSFORMER_INT8_LAYERS + MMDIT_INT8_LAYERS


def linear_layer_names(unet: nn.Module) -> list[str]:
    """Names of the Conv2d/Linear modules quantize() wraps, before or after quantization."""

    if any(isinstance(m, MoDiffLayer) for m in unet.modules()):
        return [m.name for m in unet.modules() if isinstance(m, MoDiffLayer)]
    return [n for n, m in unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def recipe_int8_layers(config: QuantConfig, unet: nn.Module) -> tuple[str, ...]:
    """The RECIPE_INT8_LAYERS patterns that match a layer of `unet`; none for fp or W8A8 configs
    (where W8A8 layers change nothing)."""
    if config.mode == "fp" or (config.weight_bits == 8 and config.act_bits == 8):
        return ()
    names = linear_layer_names(unet)
    return tuple(p for p in RECIPE_INT8_LAYERS if any(fnmatch.fnmatchcase(n, p) for n in names))


def apply_recipe(config: QuantConfig, unet: nn.Module, recipe: str = DEFAULT_RECIPE) -> QuantConfig:
    """`config` with the recipe's W8A8 layers added to its own int8_layers (a user's patterns stay)."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe {recipe!r} not in {list(RECIPES)}")
    if recipe == "paper":
        return config
    extra = tuple(p for p in recipe_int8_layers(config, unet) if p not in config.int8_layers)
    return config.replace(int8_layers=config.int8_layers + extra) if extra else config


def gptq_layers(config: QuantConfig, unet: nn.Module, recipe: str = DEFAULT_RECIPE) -> list[str]:
    """Layers whose weights calibration rounds with GPTQ under `recipe`: every quantized layer (the
    W8A8 ones included). Linear layers with INT4 block scales keep nearest rounding (gptq_round)."""
    if recipe == "paper" or config.mode == "fp":
        return []
    return [name for name in linear_layer_names(unet) if not config.skips(name)]


def calibrate_recipe(model, config: QuantConfig, recipe: str = DEFAULT_RECIPE,
                     traj: Trajectories = CALIBRATION_TRAJECTORIES, progress: bool = True,
                     **calibrate_kwargs) -> tuple[dict, dict]:
    """What `cli.py calibrate` computes for `model` (a LoadedModel) under `config` (recipe already applied)
    and `recipe`: (calibration file content, {layer: (codes, scale)} GPTQ weights; {} for "paper").
    GPTQ runs first on full-precision trajectories `traj`, then the deltas are observed on the same
    trajectories with those weights. calibrate_kwargs go to observe.calibrate (buckets, method,
    percentile, subsample, in_place)."""
    rounded = gptq_round(model, config, gptq_layers(config, model.unet, recipe), traj, progress=progress)
    return calibrate(model, config, traj, rounded_weights=rounded, progress=progress, **calibrate_kwargs), rounded
