"""A drop-in UNet for diffusers pipelines, backed by any MoDiff runner (torch, ort, openvino, trt).

    pipe = StableDiffusionPipeline(..., unet=ModiffUNet.from_folder("graphs/sd-w8a8"), ...)
    pipe.unet = ModiffUNet.from_folder("graphs/digits-w8a4")          # or replace it afterwards
    images = pipe(...).images

MoDiff's caches belong to one trajectory, so they are reset at the start of every pipeline call. A
pipeline never says when a call starts; the UNet sees it: within one call the timestep never increases
(PNDM and Heun repeat one, hence "increases", not "does not decrease") and the batch/shape never
changes, so a timestep above the previous one, or a new shape, starts a new trajectory. A caller that
runs two one-step trajectories with the same timestep back to back calls `unet.new_trajectory()`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import FrozenDict

from ..quant.quantization import starts_trajectory


@dataclass
class UNetOutput:
    """What diffusers' UNet2DOutput / UNet2DConditionOutput carry: `.sample`, and [0] for return_dict=False."""
    sample: torch.Tensor

    def __getitem__(self, i):
        return (self.sample,)[i]


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
        base = {"in_channels": m.in_channels, "out_channels": m.out_channels,
                "sample_size": size[0] if size[0] == size[1] else list(size),
                "cross_attention_dim": m.cross_attention_dim, "_class_name": m.class_name}
        return cls(runner, {**base, **(config or {})})

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

    def new_trajectory(self) -> None:
        """Forget the caches: the next call primes them."""
        self.runner.reset()
        self._last = None
        self.trajectories += 1

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor | None = None, *args,
                return_dict: bool = True, **kwargs):
        t = torch.as_tensor(timestep, dtype=torch.float32).flatten()
        key = (float(t.max()), tuple(sample.shape),
               None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape))
        last_t, last_shapes = (None, None) if self._last is None else (self._last[0], self._last[1:])
        if starts_trajectory(last_t, key[0], last_shapes, key[1:]):
            self.new_trajectory()
        self._last = key
        ehs = None if encoder_hidden_states is None else encoder_hidden_states.detach().float().cpu()
        out = self.runner(sample.detach().float().cpu(), t, ehs)  # [B, C_out, H, W]
        out = out.to(device=sample.device, dtype=sample.dtype)
        return UNetOutput(out) if return_dict else (out,)
