"""Per-request sampling for a server: a batch of requests, each with its own seed, gives exactly the
images each request gives alone.

Why this is exact: MoDiff with per-sample scales is batch-invariant (no statistic crosses samples),
and each request draws its initial noise (and, for ancestral schedulers, its per-step noise) from its
own `torch.Generator().manual_seed(seed)`, in the same order as `sampling.generate` does for a batch
of 1. Requests with different `steps`/scheduler/guidance cannot share a trajectory: `group_requests`
splits a batch into groups that can, and every group starts from `runner.reset()` (fresh caches).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..errors import ModiffExportError
from ..models.conditioning import Conditioning
from ..models.denoiser import ENCODER_STATES
from ..models.info import legacy_conditioning
from ..sampling import ENCODER_SEED_OFFSET, SCHEDULER_CHOICES, SamplingError, denoise, make_scheduler

# ONNX Runtime's CPU GEMM (MLAS) takes another code path for M = 1 rows than for M >= 2: measured on
# the digits prime graph, a batch of 1 differs from the same sample inside any batch of 2..16 by up to
# 3e-6 (at any position: 0.0 difference between all M >= 2), and MoDiff's rounding turns such ulps into
# flipped codes (0.08 max abs image difference after 10 steps). Running single requests as a batch of 2
# (the request plus a dropped copy) keeps every call on one code path, so batched == alone exactly.
MIN_BATCH = 2  # sampling.sample_model: batch 0 of seed s draws its encoder states from s + this


class RequestError(ModiffExportError, ValueError):
    """A request the server cannot serve (value out of range, unknown scheduler, bad shape)."""


@dataclass(frozen=True)
class Item:
    """One image to generate."""
    seed: int
    steps: int
    scheduler: str = "auto"  # sampling.resolve_scheduler: ddim, or a flow model's own sampler
    guidance_scale: float = 1.0
    encoder_hidden_states: torch.Tensor | None = None  # [S, D], conditional UNets only
    negative: torch.Tensor | None = None  # [S, D] uncond states for guidance (default zeros, as sample_model)
    class_label: int | None = None  # class-conditional models (DiT) only: 0..num_classes-1 (the null class
    # num_classes is the guidance uncond, added by generate_group, never sent)
    conditioning: dict | None = None  # the model's other named inputs, per sample (models/conditioning.py):
    # e.g. SDXL's text_embeds [P] / time_ids [6], SD3's and FLUX's pooled_projections [P]; default: random content
    # from the seed (as sampling.batch_conditioning), zeros as guidance's uncond; time_ids: the image size

    @property
    def group_key(self) -> tuple:
        return (self.steps, self.scheduler, self.guidance_scale)


def group_requests(items: list[Item]) -> dict[tuple, list[int]]:
    """Indices of `items` by trajectory: same steps, scheduler and guidance scale (insertion order)."""
    groups: dict[tuple, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.group_key, []).append(i)
    return groups


def check_item(it: Item, max_steps: int, conditional: bool, ehs_shape: tuple[int, int] | None,
               num_classes: int | None = None, conditioning: Conditioning | None = None) -> None:
    """Refuse an item the model cannot run; `num_classes`: a class-conditional model (every item needs a
    class_label in 0..num_classes-1); `conditioning`: the model's named inputs, which it.conditioning's
    values must be (one line for one that is not, or is misshapen)."""
    for name, x in (it.conditioning or {}).items():
        spec = conditioning.get(name) if conditioning is not None else None
        if spec is None or spec.kind not in ("embedding", "time_ids", "mask") or name == ENCODER_STATES:
            takes = [c.name for c in conditioning or () if c.kind in ("embedding", "time_ids", "mask")
                     and c.name != ENCODER_STATES]
            raise RequestError(f"input {name!r} is not one this model takes (per-request conditioning inputs: "
                               f"{', '.join(takes) or 'none'})")
        if not torch.is_tensor(x) or tuple(x.shape) != tuple(spec.shape):
            raise RequestError(f"{name} must be {list(spec.shape)}, got {list(getattr(x, 'shape', []))}")
        if not torch.isfinite(x).all():
            raise RequestError(f"{name} contains NaN or Inf")
    if not 1 <= it.steps <= max_steps:
        raise RequestError(f"steps={it.steps} out of range [1, {max_steps}]")
    if it.scheduler not in SCHEDULER_CHOICES:
        raise RequestError(f"unknown scheduler {it.scheduler!r}; expected one of {list(SCHEDULER_CHOICES)}")
    if not (abs(it.guidance_scale) < 1e4):  # also rejects NaN
        raise RequestError(f"guidance_scale={it.guidance_scale} is not a finite number below 1e4")
    guided = conditional or num_classes is not None or (conditioning is not None and (
        conditioning.guided or conditioning.of_kind("guidance") is not None))
    if it.guidance_scale != 1.0 and not guided:
        raise RequestError(f"guidance_scale={it.guidance_scale} needs a conditional UNet; this one is unconditional")
    if num_classes is None and it.class_label is not None:
        raise RequestError(f"class_label={it.class_label} given to a model that is not class-conditional")
    if num_classes is not None:
        if it.class_label is None:
            raise RequestError(f"input 'class_label' is missing: this model is class-conditional (labels "
                               f"0..{num_classes - 1})")
        if not 0 <= it.class_label < num_classes:
            raise RequestError(f"class_label={it.class_label} is outside 0..{num_classes - 1} (the model has "
                               f"{num_classes} classes)")
    if it.encoder_hidden_states is not None:
        if not conditional:
            raise RequestError("encoder_hidden_states given to an unconditional UNet")
        if tuple(it.encoder_hidden_states.shape) != tuple(ehs_shape):
            raise RequestError(f"encoder_hidden_states must be {list(ehs_shape)}, got "
                               f"{list(it.encoder_hidden_states.shape)}")
        if not torch.isfinite(it.encoder_hidden_states).all():
            raise RequestError("encoder_hidden_states contains NaN or Inf")


def default_encoder_states(seed: int, ehs_shape: tuple[int, int]) -> torch.Tensor:
    """[S, D] random encoder states, the ones `sample_model` uses for a batch of 1 with this seed."""
    g = torch.Generator().manual_seed(int(seed) + ENCODER_SEED_OFFSET)
    return torch.randn((1, *ehs_shape), generator=g)[0]


def item_conditioning(it: Item, conditioning: Conditioning, image_hw) -> tuple[dict, dict]:
    """(cond, uncond) {name: [1, ...]} of one item by the model's named inputs: given values, or what
    sampling.batch_conditioning gives a batch of 1 with this seed (content inputs random from seed +
    ENCODER_SEED_OFFSET in input order, zeros as uncond; labels and their null class; masks and time_ids their
    defaults; an embedded guidance input the item's guidance scale)."""
    g = torch.Generator().manual_seed(int(it.seed) + ENCODER_SEED_OFFSET)
    given = dict(it.conditioning or {})
    if it.encoder_hidden_states is not None:
        given[ENCODER_STATES] = it.encoder_hidden_states
    cond, unc = {}, {}
    for c in conditioning:
        if c.kind == "labels":
            cond[c.name] = torch.tensor([it.class_label], dtype=torch.int64)
            unc[c.name] = torch.full_like(cond[c.name], c.num_classes)
        elif c.kind == "embedding":
            x = given.get(c.name)
            cond[c.name] = (x.float() if x is not None else torch.randn((1, *c.shape), generator=g)[0])[None]
            neg = it.negative if c.name == ENCODER_STATES else None
            unc[c.name] = torch.zeros_like(cond[c.name]) if neg is None else neg.float()[None]
        elif c.kind == "guidance":
            cond[c.name] = unc[c.name] = torch.tensor([float(it.guidance_scale)])
        else:  # mask, time_ids
            x = given.get(c.name)
            cond[c.name] = unc[c.name] = x.float()[None] if x is not None else c.default(1, image_hw, (
                cond[ENCODER_STATES].shape[1] if ENCODER_STATES in cond else None))
    return cond, unc


@torch.no_grad()
def generate_group(runner, scheduler_config: dict, items: list[Item], sample_shape: tuple[int, int, int],
                   ehs_shape: tuple[int, int] | None = None, min_batch: int = MIN_BATCH,
                   num_classes: int | None = None, conditioning: Conditioning | None = None) -> torch.Tensor:
    """One trajectory for items that share steps/scheduler/guidance -> images [B, C, H, W] in [-1, 1].

    sampling.denoise with one generator per item (diffusers' randn_tensor draws sample i from generator
    i, shape [1, ...]), so each item's image is the one it gets alone. A group smaller than `min_batch`
    is padded with copies of its first item (own generators, results dropped). `conditioning`: the model's
    named inputs (default: the runner's; ehs_shape / num_classes describe a runner that knows none)."""
    n = len(items)
    items = list(items) + [items[0]] * max(0, min_batch - n)
    it0 = items[0]
    if not all(it.group_key == it0.group_key for it in items):
        raise RequestError("items of one trajectory must share steps/scheduler/guidance")
    try:
        scheduler = make_scheduler(it0.scheduler, scheduler_config)
    except SamplingError as e:  # a sampler that does not fit the model: the request's fault
        raise RequestError(str(e)) from None
    gens = [torch.Generator().manual_seed(int(it.seed)) for it in items]
    noise = torch.cat([torch.randn((1, *sample_shape), generator=g) for g in gens])  # [B, C, H, W]
    conditioning = conditioning or getattr(runner, "conditioning", None) or legacy_conditioning(
        ehs_shape[1] if ehs_shape else None, ehs_shape[0] if ehs_shape else None, num_classes)
    if ehs_shape is not None and conditioning.get(ENCODER_STATES) is not None:  # a PyTorch runner takes any S
        conditioning = Conditioning(tuple(dataclasses.replace(c, shape=tuple(ehs_shape)) if c.name == ENCODER_STATES
                                          else c for c in conditioning), conditioning.derived)
    pairs = [item_conditioning(it, conditioning, tuple(sample_shape[-2:])) for it in items]
    cond = {k: torch.cat([c[k] for c, _ in pairs]) for k in conditioning.names}  # [B, ...] each
    guidance = it0.guidance_scale if conditioning.of_kind("guidance") is None else 1.0  # embedded: one pass
    if guidance != 1.0 and cond:
        cond = {k: torch.cat([v, torch.cat([u[k] for _, u in pairs])]) for k, v in cond.items()}  # [2B]: cond, uncond
    x = denoise(runner, scheduler, noise, it0.steps, cond or None, guidance, gens if len(gens) > 1 else gens[0])
    runner.reset()  # nothing carries over to another group or batch
    return x[:n]


def generate_items(runner, scheduler_config: dict, items: list[Item], sample_shape, ehs_shape=None,
                   max_group: int | None = None, num_classes: int | None = None,
                   conditioning: Conditioning | None = None) -> torch.Tensor:
    """Images [N, C, H, W] for items in any mix, one trajectory per group (chunks of max_group)."""
    out: list[torch.Tensor | None] = [None] * len(items)
    for idx in group_requests(items).values():
        step = max_group or len(idx)
        for s in range(0, len(idx), step):
            chunk = idx[s:s + step]
            imgs = generate_group(runner, scheduler_config, [items[i] for i in chunk], sample_shape, ehs_shape,
                                  num_classes=num_classes, conditioning=conditioning)
            for j, i in enumerate(chunk):
                out[i] = imgs[j]
    return torch.stack(out)
