"""Train the embedded validation models (tiny DDPM denoisers on scikit-learn's digits) and the metrics classifier.

    python cli.py train-demo                        # digits UNet + classifier, into trained/digits/
    python cli.py train-demo --arch digits_dit      # the class-conditional DiT (labels 0-9, CFG label dropout)
    python cli.py train-demo --arch digits_dit_b    # the second DiT (6 blocks of 96, linear betas)
Everything is seeded; torch on CPU with the same thread count reproduces the same weights.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..fsutil import atomic_write_text
from .classifier import CLASSIFIER_FILE, DigitsClassifier
from .data import digits_split, random_shift
from .loading import ASSETS

UNET_CONFIG = dict(
    sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
    block_out_channels=(32, 64, 64), norm_num_groups=8,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),  # 16 -> 8 -> 4, attn at 4x4
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
# digits_b: the second validation model (docs/quality.md), trained differently so no decision is tuned to one model:
# no attention anywhere, two resnets per level, linear betas; train-demo --arch digits_b --seed 1 --steps 1500.
UNET_CONFIG_B = {
    "sample_size": 16, "in_channels": 1, "out_channels": 1, "layers_per_block": 2,
    "block_out_channels": (32, 64, 64), "norm_num_groups": 8, "add_attention": False,
    "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D"),  # 16 -> 8 -> 4, no attention
    "up_block_types": ("UpBlock2D", "UpBlock2D", "UpBlock2D"),
}
SCHEDULER_CONFIG_B = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"}
# digits_dit: the third validation model, a class-conditional DiT (docs/transformers.md): 8x8 = 64 tokens of 2x2
# patches, 4 blocks of hidden 128 (1.4M parameters), adaLN-zero conditioning on timestep + digit class. The class
# embedder's table has an 11th row, the null class (label 10), trained by DiT's own label dropout (10%, train mode)
# so that classifier-free guidance works; trained with train-demo --arch digits_dit --steps 3000.
DIT_CONFIG = {
    "sample_size": 16, "in_channels": 1, "out_channels": 1, "patch_size": 2, "num_layers": 4,
    "num_attention_heads": 4, "attention_head_dim": 32, "num_embeds_ada_norm": 10, "norm_type": "ada_norm_zero",
}
# digits_dit_b: the second transformer validation model, trained differently so no transformer decision is tuned to
# one model: deeper and narrower (6 blocks of hidden 96 = 3 heads x 32), linear betas (digits_b's schedule);
# train-demo --arch digits_dit_b --seed 3.
DIT_CONFIG_B = {
    "sample_size": 16, "in_channels": 1, "out_channels": 1, "patch_size": 2, "num_layers": 6,
    "num_attention_heads": 3, "attention_head_dim": 32, "num_embeds_ada_norm": 10, "norm_type": "ada_norm_zero",
}
ARCHITECTURES = {"digits": (UNET_CONFIG, SCHEDULER_CONFIG), "digits_b": (UNET_CONFIG_B, SCHEDULER_CONFIG_B),
                 "digits_dit": (DIT_CONFIG, SCHEDULER_CONFIG), "digits_dit_b": (DIT_CONFIG_B, SCHEDULER_CONFIG_B)}
DITS = ("digits_dit", "digits_dit_b")  # the class-conditional transformers among ARCHITECTURES
DEFAULT_STEPS = {"digits": 2000, "digits_b": 1500, "digits_dit": 3000, "digits_dit_b": 3000}
DEFAULT_LR = {"digits": 1e-3, "digits_b": 1e-3, "digits_dit": 5e-4,  # the transformers want a gentler step
              "digits_dit_b": 5e-4}


def build_denoiser(arch: str) -> torch.nn.Module:
    """A freshly initialised denoiser of ARCHITECTURES[arch] (seed it first)."""
    from diffusers import DiTTransformer2DModel, UNet2DModel

    config = ARCHITECTURES[arch][0]
    return DiTTransformer2DModel(**config) if arch in DITS else UNet2DModel(**config)
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def _save_safetensors(state: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)


def save_unet(unet, scheduler, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _save_safetensors(unet.state_dict(), out / WEIGHTS_FILE)
    atomic_write_text(out / "config.json", unet.to_json_string())  # with _class_name, like save_pretrained
    atomic_write_text(out / "scheduler_config.json", scheduler.to_json_string())


def train_unet(steps: int | None = None, seed: int = 0, out: Path = ASSETS, batch_size: int = 64,
               lr: float | None = None, ema_decay: float = 0.998, save_every: int = 250, threads: int = 1,
               arch: str = "digits") -> float:
    """DDPM epsilon-prediction training; the EMA weights are saved. Returns wall seconds.
    arch: a key of ARCHITECTURES (denoiser + noise-schedule config); steps and lr default per arch. The DiT
    sees each image's digit class (label dropout in train mode gives it the null class). One thread by
    default: reproducible, and fastest on a shared CPU."""
    from diffusers import DDPMScheduler

    steps = DEFAULT_STEPS[arch] if steps is None else steps
    lr = DEFAULT_LR[arch] if lr is None else lr
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_train, y_train = digits_split("train")  # [N, 1, 16, 16], [N] int64
    scheduler_config = ARCHITECTURES[arch][1]
    unet = build_denoiser(arch).train()
    ema = build_denoiser(arch).eval().requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    class_conditional = arch in DITS
    scheduler = DDPMScheduler(**scheduler_config)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 100))  # warmup
    t0 = time.time()
    bar = tqdm(range(steps), desc=f"train {arch} denoiser")
    for step in bar:
        idx = torch.randint(0, len(x_train), (batch_size,), generator=g)
        x0 = random_shift(x_train[idx], 1, g)                                  # [B, 1, 16, 16]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=g)
        xt = scheduler.add_noise(x0, noise, t)
        labels = {"class_labels": y_train[idx]} if class_conditional else {}  # [B] int64
        loss = F.mse_loss(unet(xt, t, **labels).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - d)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % save_every == 0 or step + 1 == steps:
            save_unet(ema, scheduler, Path(out))
    return time.time() - t0


def train_classifier(epochs: int = 30, seed: int = 0, out: Path = ASSETS, batch_size: int = 64,
                     threads: int = 1) -> float:
    """The metrics classifier (train split only, with shift augmentation). Returns test accuracy."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = digits_split("train")
    model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in tqdm(range(epochs), desc="train digits classifier"):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(random_shift(x[idx], 1, g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    xt, yt = digits_split("test")
    with torch.no_grad():
        acc = float((model(xt).argmax(-1) == yt).float().mean())
    Path(out).mkdir(parents=True, exist_ok=True)
    _save_safetensors(model.state_dict(), Path(out) / CLASSIFIER_FILE)
    return acc
