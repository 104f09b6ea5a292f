"""The sampling loop: any supported diffusers scheduler driving any Runner (docs/design.md section 5).

The loop belongs to the scheduler; the runner (and MoDiff inside it) only sees successive UNet calls
`runner(sample, timestep, cond)` (cond: the named conditioning inputs, models/conditioning.py), reset at
the start of every batch. Nothing here
tells the quantizer which scheduler runs.
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from .backends.base import MAX_BATCH
from .errors import ModiffExportError
from .fsutil import atomic_write_bytes
from .models.conditioning import Conditioning
from .models.denoiser import pack, unpack

SCHEDULERS = {
    "ddim": DDIMScheduler,                    # eta = 0 (deterministic)
    "ddpm": DDPMScheduler,                    # ancestral, stochastic
    "pndm": PNDMScheduler,                    # PLMS (skip_prk_steps=True)
    "dpmpp": DPMSolverMultistepScheduler,     # DPM-Solver++ multistep, 2nd order
    "euler": EulerDiscreteScheduler,          # Karras-style sigmas, uses scale_model_input
    "euler_a": EulerAncestralDiscreteScheduler,
    "unipc": UniPCMultistepScheduler,
    # flow matching (SD3, FLUX): sigmas from 1 to 0, the model predicts the velocity noise - x0
    "flow_euler": FlowMatchEulerDiscreteScheduler,
    "flow_heun": FlowMatchHeunDiscreteScheduler,  # 2nd order: two model calls per step (the second at t_next)
}
FLOW = ("flow_euler", "flow_heun")
AUTO = "auto"  # the model's own: its flow-matching scheduler for flow models, else ddim
SCHEDULER_CHOICES = (AUTO, *sorted(SCHEDULERS))
# what makes each class the named sampler, on top of the model's own scheduler config
_OVERRIDES = {"pndm": {"skip_prk_steps": True}, "dpmpp": {"algorithm_type": "dpmsolver++", "solver_order": 2}}


class SamplingError(ModiffExportError, ValueError):
    pass


MAX_SEED = 2**63 - 1 - 2**21  # headroom for seed + batch index + ENCODER_SEED_OFFSET in a torch Generator
MAX_SAMPLES = 100_000
ENCODER_SEED_OFFSET = 1_000_003  # encoder states of batch i never share a random stream with its noise


@dataclass(frozen=True, eq=False)
class Trajectories:
    """Which trajectories to run: what sampling, calibration, evaluation and serving hand each other.

    Batch i (images i*batch_size ...) starts from the noise of seed + i, so two configs sampled with the
    same Trajectories start from identical noise. `prompts` (conditional UNets): (cond [P, S, D], uncond
    [S, D]) states from a text encoder (models/prompts.py), cycled over the images; None: random states.
    `labels` (class-conditional models): class labels cycled over the images (0..num_classes; num_classes
    is the null class); None: image i of the whole run gets label (seed + i) % num_classes.
    """

    scheduler: str = "ddim"
    steps: int = 25
    samples: int = 16
    batch_size: int = 16
    seed: int = 0
    guidance_scale: float = 1.0
    prompts: tuple[torch.Tensor, torch.Tensor] | None = None
    labels: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.scheduler not in SCHEDULER_CHOICES:
            raise SamplingError(f"unknown scheduler {self.scheduler!r}; expected one of {list(SCHEDULER_CHOICES)}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise SamplingError(f"{self.steps!r} sampling steps: expected an integer >= 1")
        for name, v, lo, hi in (("num_samples", self.samples, 1, MAX_SAMPLES),
                                ("batch_size", self.batch_size, 1, MAX_BATCH), ("seed", self.seed, 0, MAX_SEED)):
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise SamplingError(f"{name}={v!r} is outside {lo}..{hi}")
        g = self.guidance_scale
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g):
            raise SamplingError(f"guidance scale {g!r} is not a finite number")
        if self.labels is not None and (not self.labels or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in self.labels)):
            raise SamplingError(f"class labels {self.labels!r}: expected one or more integers")

    def replace(self, **changes) -> "Trajectories":
        return dataclasses.replace(self, **changes)

    def batches(self) -> list[tuple[int, int]]:
        """(first image, images) of every batch."""
        return [(start, min(self.batch_size, self.samples - start)) for start in range(0, self.samples,
                                                                                         self.batch_size)]


def objective(scheduler_config: dict) -> str:
    """What the model was trained to predict, from its scheduler config: "flow" (a FlowMatch* scheduler:
    velocity), else the DDPM-family prediction_type ("epsilon" by default, "v_prediction", "sample")."""
    if str(scheduler_config.get("_class_name", "")).startswith("FlowMatch"):
        return "flow"
    return str(scheduler_config.get("prediction_type", "epsilon"))


def resolve_scheduler(name: str, scheduler_config: dict) -> str:
    """`name`, with "auto" replaced by the model's own sampler (its flow-matching one for flow models, else
    ddim); a sampler that does not fit the model's training objective is refused in one line."""
    flow_model = objective(scheduler_config) == "flow"
    if name == AUTO:
        return "flow_heun" if scheduler_config.get("_class_name") == "FlowMatchHeunDiscreteScheduler" else \
            "flow_euler" if flow_model else "ddim"
    if name not in SCHEDULERS:
        raise SamplingError(f"unknown scheduler {name!r}; expected one of {list(SCHEDULER_CHOICES)}")
    if (name in FLOW) != flow_model:
        fits = list(FLOW) if flow_model else sorted(set(SCHEDULERS) - set(FLOW))
        raise SamplingError(f"scheduler {name!r} does not fit this model: it was trained for "
                            f"{'flow matching' if flow_model else objective(scheduler_config) + ' prediction'} "
                            f"(scheduler config {scheduler_config.get('_class_name', 'unnamed')}); use one of {fits}")
    return name


def flow_shift_mu(scheduler_config: dict, sample_shape) -> float | None:
    """FLUX's resolution-dependent shift: with use_dynamic_shifting, the mu that FluxPipeline passes to
    set_timesteps, linear in the image sequence length between (base_image_seq_len, base_shift) and
    (max_image_seq_len, max_shift). The sequence length is FLUX's packed one, (H/2) x (W/2) tokens of the
    latent [.., H, W]; None without dynamic shifting."""
    if not scheduler_config.get("use_dynamic_shifting"):
        return None
    h, w = int(sample_shape[-2]), int(sample_shape[-1])
    seq = (h // 2) * (w // 2)
    lo, hi = scheduler_config.get("base_image_seq_len", 256), scheduler_config.get("max_image_seq_len", 4096)
    b, m = scheduler_config.get("base_shift", 0.5), scheduler_config.get("max_shift", 1.15)
    slope = (m - b) / (hi - lo)
    return seq * slope + (b - slope * lo)


def set_timesteps(scheduler, num_steps: int, sample_shape) -> None:
    """scheduler.set_timesteps, with FLUX's shift (flow_shift_mu) where the scheduler config asks for it."""
    mu = flow_shift_mu(scheduler.config, sample_shape)
    scheduler.set_timesteps(num_steps, **({} if mu is None else {"mu": mu}))


def model_input(scheduler, x: torch.Tensor, t) -> torch.Tensor:
    """What the model reads at timestep t: scale_model_input where the scheduler has one (flow matching: x)."""
    scale = getattr(scheduler, "scale_model_input", None)
    return x if scale is None else scale(x, t)


def make_scheduler(name: str, scheduler_config: dict):
    """A fresh scheduler of kind `name` ("auto": the model's own, resolve_scheduler) built from a model's scheduler
    config (betas, T, prediction; for flow models the shift)."""
    name = resolve_scheduler(name, scheduler_config)
    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    try:
        return SCHEDULERS[name].from_config({**config, **_OVERRIDES.get(name, {})})
    except Exception as e:  # diffusers: NotImplementedError for an unknown beta_schedule, ValueError, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SamplingError(f"scheduler {name!r} rejects the model's scheduler config ({first})") from None


@torch.no_grad()
def denoise(runner, scheduler, noise: torch.Tensor, num_steps: int, cond=None, guidance_scale: float = 1.0,
            generator=None, progress: bool = False, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The denoising loop, the one every sampler of this package runs: noise [B, C, H, W] -> images
    [B, C, H, W] clamped to [-1, 1], starting from reset caches.

    cond: the named conditioning {name: [B, ...]} (models/conditioning.py; one tensor: the model's only
    required input), or [2B, ...] with guidance_scale != 1 (cond first, uncond second): both halves go
    through the runner in one call; attention_mask [B or 2B, S]: shorthand for a PixArt mask. A runner over
    packed latents (FLUX, runner.packed) gets each input packed and its output unpacked (models/denoiser.py).
    `generator` (a torch.Generator or one per sample) drives stochastic schedulers.
    serving/triton_models/sampler.py holds a marked copy for Triton's Python backend (tests/test_sampling.py
    keeps them equal).
    """
    cfg = guidance_scale != 1.0 and cond is not None and (torch.is_tensor(cond) or bool(cond))
    args = (cond,) if attention_mask is None else (cond, attention_mask)
    packed = bool(getattr(runner, "packed", False))
    step_kwargs = {}
    params = inspect.signature(scheduler.step).parameters
    if "generator" in params and generator is not None:
        step_kwargs["generator"] = generator
    if "eta" in params:
        step_kwargs["eta"] = 0.0
    set_timesteps(scheduler, num_steps, noise.shape)
    x = noise.float() * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching starts at sigma 1
    runner.reset()
    from tqdm import tqdm

    for t in tqdm(scheduler.timesteps, desc=f"sample {type(scheduler).__name__}", disable=not progress, leave=False):
        inp = model_input(scheduler, x, t)             # [B, C, H, W]
        if cfg:
            inp = torch.cat([inp, inp])                # [2B, C, H, W]
        out = runner(pack(inp) if packed else inp, t, *args)
        out = unpack(out, inp.shape[-2:]) if packed else out
        if cfg:
            eps_c, eps_u = out.chunk(2)                # [2B] -> 2 x [B]
            out = eps_u + guidance_scale * (eps_c - eps_u)
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x.clamp(-1, 1)


def _named(runner, x, what: str) -> dict | torch.Tensor | None:
    """A mapping as a dict; a tensor stays the runner's shorthand (its only required input)."""
    if x is None or torch.is_tensor(x):
        return x
    if not isinstance(x, Mapping):
        raise SamplingError(f"{what} must be a tensor or a mapping of conditioning input names to tensors, "
                            f"got {type(x).__name__}")
    return dict(x)


@torch.no_grad()
def generate(runner, scheduler, num_steps: int, batch_size: int, seed: int, sample_shape: tuple[int, int, int],
             cond=None, uncond=None, guidance_scale: float = 1.0, progress: bool = True,
             noise: torch.Tensor | None = None,
             attention_masks: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
    """One batch from the noise of `seed`: images [B, C, H, W] clamped to [-1, 1] (denoise).

    cond: the named conditioning {name: [B, ...]} (or one tensor: the model's only required input); with
    guidance_scale != 1 also `uncond`, where an input left out of it takes its kind's rule (zeros for content,
    the null class for labels, the cond value for masks and time_ids: Conditioning.with_uncond); a tensor
    `cond` needs a tensor `uncond`. attention_masks (PixArt): the caption padding masks (cond [B, S],
    uncond [B, S] with guidance). A model with an embedded guidance input (FLUX.1-dev) gets guidance_scale
    there and runs one pass, as FluxPipeline does. The seed's generator also drives stochastic schedulers.
    """
    if num_steps < 1 or batch_size < 1:
        raise SamplingError(f"num_steps and batch_size must be >= 1, got {num_steps} and {batch_size}")
    shape = (batch_size, *sample_shape)
    gen = torch.Generator().manual_seed(int(seed))
    if noise is None:
        noise = torch.randn(shape, generator=gen)  # [B, C, H, W]
    elif tuple(noise.shape) != shape:
        raise SamplingError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
    cond, uncond = _named(runner, cond, "cond"), _named(runner, uncond, "uncond")
    conditioning = getattr(runner, "conditioning", None) or Conditioning()
    embedded = conditioning.of_kind("guidance")
    if embedded is not None:  # FLUX.1-dev: the scale is an input, no second pass
        cond = dict(cond or {})
        cond.setdefault(embedded.name, torch.full((batch_size,), float(guidance_scale)))
        guidance_scale = 1.0
    given = [cond] if torch.is_tensor(cond) else list((cond or {}).values())
    for x in given:
        if not torch.is_tensor(x) or x.shape[:1] != (batch_size,):
            raise SamplingError(f"every conditioning input must be a [B={batch_size}, ...] tensor, got "
                                f"{list(getattr(x, 'shape', [])) or type(x).__name__}")
    mask = None
    if attention_masks is not None:
        cond_mask, uncond_mask = attention_masks
        if not given or tuple(cond_mask.shape[:1]) != (batch_size,) or (
                guidance_scale != 1.0 and (uncond_mask is None or uncond_mask.shape != cond_mask.shape)):
            got = [getattr(m, "shape", None) for m in attention_masks]
            raise SamplingError(f"attention masks must be [B={batch_size}, S] beside encoder states (and one for the "
                                f"uncond states with guidance), got {got}")
        mask = torch.cat([cond_mask, uncond_mask]) if guidance_scale != 1.0 else cond_mask  # [2B or B, S]
    if guidance_scale != 1.0 and given:
        if torch.is_tensor(cond):
            if not torch.is_tensor(uncond) or uncond.shape != cond.shape:
                raise SamplingError(f"guidance_scale={guidance_scale} needs uncond conditioning of shape "
                                    f"{tuple(cond.shape)}")
            cond = torch.cat([cond, uncond])  # [2B, ...]
        else:
            cond = conditioning.with_uncond(cond, uncond if isinstance(uncond, dict) else None)  # [2B, ...] each
    return denoise(runner, scheduler, noise, num_steps, cond, guidance_scale, gen, progress, mask)


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, min_cell: int = 64,
              overwrite: bool = True) -> Path:
    """Write images [B, C, H, W] in [-1, 1] as one PNG grid (temp file, then rename; without `overwrite`
    a file that appeared at `path` meanwhile is left untouched and this is an error).

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
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue(), overwrite)
    return Path(path)


def run_batches(runner, model, traj: Trajectories, progress: bool = True, desc: str = "sample") -> torch.Tensor:
    """traj.samples images [N, C, H, W] from `runner`, batch i from noise traj.seed + i (the one batch loop of
    sampling, evaluation and calibration), with batch_conditioning's inputs."""
    check_sampling_budget(model, traj)
    check_scheduler(traj.scheduler, model, traj.steps)
    from tqdm import tqdm

    out, batches = [], traj.batches()
    for i, (start, b) in enumerate(tqdm(batches, desc=desc, unit="batch", disable=not progress or len(batches) == 1)):
        cond, unc = batch_conditioning(model, traj, i, start, b)
        scheduler = make_scheduler(traj.scheduler, model.scheduler_config)
        out.append(generate(runner, scheduler, traj.steps, b, traj.seed + i, model.sample_shape, cond, unc,
                            traj.guidance_scale, progress and len(batches) == 1))
    return torch.cat(out)  # [N, C, H, W]


def batch_conditioning(model, traj: Trajectories, batch_index: int, start: int, b: int) -> tuple[dict, dict]:
    """(cond, uncond) {name: [b, ...]} of batch `batch_index` (images start..start+b), by the model's
    conditioning (models/conditioning.py):
      class labels (DiT), or a label encoder (digits_flux): traj.labels cycled, or (seed + image) % classes,
        the null class as uncond;
      encoder_hidden_states: traj.prompts' states cycled over the images (the empty prompt as uncond);
      every other content input, and the states without prompts: random from seed + batch_index +
        ENCODER_SEED_OFFSET in input order, zeros as uncond (no text encoder);
      masks, time_ids and guidance: left to their defaults (the runner's, and generate's for guidance)."""
    conditioning = model.conditioning
    encoder = getattr(model, "label_encoder", None)
    if conditioning.labels is not None or encoder is not None:
        labels, null = class_labels(model, traj, start, b)
        if encoder is not None:  # [b] -> {encoder_hidden_states [b, S, D], pooled_projections [b, P]}
            return encoder.conditioning(labels), encoder.conditioning(null)
        name = conditioning.labels.name
        return {name: labels}, {name: null}
    cond, unc = {}, {}
    g = torch.Generator().manual_seed(int(traj.seed) + batch_index + ENCODER_SEED_OFFSET)
    for c in conditioning:
        if c.kind != "embedding":
            continue
        if c.name == "encoder_hidden_states" and traj.prompts is not None:
            states, neg = traj.prompts
            rows = torch.arange(start, start + b) % states.shape[0]
            cond[c.name], unc[c.name] = states[rows], neg.expand(b, *neg.shape).clone()
        else:
            cond[c.name] = torch.randn((b, *c.shape), generator=g)  # e.g. [B, S, D]
            unc[c.name] = torch.zeros_like(cond[c.name])
    return cond, unc


def class_labels(model, traj: Trajectories, start: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels [b] int64, null class [b] int64) of images start..start+b of a class-conditional model:
    traj.labels cycled over the images, or (seed + image) % num_classes."""
    n = label_classes(model)
    idx = torch.arange(start, start + b)
    if traj.labels is not None:
        labels = torch.tensor(traj.labels, dtype=torch.int64)[idx % len(traj.labels)]
    else:
        labels = (idx + int(traj.seed) % n) % n
    return with_null_class(labels, n)


def label_classes(model) -> int | None:
    """The number of classes a model's labels take: its class_labels input's, or its label encoder's."""
    encoder = getattr(model, "label_encoder", None)
    return encoder.num_classes if encoder is not None else getattr(model, "num_classes", None)


def with_null_class(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels [b] int64, the null class [b] int64): the cond and uncond halves of classifier-free guidance
    for a class-conditional model (label num_classes is the null class; sampling and serving both use this)."""
    return labels, torch.full_like(labels, num_classes)


def check_scheduler(name: str, model, num_steps: int) -> None:
    """Refuse, before any work, a scheduler that cannot run `num_steps` steps with the model's scheduler
    config: more steps than training timesteps, or config values diffusers rejects (an unknown
    beta_schedule or prediction_type, ...), found by one step of a throwaway scheduler on zeros."""
    T = model.scheduler_config.get("num_train_timesteps", 1000)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= T:
        raise SamplingError(f"{num_steps} sampling steps: expected 1..{T} (num_train_timesteps of {model.name}'s "
                            f"scheduler config)")
    try:
        scheduler = make_scheduler(name, model.scheduler_config)
        x = torch.zeros((1, *model.sample_shape))  # [1, C, H, W]
        set_timesteps(scheduler, num_steps, x.shape)
        t = scheduler.timesteps[0]
        own_rng = {"generator": torch.Generator().manual_seed(0)}  # stochastic samplers: leave the global RNG be
        kwargs = own_rng if "generator" in inspect.signature(scheduler.step).parameters else {}
        scheduler.step(torch.zeros_like(x), t, model_input(scheduler, x, t), **kwargs)
    except SamplingError:
        raise
    except Exception as e:  # diffusers raises ValueError, NotImplementedError, ... for bad configs
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SamplingError(f"scheduler {name!r} cannot run {num_steps} steps with {model.name}'s scheduler config "
                            f"({first})") from None


def check_sampling_budget(model, traj: Trajectories) -> None:
    """Refuse, before any work, trajectories the model cannot run or that cannot finish: guidance on an
    unconditional model, prompts of the wrong shape, or images that would not fit in memory (the result
    [N, C, H, W] float32 must fit in half the free RAM). Counts and ranges: Trajectories itself."""
    import psutil

    n_cls = label_classes(model)
    conditioning = getattr(model, "conditioning", None) or Conditioning()
    if traj.guidance_scale != 1.0 and not conditioning:
        raise SamplingError(f"guidance scale {traj.guidance_scale} needs a conditional model; {model.name} is "
                            f"unconditional (use 1.0)")
    if traj.labels is not None:
        if n_cls is None:
            raise SamplingError(f"class labels given, but {model.name} is not class-conditional")
        bad = [v for v in traj.labels if not 0 <= v <= n_cls]
        if bad:
            raise SamplingError(f"class label {bad[0]} is outside 0..{n_cls} ({model.name} has {n_cls} classes; "
                                f"{n_cls}: the null class)")
    if traj.prompts is not None:
        want = (model.encoder_seq_len, model.cross_attention_dim)
        if not model.conditional or tuple(traj.prompts[0].shape[1:]) != want or n_cls is not None:
            raise SamplingError(f"prompt states {list(traj.prompts[0].shape[1:])} do not fit {model.name} "
                                f"(encoder states {list(want) if model.conditional else 'none: unconditional'})")
    need = traj.samples * math.prod(model.sample_shape) * 4 * 3  # result + one batch of latents and noise, generous
    free = psutil.virtual_memory().available
    if need > free // 2:
        raise SamplingError(f"{traj.samples} samples of {list(model.sample_shape)} need ~{need / 2**30:.1f} GiB, more "
                            f"than half the free memory ({free / 2**30:.1f} GiB); ask for fewer samples")


def sample_model(model, config, traj: Trajectories, backend: str = "torch", progress: bool = True,
                 runner=None) -> torch.Tensor:
    """traj.samples images [N, C, H, W] from a LoadedModel under a QuantConfig (see run_batches).

    The UNet is copied before quantize(), so `model` stays full precision (pass `runner` to sample
    with an exported-graph runner instead; `model` then only supplies shapes and the scheduler).
    """
    import copy

    from .backends import make_runner
    from .quant.quantization import quantize

    if runner is None:  # torch: quantize a copy; other runners come ready from their folder
        check_sampling_budget(model, traj)
        runner = make_runner(backend, quantize(copy.deepcopy(model.unet), config))
    return run_batches(runner, model, traj, progress, desc=f"sample {config.tag}")
