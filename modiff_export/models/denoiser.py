"""One call convention for every supported denoiser class (UNets and diffusion transformers).

    out = call(model, sample, timestep [B], cond {name: tensor})   -> [B, C_out, H, W] (packed: [B, N, C*4])

`cond` holds the model's named conditioning inputs (models/conditioning.py, conditioning_of): each name is
the diffusers forward argument it feeds. `timestep` is in the scheduler's units (0..num_train_timesteps) for
every class; FLUX's transformer takes sigma = t / 1000, which call() passes it (timestep_scale).

Sample layouts: every class takes sample [B, C, H, W] except FLUX, whose graphs take packed latents
[B, N = (H/2)(W/2), C*4] (FluxPipeline's _pack_latents; pack/unpack below). The FLUX ids (img_ids [N, 3],
txt_ids [S, 3]) depend only on those shapes, so call() computes them (they are constants of the graph).
Models with a learned variance (out_channels == 2 * in_channels: DiT, PixArt) return only the epsilon
half, as DiTPipeline / PixArtAlphaPipeline do.

This is a function over the model itself, not a wrapper module: the model's module names (the layer
names of manifests, calibration files and --int8-layers patterns) are the diffusers names. The timestep
is passed by keyword, which the quantized model's pre-hook reads (quant/quantization.py).
"""
from __future__ import annotations

import torch

from .conditioning import CondInput, Conditioning, ConditioningError

SUPPORTED = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel", "PixArtTransformer2DModel",
             "SD3Transformer2DModel", "FluxTransformer2DModel")
TRANSFORMERS = SUPPORTED[2:]
LEARNED_SIGMA = ("DiTTransformer2DModel", "PixArtTransformer2DModel")
PACKED = ("FluxTransformer2DModel",)  # classes whose sample is packed latents [B, N, C*4]
CLASS_LABELS, ENCODER_STATES = "class_labels", "encoder_hidden_states"
ENCODER_MASK = "encoder_attention_mask"  # PixArt's caption padding mask
FLUX_IDS = ("img_ids", "txt_ids")
# text lengths of random encoder states when no text encoder says otherwise (what each pipeline's encoders give)
SEQ_LEN = {"UNet2DConditionModel": 77, "PixArtTransformer2DModel": 120,  # CLIP; PixArt-alpha's T5
           "SD3Transformer2DModel": 333, "FluxTransformer2DModel": 512}  # CLIP 77 + T5 256; T5 512
FLUX_DEFAULT_SIZE = 128  # latent H = W when a FLUX config names no sample_size (FLUX.1 at 1024 px)


def class_name(model) -> str:
    return type(model).__name__


def conditioning_of(model, seq_len: int | None = None) -> Conditioning:
    """The named conditioning inputs of a diffusers denoiser (models/conditioning.py). seq_len: S of its
    encoder states (None: SEQ_LEN of its class). Raises ConditioningError for a conditioning it cannot take."""
    name, cfg = class_name(model), model.config
    S = seq_len or SEQ_LEN.get(name, 77)
    if name == "DiTTransformer2DModel":
        return Conditioning((CondInput(CLASS_LABELS, (), "int64", "labels", int(cfg.num_embeds_ada_norm)),))
    if name == "PixArtTransformer2DModel":
        D = int(cfg.caption_channels)
        return Conditioning((CondInput(ENCODER_STATES, (S, D)), CondInput(ENCODER_MASK, (S,), kind="mask")))
    if name in ("SD3Transformer2DModel", "FluxTransformer2DModel"):
        inputs = [CondInput(ENCODER_STATES, (S, int(cfg.joint_attention_dim))),
                  CondInput("pooled_projections", (int(cfg.pooled_projection_dim),))]
        if name == "FluxTransformer2DModel" and cfg.guidance_embeds:
            inputs.append(CondInput("guidance", (), kind="guidance"))
        return Conditioning(tuple(inputs), FLUX_IDS if name in PACKED else ())
    cad = getattr(cfg, "cross_attention_dim", None)
    if name == "UNet2DModel" or not cad:
        return Conditioning()
    D = int(cad[0] if isinstance(cad, (list, tuple)) else cad)
    inputs = [CondInput(ENCODER_STATES, (S, D))]
    extra = getattr(cfg, "addition_embed_type", None)
    if extra == "text_time":  # SDXL: pooled text embeds + 6 micro-conditioning ids, through added_cond_kwargs
        P = int(cfg.projection_class_embeddings_input_dim) - 6 * int(cfg.addition_time_embed_dim)
        inputs += [CondInput("text_embeds", (P,)), CondInput("time_ids", (6,), kind="time_ids")]
    elif extra is not None:
        raise ConditioningError(f"{name} with addition_embed_type={extra!r} is not supported (SD-1.5 style: none; "
                                f"SDXL: 'text_time')")
    if getattr(cfg, "class_embed_type", None) is not None:
        raise ConditioningError(f"{name} with class_embed_type={cfg.class_embed_type!r} is not supported")
    return Conditioning(tuple(inputs))


def packed(model) -> bool:
    return class_name(model) in PACKED


def eps_channels(model) -> int:
    """Channels of what `call` returns (per token when packed): in_channels for learned-sigma models."""
    cfg = model.config
    c_in = int(cfg.in_channels)
    c_out = int(getattr(cfg, "out_channels", None) or c_in)
    return c_in if c_out == 2 * c_in and class_name(model) in LEARNED_SIGMA else c_out


def latent_channels(model) -> int:
    """C of the [B, C, H, W] latents sampling draws (FLUX: in_channels / 4, the packing's 2x2)."""
    c = int(model.config.in_channels)
    return c // 4 if packed(model) else c


def sample_hw(model) -> tuple[int, int] | None:
    """Latent (H, W): config sample_size (FLUX configs have none: FLUX_DEFAULT_SIZE unless one is added)."""
    size = getattr(getattr(model, "config", None), "sample_size", None)
    if size is None:
        return (FLUX_DEFAULT_SIZE,) * 2 if packed(model) else None
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def graph_shape(channels: int, hw: tuple[int, int], is_packed: bool) -> tuple[int, ...]:
    """The per-sample shape a graph's sample (or output) has: (C, H, W), or packed (N = (H/2)(W/2), C*4)."""
    H, W = hw
    return ((H // 2) * (W // 2), channels * 4) if is_packed else (channels, H, W)


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), C*4], FluxPipeline._pack_latents."""
    B, C, H, W = x.shape
    return x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), C * 4)


def unpack(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """[B, (H/2)(W/2), C*4] -> [B, C, H, W], FluxPipeline._unpack_latents (latent H, W)."""
    (B, _, C4), (H, W) = x.shape, hw
    return x.view(B, H // 2, W // 2, C4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C4 // 4, H, W)


def image_ids(hw: tuple[int, int]) -> torch.Tensor:
    """img_ids [(H/2)(W/2), 3] of FLUX's rotary positions (FluxPipeline._prepare_latent_image_ids)."""
    h, w = hw[0] // 2, hw[1] // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def tokens_hw(n: int) -> tuple[int, int]:
    """Latent (H, W) of a square packed sequence of n tokens."""
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ConditioningError(f"packed latents of {n} tokens: not a square image; pass the latent size")
    return (2 * side, 2 * side)


def packed_hw(model, n: int) -> tuple[int, int]:
    """Latent (H, W) of a packed sequence of n tokens: the config's sample_size where it fits, else square."""
    hw = sample_hw(model)
    return hw if hw and (hw[0] // 2) * (hw[1] // 2) == n else tokens_hw(n)


def timestep_scale(model) -> float:
    """What the model's forward takes per scheduler timestep unit (FLUX: sigma = t / 1000)."""
    return 1e-3 if packed(model) else 1.0


def call(model, sample: torch.Tensor, timestep: torch.Tensor, cond=None, mask: torch.Tensor | None = None
         ) -> torch.Tensor:
    """The denoiser's prediction (see the module docstring); `cond` {name: tensor} by conditioning_of(model)'s
    names (one tensor: its only required input; `mask`: shorthand for PixArt's encoder_attention_mask)."""
    name = class_name(model)
    cond = conditioning_of(model).as_mapping(cond, name) if torch.is_tensor(cond) else dict(cond or {})
    if mask is not None:
        cond[ENCODER_MASK] = mask
    if name == "DiTTransformer2DModel":
        out = model(sample, timestep=timestep, class_labels=cond[CLASS_LABELS], return_dict=False)[0]
    elif name == "PixArtTransformer2DModel":
        out = model(sample, timestep=timestep, encoder_hidden_states=cond[ENCODER_STATES],
                    encoder_attention_mask=cond.get(ENCODER_MASK),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    elif name == "SD3Transformer2DModel":
        out = model(sample, encoder_hidden_states=cond[ENCODER_STATES], pooled_projections=cond["pooled_projections"],
                    timestep=timestep, return_dict=False)[0]
    elif name == "FluxTransformer2DModel":
        ehs = cond[ENCODER_STATES]
        model.modiff_timestep_scale = timestep_scale(model)  # what a quantized model's pre-hook divides by
        out = model(hidden_states=sample, encoder_hidden_states=ehs, pooled_projections=cond["pooled_projections"],
                    timestep=timestep * timestep_scale(model), guidance=cond.get("guidance"),
                    img_ids=image_ids(packed_hw(model, sample.shape[1])).to(sample.dtype),
                    txt_ids=torch.zeros(ehs.shape[1], 3, dtype=sample.dtype), return_dict=False)[0]
        return out
    else:  # UNet2DModel, UNet2DConditionModel (SD-1.5; SDXL's text_embeds/time_ids as added_cond_kwargs)
        kwargs = {}
        if ENCODER_STATES in cond:
            kwargs["encoder_hidden_states"] = cond[ENCODER_STATES]
        if "text_embeds" in cond:
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return model(sample, timestep, **kwargs, return_dict=False)[0]
    c = eps_channels(model)
    return out[:, :c] if out.shape[1] != c else out
