"""A drop-in UNet for diffusers pipelines, backed by any MoDiff runner (torch, ort, openvino, trt).

    pipe = StableDiffusionPipeline(..., unet=ModiffUNet.from_folder("graphs/sd-w8a8"), ...)
    pipe.unet = ModiffUNet.from_folder("graphs/digits-w8a4")          # or replace it afterwards
    images = pipe(...).images

MoDiff's caches belong to one trajectory, so they are reset at the start of every pipeline call. A
pipeline never says when a call starts; the UNet sees it: within one call the timestep never increases
(PNDM and Heun repeat one, hence "increases", not "does not decrease") and the batch/shape never
changes, so a timestep above the previous one, or a new shape, starts a new trajectory. A caller that
runs two one-step trajectories with the same timestep back to back calls `unet.new_trajectory()`.

Diffusion transformers: the same class is the `transformer` of DiTPipeline (class_labels=...),
PixArtAlphaPipeline (encoder_hidden_states=..., encoder_attention_mask=..., added_cond_kwargs=...),
StableDiffusion3Pipeline (hidden_states=, encoder_hidden_states=, pooled_projections=) and FluxPipeline (packed
hidden_states, timestep = sigma, pooled_projections=, guidance=, img_ids=/txt_ids=, which must be the ones the
graphs were exported for: they depend only on the shapes); SDXL's UNet gets added_cond_kwargs={"text_embeds",
"time_ids"}. Every argument is read by the names of the folder's conditioning (models/conditioning.py):

    pipe = DiTPipeline(transformer=ModiffUNet.from_folder("graphs/dit-w8a8"), vae=vae, scheduler=scheduler)
    pipe = FluxPipeline(transformer=ModiffUNet.from_folder("graphs/flux-w8a4"), ..., text_encoder=None, ...)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from diffusers.configuration_utils import FrozenDict

from ..models.denoiser import CLASS_LABELS, ENCODER_MASK
from ..quant.quantization import starts_trajectory


@dataclass
class UNetOutput:
    """What diffusers' UNet2DOutput / UNet2DConditionOutput carry: `.sample`, and [0] for return_dict=False."""
    sample: torch.Tensor

    def __getitem__(self, i):
        return (self.sample,)[i]


DIT_PIPELINE_NULL_CLASS = 1000  # diffusers' DiTPipeline: class_null = torch.tensor([1000] * batch_size)

# config keys pipelines read from `unet.config` beyond the shapes (None: feature not used)
_PIPELINE_DEFAULTS = {"time_cond_proj_dim": None, "addition_embed_type": None, "class_embed_type": None,
                      "encoder_hid_dim": None, "encoder_hid_dim_type": None, "addition_time_embed_dim": None}


class ModiffUNet(torch.nn.Module):
    """nn.Module with a UNet's call signature and `config`, `dtype`, `device`; computes with a Runner."""

    def __init__(self, runner, config: dict):
        super().__init__()
        self.runner = runner
        self.config = FrozenDict({**_PIPELINE_DEFAULTS, **dict(config)})
        self._last: tuple | None = None   # (timestep, sample shape, ehs shape) of the previous call
        self.trajectories = 0             # how many times the caches were reset (tests, logs)

    # -- constructors --------------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder, backend: str = "ort", config: dict | None = None, **runner_kwargs) -> ModiffUNet:
        """A graph (ort, openvino) or engine (trt) folder; the UNet config comes from its manifest
        unless `config` (e.g. the original unet.config) is given."""
        from ..backends import make_runner

        runner = make_runner(backend, folder=folder, **runner_kwargs)
        m = runner.manifest.model
        size = m.sample_size
        c = 4 if m.packed else 1  # FLUX configs count the packed channels (FluxPipeline reads in_channels // 4)
        base = {"in_channels": m.in_channels * c, "out_channels": m.out_channels * c,
                "sample_size": size[0] if size[0] == size[1] else list(size),
                "cross_attention_dim": m.cross_attention_dim, "_class_name": m.class_name}
        if m.model_config and m.packed:
            base["out_channels"] = m.model_config.get("out_channels")
        return cls(runner, {**(m.model_config or {}), **base, **(config or {})})

    @classmethod
    def from_unet(cls, unet, quant_config) -> ModiffUNet:
        """The PyTorch reference: quantize a copy of a diffusers UNet (the original stays untouched)."""
        import copy

        from ..backends import make_runner
        from ..quant.quantization import quantize

        return cls(make_runner("torch", quantize(copy.deepcopy(unet), quant_config)), dict(unet.config))

    # -- what pipelines read -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # runners take and return CPU tensors (they move data to their device)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def add_embedding(self):
        """SDXL: StableDiffusionXLPipeline._get_add_time_ids reads add_embedding.linear_1.in_features."""
        dim = self.config.get("projection_class_embeddings_input_dim")
        if dim is None:
            raise AttributeError("add_embedding: this model has no SDXL text_time embedding")
        return SimpleNamespace(linear_1=SimpleNamespace(in_features=int(dim)))

    @contextlib.contextmanager
    def cache_context(self, name: str):
        """What FluxPipeline / StableDiffusion3Pipeline open around each call for diffusers' own cache hooks
        (CacheMixin); nothing to do here: the MoDiff caches live in the runner."""
        yield

    def new_trajectory(self) -> None:
        """Forget the caches: the next call primes them."""
        self.runner.reset()
        self._last = None
        self.trajectories += 1

    def _class_labels(self, class_labels) -> torch.Tensor:
        """class_labels [B] int64 for the runner. DiTPipeline writes its null class as the literal 1000
        (ImageNet's count) whatever the model has; a model with fewer classes has no label 1000, so 1000
        is that pipeline's null class and becomes the model's own (num_classes)."""
        labels = torch.as_tensor(class_labels).detach().cpu().long().reshape(-1)
        n = self.runner.num_classes
        if n is not None and n < DIT_PIPELINE_NULL_CLASS:
            labels = torch.where(labels == DIT_PIPELINE_NULL_CLASS, torch.full_like(labels, n), labels)
        return labels

    def forward(self, *args, class_labels: torch.Tensor | None = None, return_dict: bool = True, **kwargs):
        """A UNet2DModel/UNet2DConditionModel (SDXL: added_cond_kwargs), DiT (class_labels), PixArt, SD3 or FLUX
        call (see the module docstring): sample and timestep positional or by name (sample=, hidden_states=,
        timestep=), every conditioning input by its name (encoder_hidden_states may be the third positional).
        PixArt's encoder_attention_mask ([B, S] 1 keep / 0 padding, or diffusers' bias form [B, 1, S] of 0 /
        -10000) goes to the graphs' own mask input; a padded mask for graphs exported without one is the
        runner's error. Ignored: PixArt's resolution/aspect-ratio added_cond_kwargs (exported as None,
        models/denoiser.py), joint_attention_kwargs."""
        args = list(args)
        sample = args.pop(0) if args else kwargs.pop("sample", kwargs.pop("hidden_states", None))
        timestep = args.pop(0) if args else kwargs.pop("timestep")
        if args:
            kwargs["encoder_hidden_states"] = args.pop(0)
        added = dict(kwargs.pop("added_cond_kwargs", None) or {})
        conditioning = getattr(self.runner, "conditioning", None)
        packed = bool(getattr(self.runner, "packed", False))
        t = torch.as_tensor(timestep, dtype=torch.float32).flatten()
        if packed:  # FluxPipeline passes sigma = t / 1000; the graphs take scheduler units
            t = t * 1000.0
            self._check_ids(sample, kwargs)
        cond = {}
        specs = [(c.name, c.kind) for c in conditioning] if conditioning is not None else \
            [("encoder_hidden_states", "embedding")]  # a runner that does not know its model's inputs
        for name, kind in specs:
            v = kwargs.get(name, added.get(name))
            if kind == "mask":
                v = _keep_mask(v)
            if v is not None:
                cond[name] = torch.as_tensor(v).detach().cpu()
        if class_labels is not None:
            cond[CLASS_LABELS] = self._class_labels(class_labels)
        mask = None if conditioning is not None and conditioning.get(ENCODER_MASK) is not None else \
            _keep_mask(kwargs.get(ENCODER_MASK))  # graphs without a mask input: the runner checks it attends all
        ehs = cond.get("encoder_hidden_states")
        key = (float(t.max()), tuple(sample.shape), None if ehs is None else tuple(ehs.shape))
        last_t, last_shapes = (None, None) if self._last is None else (self._last[0], self._last[1:])
        if starts_trajectory(last_t, key[0], last_shapes, key[1:]):
            self.new_trajectory()
        self._last = key
        extra = () if mask is None else (mask,)
        cond = {k: v.float() if v.is_floating_point() else v for k, v in cond.items()}
        out = self.runner(sample.detach().float().cpu(), t, cond or None, *extra)
        wide = int(self.config.get("out_channels") or out.shape[1])
        if not packed and wide == 2 * out.shape[1]:
            # a learned-sigma config (out_channels = 2 x in_channels, e.g. from_unet of a DiT): the graphs
            # and the runner compute only the epsilon half; DiTPipeline / PixArtAlphaPipeline split
            # out_channels // 2 and discard the variance half, so zeros stand in for it
            out = torch.cat([out, torch.zeros_like(out)], dim=1)  # [B, 2 C_eps, H, W]
        out = out.to(device=sample.device, dtype=sample.dtype)
        return UNetOutput(out) if return_dict else (out,)

    def _check_ids(self, sample, kwargs) -> None:
        """FLUX's img_ids / txt_ids: the graphs compute them from the shapes (models/denoiser.py); a pipeline's
        must be those, or the call is refused in one line (other ids need other graphs)."""
        from ..backends.base import RunnerError
        from ..models import denoiser

        hw = self.runner.image_hw or denoiser.tokens_hw(sample.shape[1])
        for name, want in (("img_ids", denoiser.image_ids(hw)), ("txt_ids", None)):
            got = kwargs.get(name)
            if got is None:
                continue
            got = torch.as_tensor(got).detach().cpu().float()
            got = got[0] if got.dim() == 3 else got  # diffusers' deprecated [B, N, 3] form
            ok = torch.equal(got, want) if want is not None else not bool(got.abs().sum())
            if not ok:
                raise RunnerError(f"{name} differ from the ones the graphs were exported with (FluxPipeline's for a "
                                  f"{hw[0]}x{hw[1]} latent); export graphs for these positions")


def _keep_mask(mask) -> torch.Tensor | None:
    """A pipeline's encoder_attention_mask as [B, S] float 1 (attend) / 0 (padding): diffusers passes the
    tokenizer's [B, S] mask, or the bias form [B, 1, S] (0 keep, -10000 discard) its models also accept."""
    if mask is None:
        return None
    mask = torch.as_tensor(mask).detach().cpu()
    if mask.dim() == 3 and mask.shape[1] == 1 and mask.is_floating_point():
        return (mask[:, 0] > -1.0).float()  # the bias form
    return mask.float() if mask.dtype == torch.bool else mask
