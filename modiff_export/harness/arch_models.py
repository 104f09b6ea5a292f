"""Random-weight diffusers denoisers of realistic architectures, written as local model folders (nothing
downloaded): the CIFAR-10 DDPM UNet (google/ddpm-cifar10-32's configuration, 35.7M params, 32x32), Stable
Diffusion v1.5's UNet2DConditionModel (860M params) at a chosen latent size, DiT-S/2 (Peebles & Xie 2023: hidden
384, depth 12, 6 heads, patch 2, 32x32x4 latent, 1000 classes, learned sigma; 39.8M params in diffusers' layout, which
gives every block its own timestep + class embedder, 33M as published) and PixArt-alpha's
transformer (hidden 1152, depth 28, 16 heads, T5-XXL captions of 4096 channels; 611M params) at a chosen latent."""
from __future__ import annotations

import json
from pathlib import Path

# attention at 16x16 with one head (attention_head_dim None), as in DDPM (Ho et al. 2020)
CIFAR_DDPM = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "block_out_channels": (128, 256, 256, 256),
    "layers_per_block": 2, "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), "attention_head_dim": None,
}

SD15_UNET = {
    "in_channels": 4, "out_channels": 4, "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2, "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}

DIT_S2 = {
    "sample_size": 32, "in_channels": 4, "out_channels": 8, "patch_size": 2, "num_layers": 12,
    "num_attention_heads": 6, "attention_head_dim": 64, "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_zero",
}

PIXART_ALPHA = {
    "in_channels": 4, "out_channels": 8, "patch_size": 2, "num_layers": 28, "num_attention_heads": 16,
    "attention_head_dim": 72, "cross_attention_dim": 1152, "caption_channels": 4096, "norm_type": "ada_norm_single",
    "num_embeds_ada_norm": 1000, "activation_fn": "gelu-approximate",
}
# FLUX.1 (dev) at reduced depth: its hidden size (3072 = 24 heads x 128), T5 width 4096, CLIP pooled 768, 3-axis
# RoPE and guidance embedding, with `double` / `single` blocks of each kind instead of 19 / 38 (~340M / ~141M
# parameters each); 16 latent channels packed 2x2 (in_channels 64)
FLUX1 = {"patch_size": 1, "in_channels": 64, "attention_head_dim": 128, "num_attention_heads": 24,
         "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
         "axes_dims_rope": (16, 56, 56)}
FLUX_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                  "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                  "max_image_seq_len": 4096}
# SD3-medium's MMDiT at reduced depth: hidden 1536 (24 heads x 64), joint attention over T5+CLIP states of 4096
# channels, pooled 2048, patch 2, 16 latent channels; `depth` joint blocks instead of 24
SD3_MEDIUM = {"patch_size": 2, "in_channels": 16, "out_channels": 16, "attention_head_dim": 64,
              "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
              "pooled_projection_dim": 2048, "pos_embed_max_size": 192}
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
KINDS = ("cifar", "sd15", "dit_s2", "pixart", "flux", "sd3m")

SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
             "beta_start": 0.0001, "beta_end": 0.02, "clip_sample": True, "prediction_type": "epsilon"}


def write_model(kind: str, out: Path, latent: int = 32, seed: int = 0, depth: tuple[int, int] = (2, 2)) -> Path:
    """Write a random-weight `kind` (one of KINDS) model folder to `out` unless it exists; returns it.
    `latent` sizes sd15, pixart, flux and sd3m (DiT-S/2 is 32x32 as published; flux at latent 64: 1024 image
    tokens); `depth`: (double, single) blocks of flux, (joint, -) of sd3m."""
    import torch
    from diffusers import (
        DiTTransformer2DModel,
        FluxTransformer2DModel,
        PixArtTransformer2DModel,
        SD3Transformer2DModel,
        UNet2DConditionModel,
        UNet2DModel,
    )

    out = Path(out)
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    if kind == "cifar":
        unet = UNet2DModel(**CIFAR_DDPM)
    elif kind == "sd15":
        unet = UNet2DConditionModel(sample_size=latent, **SD15_UNET)
    elif kind == "dit_s2":
        unet = DiTTransformer2DModel(**DIT_S2)
    elif kind == "pixart":
        unet = PixArtTransformer2DModel(sample_size=latent, **PIXART_ALPHA)
    elif kind == "flux":
        unet = FluxTransformer2DModel(num_layers=depth[0], num_single_layers=depth[1], **FLUX1)
        unet.register_to_config(sample_size=latent)  # the latent size its graphs are exported for
    elif kind == "sd3m":
        unet = SD3Transformer2DModel(sample_size=latent, num_layers=depth[0], **SD3_MEDIUM)
    else:
        raise ValueError(f"unknown architecture {kind!r}")
    unet.eval().requires_grad_(False).save_pretrained(out)
    sched = {"flux": FLUX_SCHEDULER, "sd3m": SD3_SCHEDULER}.get(kind, SCHEDULER)
    (out / "scheduler_config.json").write_text(json.dumps(sched))
    return out
