"""PyTorch reference backend: a (quantized) diffusers denoiser (UNet or transformer, models/denoiser.py)
behind the runner contract."""
from __future__ import annotations

import torch

from ..models import denoiser
from ..quant.quantization import list_caches, modiff_layers, reset_caches
from .base import Runner


class TorchRunner(Runner):
    backend = "torch"

    def __init__(self, unet: torch.nn.Module):
        config = getattr(unet, "modiff_config", None)
        cfg = getattr(unet, "config", None)
        hw = denoiser.sample_hw(unet)
        shape = None if hw is None else denoiser.graph_shape(denoiser.latent_channels(unet), hw, denoiser.packed(unet))
        super().__init__(keyframe_interval=config.keyframe_interval if config else None,
                         reuse_interval=config.reuse_interval if config else None,
                         reuse_forecast=config.reuse_forecast if config else "none",
                         reuse_warmup=config.reuse_warmup if config else 0,
                         uses_cache=any(layer.uses_cache for layer in modiff_layers(unet)),
                         # a PyTorch model takes any text length S (graphs fix it)
                         conditioning=denoiser.conditioning_of(unet).any_length() if cfg is not None else None,
                         sample_shape=shape, image_hw=hw)
        self.unet = unet.eval()

    def describe_path(self) -> str:
        return "torch: the quantization simulated in float32 (the same on every CPU)"

    def _run(self, phase: str, sample, timestep, cond: dict) -> torch.Tensor:
        """phase "prime", "step" or "shallow" (the layers outside the deep branch step, reuse.py)."""
        layers = list(modiff_layers(self.unet))
        for layer in layers:
            layer.phase = "step" if phase == "shallow" else phase
        reuse = getattr(self.unet, "modiff_reuse", None)
        if reuse is not None:
            reuse.phase = "shallow" if phase == "shallow" else "full"
        try:
            with torch.no_grad():
                # clones: the first layer caches its input and the last layer's cache is the output,
                # so a caller editing either tensor in place must not reach into the caches
                return denoiser.call(self.unet, sample.clone(), timestep, cond).clone()
        finally:
            for layer in layers:
                layer.phase = None
            if reuse is not None:
                reuse.phase = None

    def prime_impl(self, sample, timestep, cond):
        return self._run("prime", sample, timestep, cond)

    def step_impl(self, sample, timestep, cond, delta_scales):  # static scales live in the layers
        return self._run("step", sample, timestep, cond)

    def shallow_impl(self, sample, timestep, cond):
        return self._run("shallow", sample, timestep, cond)

    def feature_impl(self) -> torch.Tensor:
        return self.unet.modiff_reuse.feature

    def set_feature_impl(self, feature: torch.Tensor) -> None:
        reuse = self.unet.modiff_reuse
        reuse.feature = feature.to(reuse.feature.dtype, copy=True)

    def reset_impl(self) -> None:
        reset_caches(self.unet)

    def caches(self) -> dict[str, torch.Tensor]:
        out = {f"{c.layer}.{c.kind}": c.tensor.float().clone() for c in list_caches(self.unet) if c.tensor is not None}
        reuse = getattr(self.unet, "modiff_reuse", None)
        if reuse is not None and reuse.feature is not None:
            out[f"{reuse.source}.feature"] = reuse.feature.float().clone()
        return out
