"""Small shared fixtures: tiny random diffusers UNets (fresh per test, so in-place quantize() never leaks)."""
from __future__ import annotations

import pytest
import torch

TINY_UNET_KWARGS = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
)

TINY_COND_UNET_KWARGS = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    cross_attention_dim=32,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models on 2 shared cores: intra-op threads only add contention (measured ~10x slower with
    two threads while the other core is busy). Restored after the session."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _build(cls: str, kwargs: dict, seed: int, overrides: dict):
    """diffusers model class `cls` from `kwargs` with `overrides`, random weights from `seed`, in eval mode."""
    import diffusers

    torch.manual_seed(seed)
    return getattr(diffusers, cls)(**{**kwargs, **overrides}).eval()


def build_tiny_unet(seed: int = 0, **overrides):
    """A fresh, eval-mode random UNet2DModel (deterministic for a given seed and overrides)."""
    return _build("UNet2DModel", TINY_UNET_KWARGS, seed, overrides)


def build_tiny_cond_unet(seed: int = 0, **overrides):
    """A fresh, eval-mode random UNet2DConditionModel (cross_attention_dim 32)."""
    return _build("UNet2DConditionModel", TINY_COND_UNET_KWARGS, seed, overrides)


@pytest.fixture
def make_tiny_unet():
    """Factory: make_tiny_unet(seed=0, **overrides) -> a new UNet2DModel each call."""
    return build_tiny_unet


@pytest.fixture
def make_tiny_cond_unet():
    """Factory: make_tiny_cond_unet(seed=0, **overrides) -> a new UNet2DConditionModel each call."""
    return build_tiny_cond_unet


@pytest.fixture
def tiny_unet():
    """A fresh tiny UNet2DModel (1 channel, 16x16), seed 0; safe to quantize in place."""
    return build_tiny_unet()


@pytest.fixture
def tiny_cond_unet():
    """A fresh tiny UNet2DConditionModel (4 channels, 8x8, cross_attention_dim 32), seed 0."""
    return build_tiny_cond_unet()


def tiny_model(unet, name: str = "tiny"):
    """A LoadedModel around an in-memory UNet (what export_model takes)."""
    from modiff_export.models import LoadedModel

    return LoadedModel.from_unet(unet, name)


TINY_DIT_KWARGS = dict(sample_size=8, in_channels=1, out_channels=1, patch_size=2, num_layers=2,
                       num_attention_heads=2, attention_head_dim=16, num_embeds_ada_norm=10)
TINY_PIXART_KWARGS = dict(sample_size=8, in_channels=4, out_channels=8, patch_size=2, num_layers=2,
                          num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32, caption_channels=24,
                          num_embeds_ada_norm=1000)


def build_tiny_dit(seed: int = 0, **overrides):
    """A fresh, eval-mode random DiTTransformer2DModel (class-conditional, 10 classes, 1x8x8)."""
    return _build("DiTTransformer2DModel", TINY_DIT_KWARGS, seed, overrides)


def build_tiny_pixart(seed: int = 0, **overrides):
    """A fresh, eval-mode random PixArtTransformer2DModel (text-conditional, caption_channels 24, learned sigma)."""
    return _build("PixArtTransformer2DModel", TINY_PIXART_KWARGS, seed, overrides)
