"""The sampling loop: any supported diffusers scheduler driving any Runner (design.md section 1).

The loop belongs to the scheduler; the runner (and MoDiff inside it) only sees successive UNet calls
`runner(sample, timestep, encoder_hidden_states)`, reset at the start of every batch. Nothing here
tells the quantizer which scheduler runs.
"""
from __future__ import annotations

import inspect
import math
import os
from pathlib import Path

import numpy as np
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler)

from .errors import ModiffExportError

SCHEDULERS = {
    "ddim": DDIMScheduler,                    # eta = 0 (deterministic)
    "ddpm": DDPMScheduler,                    # ancestral, stochastic
    "pndm": PNDMScheduler,                    # PLMS (skip_prk_steps=True)
    "dpmpp": DPMSolverMultistepScheduler,     # DPM-Solver++ multistep, 2nd order
    "euler": EulerDiscreteScheduler,          # Karras-style sigmas, uses scale_model_input
    "euler_a": EulerAncestralDiscreteScheduler,
    "unipc": UniPCMultistepScheduler,
}
# what makes each class the named sampler, on top of the model's own scheduler config
_OVERRIDES = {"pndm": {"skip_prk_steps": True}, "dpmpp": {"algorithm_type": "dpmsolver++", "solver_order": 2}}


class SamplingError(ModiffExportError, ValueError):
    pass


def make_scheduler(name: str, scheduler_config: dict):
    """A fresh scheduler of kind `name` built from a model's scheduler config (betas, T, prediction)."""
    if name not in SCHEDULERS:
        raise SamplingError(f"unknown scheduler {name!r}; expected one of {sorted(SCHEDULERS)}")
    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    return SCHEDULERS[name].from_config({**config, **_OVERRIDES.get(name, {})})


@torch.no_grad()
def generate(runner, scheduler, num_steps: int, batch_size: int, seed: int, sample_shape: tuple[int, int, int],
             encoder_hidden_states: torch.Tensor | None = None, uncond_hidden_states: torch.Tensor | None = None,
             guidance_scale: float = 1.0, progress: bool = True, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Run one batch through the scheduler's trajectory; returns images [B, C, H, W] clamped to [-1, 1].

    Conditional UNets: encoder_hidden_states [B, S, D]. With guidance_scale != 1 the batch is doubled
    (cond first, uncond second: [2B, ...]) and both halves go through the runner in one call.
    """
    if num_steps < 1 or batch_size < 1:
        raise SamplingError(f"num_steps and batch_size must be >= 1, got {num_steps} and {batch_size}")
    shape = (batch_size, *sample_shape)
    gen = torch.Generator().manual_seed(int(seed))
    if noise is None:
        noise = torch.randn(shape, generator=gen)  # [B, C, H, W]
    elif tuple(noise.shape) != shape:
        raise SamplingError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
    cfg = guidance_scale != 1.0 and encoder_hidden_states is not None
    ehs = encoder_hidden_states
    if ehs is not None and ehs.shape[0] != batch_size:
        raise SamplingError(f"encoder_hidden_states must be [B={batch_size}, S, D], got {tuple(ehs.shape)}")
    if cfg:
        if uncond_hidden_states is None or uncond_hidden_states.shape != ehs.shape:
            raise SamplingError(f"guidance_scale={guidance_scale} needs uncond_hidden_states of shape {tuple(ehs.shape)}")
        ehs = torch.cat([ehs, uncond_hidden_states])  # [2B, S, D]
    step_kwargs = {}
    params = inspect.signature(scheduler.step).parameters
    if "generator" in params:
        step_kwargs["generator"] = gen
    if "eta" in params:
        step_kwargs["eta"] = 0.0

    scheduler.set_timesteps(num_steps)
    x = noise.float() * scheduler.init_noise_sigma
    runner.reset()
    from tqdm import tqdm

    for t in tqdm(scheduler.timesteps, desc=f"sample {type(scheduler).__name__}", disable=not progress, leave=False):
        inp = scheduler.scale_model_input(x, t)        # [B, C, H, W]
        if cfg:
            eps_c, eps_u = runner(torch.cat([inp, inp]), t, ehs).chunk(2)  # [2B, ...] -> 2 x [B, ...]
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        else:
            eps = runner(inp, t, ehs)
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return x.clamp(-1, 1)


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, min_cell: int = 64) -> Path:
    """Write images [B, C, H, W] in [-1, 1] as one PNG grid (temp file, then rename).

    Tiny images are upscaled (nearest) so each cell is at least `min_cell` pixels wide.
    More than 3 channels (latents): the first 3 are shown.
    """
    from PIL import Image

    if images.dim() != 4 or images.shape[0] == 0:
        raise SamplingError(f"save_grid needs images [B, C, H, W], got {tuple(images.shape)}")
    x = images.detach().float().cpu()[:, :3]
    if x.shape[1] == 2:
        x = x[:, :1]
    B, C, H, W = x.shape
    nrow = nrow or math.ceil(math.sqrt(B))
    k = max(1, math.ceil(min_cell / max(H, W)))
    x = x.repeat_interleave(k, 2).repeat_interleave(k, 3)  # [B, C, kH, kW]
    rows, pad = math.ceil(B / nrow), 2
    grid = torch.full((C, rows * (k * H + pad) + pad, nrow * (k * W + pad) + pad), -1.0)
    for i in range(B):
        r, c = divmod(i, nrow)
        y0, x0 = pad + r * (k * H + pad), pad + c * (k * W + pad)
        grid[:, y0:y0 + k * H, x0:x0 + k * W] = x[i]
    arr = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[:, :, 0] if C == 1 else np.ascontiguousarray(arr), mode="L" if C == 1 else "RGB")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def sample_model(model, config, scheduler_name: str = "ddim", num_steps: int = 25, num_samples: int = 16,
                 batch_size: int = 16, seed: int = 0, guidance_scale: float = 1.0, backend: str = "torch",
                 progress: bool = True, runner=None) -> torch.Tensor:
    """num_samples images [N, C, H, W] from a LoadedModel under a QuantConfig, in batches.

    The UNet is copied before quantize(), so `model` stays full precision (pass `runner` to sample
    with an ORT/TensorRT runner instead; `model` then only supplies shapes and the scheduler). Batch i uses seed + i, so
    two configs with the same seed start from identical noise (PSNR-to-FP compares like with like).
    Conditional models get random encoder states [B, 77, D] (no text encoder here), zeros as uncond.
    """
    import copy

    from .backends import make_runner
    from .models import conditioning
    from .quantization import quantize

    if guidance_scale != 1.0 and not model.conditional:
        raise SamplingError(f"guidance scale {guidance_scale} needs a conditional UNet; {model.name} is unconditional (use 1.0)")
    if runner is None:  # torch: quantize a copy; ort/trt runners come ready from their folder
        runner = make_runner(backend, quantize(copy.deepcopy(model.unet), config))
    out = []
    for i, start in enumerate(range(0, num_samples, batch_size)):
        b = min(batch_size, num_samples - start)
        ehs = unc = None
        if model.conditional:  # random states, or the --prompts states (models.conditioning)
            ehs, unc = conditioning(model, seed, i, start, b)  # [B, S, D] each
        scheduler = make_scheduler(scheduler_name, model.scheduler_config)
        out.append(generate(runner, scheduler, num_steps, b, int(seed) + i, model.sample_shape, ehs, unc,
                            guidance_scale, progress))
    return torch.cat(out)  # [N, C, H, W]
