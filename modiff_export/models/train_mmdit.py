"""Train digits_flux and digits_sd3: tiny diffusers MMDiTs on scikit-learn's digits (rectified flow matching).

digits_flux: FluxTransformer2DModel with FLUX.1's own architecture (double-stream then single-stream blocks,
3-axis RoPE, adaLN on timestep + pooled text), FLUX.1's scheduler config (FlowMatchEulerDiscreteScheduler with
dynamic shifting) and FluxPipeline's conventions (2x2 packing of the latent into tokens, img_ids / txt_ids,
timestep = sigma in [0, 1]). The "latent" is the 16x16 digit itself (1 channel -> 4 packed channels, 64 tokens).
digits_sd3: SD3Transformer2DModel with SD3-medium's architecture (joint-attention MMDiT blocks, 2x2 patch
embedding with a learned position table, the last block context_pre_only), SD3's scheduler config (shift 3.0)
and StableDiffusion3Pipeline's conventions (latent [B, C, H, W], timestep = sigma * 1000).
In place of T5 + CLIP, a learned LabelEncoder maps each digit class to text-like states [S, 64] and a pooled
vector [64]; its 11th row is the null class (label 10) for classifier-free guidance, trained by 10% label dropout.

    python cli.py train-demo --arch digits_flux --seed 4 --what unet      # or --arch digits_sd3 --seed 5

Training: x_t = (1 - sigma) x0 + sigma noise, target velocity v = noise - x0 (what FlowMatchEulerDiscreteScheduler
integrates: x_next = x + (sigma_next - sigma) v), sigma drawn from SD3's logit-normal distribution
(sigmoid of N(0, 1)). Everything is seeded; torch on CPU with the same thread count reproduces the same weights.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..fsutil import atomic_write_text
from . import denoiser
from .data import IMAGE_SIZE, digits_split, random_shift
from .label_encoder import LABEL_ENCODER_FILE, LabelEncoder
from .loading import ASSETS
from .train import WEIGHTS_FILE, _save_safetensors

FLUX_ASSETS = ASSETS.parent / "digits_flux"
SD3_ASSETS = ASSETS.parent / "digits_sd3"
# hidden 128 = 4 heads x 32; RoPE axes (8, 12, 12) sum to the head dim (axis 0 is the text/image index, unused
# here as in FLUX.1: all ids have 0 there). in_channels 4: the 1-channel latent packed 2x2.
FLUX_CONFIG = {
    "patch_size": 1, "in_channels": 4, "out_channels": None, "num_layers": 2, "num_single_layers": 4,
    "attention_head_dim": 32, "num_attention_heads": 4, "joint_attention_dim": 64, "pooled_projection_dim": 64,
    "guidance_embeds": False, "axes_dims_rope": (8, 12, 12),
}
# FLUX.1's scheduler config: for the 64-token digits, mu = calculate_shift(64) ~ 0.47 (sampling.flow_shift_mu)
FLUX_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
    "base_image_seq_len": 256, "max_image_seq_len": 4096,
}
# SD3-medium's block (no qk norm, no dual attention) at hidden 128 = 4 heads x 32, 4 blocks (the last one
# context_pre_only), patch 2 over the 1 x 16 x 16 digit: 64 image tokens, a learned 8 x 8 position table.
SD3_CONFIG = {
    "sample_size": 16, "patch_size": 2, "in_channels": 1, "out_channels": 1, "num_layers": 4,
    "attention_head_dim": 32, "num_attention_heads": 4, "joint_attention_dim": 64, "caption_projection_dim": 128,
    "pooled_projection_dim": 64, "pos_embed_max_size": 8,
}
SD3_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}  # stable-diffusion-3-medium's
NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES  # the label encoder's last row: classifier-free guidance's uncond
LABEL_SEQ_LEN = 4  # S: text-like tokens per label
LABEL_DROPOUT = 0.1
DEFAULT_FLUX_STEPS = 2400
DEFAULT_FLUX_LR = 5e-4


def build_flux() -> torch.nn.Module:
    """A freshly initialised FluxTransformer2DModel of FLUX_CONFIG (seed it first), its latent size in its
    config as `sample_size` (FLUX configs have none; models/denoiser.sample_hw reads it)."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(**FLUX_CONFIG)
    model.register_to_config(sample_size=IMAGE_SIZE)
    return model


def build_sd3() -> torch.nn.Module:
    """A freshly initialised SD3Transformer2DModel of SD3_CONFIG (seed it first)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**SD3_CONFIG)


def make_scheduler(arch: str = "digits_flux"):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**ARCHS[arch].scheduler_config)


def save_mmdit(transformer, encoder: LabelEncoder, scheduler, out: Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _save_safetensors(transformer.state_dict(), out / WEIGHTS_FILE)
    _save_safetensors({"states": encoder.states, "pooled": encoder.pooled}, out / LABEL_ENCODER_FILE)
    atomic_write_text(out / "config.json", transformer.to_json_string())  # with _class_name, like save_pretrained
    atomic_write_text(out / "scheduler_config.json", scheduler.to_json_string())


def flux_velocity(transformer, encoder: LabelEncoder, x: torch.Tensor, sigma: torch.Tensor,
                  labels: torch.Tensor) -> torch.Tensor:
    """One FluxPipeline-style transformer call, as models/denoiser.call makes it but with sigma itself as the
    timestep (as the shipped weights were trained; call takes scheduler units): packed x [B, N, 4], sigma [B]
    in [0, 1], labels [B] -> velocity [B, N, 4]."""
    ehs, pooled = encoder(labels)
    img_ids = denoiser.image_ids(denoiser.tokens_hw(x.shape[1])).to(x.dtype)
    txt_ids = torch.zeros(ehs.shape[1], 3, dtype=x.dtype)
    return transformer(hidden_states=x, timestep=sigma.to(x.dtype), encoder_hidden_states=ehs,
                       pooled_projections=pooled, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]


def sd3_velocity(transformer, encoder: LabelEncoder, x: torch.Tensor, sigma: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
    """One StableDiffusion3Pipeline-style call: x [B, 1, 16, 16], timestep sigma * 1000 (the scheduler's
    timesteps, what denoiser.call passes), labels [B] -> velocity [B, 1, 16, 16]."""
    ehs, pooled = encoder(labels)
    return transformer(hidden_states=x, timestep=(sigma * 1000).to(x.dtype), encoder_hidden_states=ehs,
                       pooled_projections=pooled, return_dict=False)[0]


@dataclass(frozen=True)
class MMDiTArch:
    """What differs between the two validation MMDiTs; train_mmdit is the same loop for both."""
    build: Callable[[], torch.nn.Module]
    scheduler_config: dict
    assets: Path
    velocity: Callable  # (transformer, encoder, x, sigma [B], labels [B]) -> velocity shaped as x
    packed: bool        # FLUX trains on packed tokens [B, 64, 4], SD3 on the latent itself [B, 1, 16, 16]


ARCHS = {"digits_flux": MMDiTArch(build_flux, FLUX_SCHEDULER_CONFIG, FLUX_ASSETS, flux_velocity, packed=True),
         "digits_sd3": MMDiTArch(build_sd3, SD3_SCHEDULER_CONFIG, SD3_ASSETS, sd3_velocity, packed=False)}


def train_mmdit(arch: str = "digits_flux", steps: int | None = None, seed: int = 0, out: Path | None = None,
                batch_size: int = 64, lr: float | None = None, ema_decay: float = 0.998, save_every: int = 250,
                threads: int = 1) -> float:
    """Rectified flow matching (velocity noise - x0, logit-normal sigma); the EMA weights of the transformer and
    of the label encoder are saved (save_mmdit). 10% of the labels become NULL_LABEL (classifier-free guidance).
    Returns wall seconds. One thread by default: reproducible, and fastest on a shared CPU."""
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r} not in {list(ARCHS)}")
    spec = ARCHS[arch]
    out = spec.assets if out is None else Path(out)
    steps = DEFAULT_FLUX_STEPS if steps is None else steps
    lr = DEFAULT_FLUX_LR if lr is None else lr
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_train, y_train = digits_split("train")  # [N, 1, 16, 16], [N] int64
    model = spec.build().train()
    dims = (NUM_CLASSES, LABEL_SEQ_LEN, model.config.joint_attention_dim, model.config.pooled_projection_dim)
    encoder = LabelEncoder(*dims).train()
    ema, ema_encoder = spec.build().eval().requires_grad_(False), LabelEncoder(*dims).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    ema_encoder.load_state_dict(encoder.state_dict())
    params = [*model.parameters(), *encoder.parameters()]
    ema_params = [*ema.parameters(), *ema_encoder.parameters()]
    scheduler = make_scheduler(arch)
    shape_in = denoiser.pack if spec.packed else (lambda x: x)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 100))  # warmup
    t0 = time.time()
    bar = tqdm(range(steps), desc=f"train {arch} transformer")
    for step in bar:
        idx = torch.randint(0, len(x_train), (batch_size,), generator=g)
        x0 = random_shift(x_train[idx], 1, g)                                  # [B, 1, 16, 16]
        noise = torch.randn(x0.shape, generator=g)
        sigma = torch.sigmoid(torch.randn(batch_size, generator=g))            # logit-normal (SD3), [B]
        s = sigma[:, None, None, None]
        xt = (1 - s) * x0 + s * noise
        labels = y_train[idx].clone()                                          # [B] int64
        labels[torch.rand(batch_size, generator=g) < LABEL_DROPOUT] = NULL_LABEL
        v = spec.velocity(model, encoder, shape_in(xt), sigma, labels)
        loss = F.mse_loss(v, shape_in(noise - x0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema_params, params):
                pe.lerp_(p, 1 - d)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % save_every == 0 or step + 1 == steps:
            save_mmdit(ema, ema_encoder, scheduler, out)
    return time.time() - t0
