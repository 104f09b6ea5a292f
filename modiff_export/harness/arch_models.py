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
KINDS = ("cifar", "sd15", "dit_s2", "pixart")

SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
             "beta_start": 0.0001, "beta_end": 0.02, "clip_sample": True, "prediction_type": "epsilon"}


def write_model(kind: str, out: Path, latent: int = 32, seed: int = 0) -> Path:
    """Write a random-weight `kind` (one of KINDS) model folder to `out` unless it exists; returns it.
    `latent` sizes sd15 and pixart (DiT-S/2 is 32x32 as published)."""
    import torch
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, UNet2DConditionModel, UNet2DModel

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
    else:
        raise ValueError(f"unknown architecture {kind!r}")
    unet.eval().requires_grad_(False).save_pretrained(out)
    (out / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    return out
