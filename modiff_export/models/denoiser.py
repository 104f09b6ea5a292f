"""One call convention for every supported denoiser class (UNets and diffusion transformers).

    eps = call(model, sample [B, C, H, W], timestep [B], cond)   -> [B, C_eps, H, W]

`cond` is what the model is conditioned on, by `conditioning(model)`:
    None     UNet2DModel                                   no conditioning
    "text"   UNet2DConditionModel, PixArtTransformer2DModel  encoder_hidden_states [B, S, D] float32
    "class"  DiTTransformer2DModel                         class_labels [B] int64 (label num_classes: the
                                                           null class of classifier-free guidance)
PixArt also takes `mask`, encoder_attention_mask [B, S] float32 (1: attend to the caption token, 0: padding),
the second conditioning input of its graphs (docs/design.md section 3); None attends to every token.
Models with a learned variance (out_channels == 2 * in_channels: DiT, PixArt) return only the epsilon
half, the first in_channels channels, as DiTPipeline / PixArtAlphaPipeline do.

This is a function over the model itself, not a wrapper module: the model's module names (the layer
names of manifests, calibration files and --int8-layers patterns) are the diffusers names. The timestep
is passed by keyword, which the quantized model's pre-hook reads (quant/quantization.py).
"""
from __future__ import annotations

import torch

CONDITIONING = {"UNet2DModel": None, "UNet2DConditionModel": "text", "DiTTransformer2DModel": "class",
                "PixArtTransformer2DModel": "text"}
SUPPORTED = tuple(CONDITIONING)
TRANSFORMERS = ("DiTTransformer2DModel", "PixArtTransformer2DModel")
CLASS_LABELS, ENCODER_STATES = "class_labels", "encoder_hidden_states"  # graph input names of `cond`
ENCODER_MASK = "encoder_attention_mask"  # graph input of `mask` (PixArt)
MASKED = ("PixArtTransformer2DModel",)  # classes whose cross-attention takes a caption padding mask


def conditioning(model) -> str | None:
    """None, "text" or "class" (any other class is called as a UNet2DConditionModel when it has a
    cross_attention_dim in its config, else as a UNet2DModel)."""
    name = type(model).__name__
    if name in CONDITIONING:
        return CONDITIONING[name]
    return "text" if getattr(getattr(model, "config", None), "cross_attention_dim", None) else None


def cond_input(kind: str | None) -> str | None:
    """The graph input name that carries `cond` for a conditioning kind."""
    return {None: None, "text": ENCODER_STATES, "class": CLASS_LABELS}[kind]


def takes_mask(model) -> bool:
    """Whether `call` passes an encoder_attention_mask to this model (PixArt)."""
    return type(model).__name__ in MASKED


def num_classes(model) -> int | None:
    """Class-conditional models: the number of real classes (labels 0..n-1; n is the null class)."""
    if conditioning(model) != "class":
        return None
    return int(model.config.num_embeds_ada_norm)


def text_dim(model) -> int | None:
    """D of encoder_hidden_states [B, S, D] for text-conditional models (PixArt: its caption_channels,
    the T5 width its caption projection takes)."""
    if conditioning(model) != "text":
        return None
    cfg = model.config
    if type(model).__name__ == "PixArtTransformer2DModel":
        return int(cfg.caption_channels)
    cad = cfg.cross_attention_dim
    return int(cad[0] if isinstance(cad, (list, tuple)) else cad)


def eps_channels(model) -> int:
    """Channels of what `call` returns: in_channels for learned-sigma models (out = 2 * in)."""
    cfg = model.config
    c_in = int(cfg.in_channels)
    c_out = int(getattr(cfg, "out_channels", None) or c_in)
    return c_in if c_out == 2 * c_in and type(model).__name__ in TRANSFORMERS else c_out


def sample_hw(model) -> tuple[int, int] | None:
    size = getattr(getattr(model, "config", None), "sample_size", None)
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def call(model, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor | None = None,
         mask: torch.Tensor | None = None) -> torch.Tensor:
    """The denoiser's epsilon prediction [B, C_eps, H, W] (see the module docstring); `mask` [B, S] only
    for models that take one (takes_mask)."""
    name = type(model).__name__
    if name == "DiTTransformer2DModel":
        out = model(sample, timestep=timestep, class_labels=cond, return_dict=False)[0]
    elif name == "PixArtTransformer2DModel":
        out = model(sample, timestep=timestep, encoder_hidden_states=cond, encoder_attention_mask=mask,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    else:
        kwargs = {"encoder_hidden_states": cond} if cond is not None else {}
        return model(sample, timestep, **kwargs, return_dict=False)[0]
    c = eps_channels(model)
    return out[:, :c] if out.shape[1] != c else out
