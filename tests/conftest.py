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


def pytest_sessionstart(session):
    """First line of every run, -q included: the CPU it tests on and the path the runners take there (the other
    paths are forced: OV_PATHS)."""
    from modiff_export.backends.cpu import CpuPath, cpu_int8_flags

    flags = ", ".join(f for f, on in cpu_int8_flags().items() if on) or "no x86 flags"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"CPU flags: {flags}; runner path: {CpuPath.resolve().describe()}")


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


# the models people deploy, at toy size: SDXL's UNet (text_time: pooled text_embeds [B, 16] + time_ids [B, 6]),
# SD3's MMDiT (joint attention, pooled projections) and FLUX (double + single stream, rotary ids, packed latents)
TINY_SDXL_KWARGS = dict(TINY_COND_UNET_KWARGS, addition_embed_type="text_time", addition_time_embed_dim=8,
                        projection_class_embeddings_input_dim=16 + 6 * 8, transformer_layers_per_block=1)
TINY_SD3_KWARGS = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
                       num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                       pooled_projection_dim=16, pos_embed_max_size=8)
TINY_FLUX_KWARGS = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=False,
                        axes_dims_rope=(4, 6, 6))


def build_tiny_sdxl(seed: int = 0, **overrides):
    """A fresh random SDXL-style UNet2DConditionModel (4 x 8 x 8, cross_attention_dim 32, text_time)."""
    return _build("UNet2DConditionModel", TINY_SDXL_KWARGS, seed, overrides)


def build_tiny_sd3(seed: int = 0, **overrides):
    """A fresh random SD3Transformer2DModel (4 x 8 x 8; states [B, S, 32], pooled [B, 16])."""
    return _build("SD3Transformer2DModel", TINY_SD3_KWARGS, seed, overrides)


def build_tiny_flux(seed: int = 0, sample_size: int = 8, **overrides):
    """A fresh random FluxTransformer2DModel over latents 4 x 8 x 8 (packed [B, 16, 16]; states [B, S, 32],
    pooled [B, 16]); sample_size is kept in its config as a FLUX folder's config.json would carry it."""
    m = _build("FluxTransformer2DModel", TINY_FLUX_KWARGS, seed, overrides)
    m.register_to_config(sample_size=sample_size)
    return m


def build_tiny_dit(seed: int = 0, **overrides):
    """A fresh, eval-mode random DiTTransformer2DModel (class-conditional, 10 classes, 1x8x8)."""
    return _build("DiTTransformer2DModel", TINY_DIT_KWARGS, seed, overrides)


def build_tiny_pixart(seed: int = 0, **overrides):
    """A fresh, eval-mode random PixArtTransformer2DModel (text-conditional, caption_channels 24, learned sigma)."""
    return _build("PixArtTransformer2DModel", TINY_PIXART_KWARGS, seed, overrides)


# -- CPU paths (backends/cpu.py): the OpenVINO tests run under every distinct forcible path on every machine ------
def _paths():
    from modiff_export.backends.cpu import DISTINCT_PATHS

    return DISTINCT_PATHS


OV_PATHS = _paths()  # avx2 (u8 codes + folded weights, f32), vnni (int8 kernels, f32), vnni_bf16 (int8, bf16)
OV_BACKENDS = tuple(f"openvino-{p}" for p in OV_PATHS)


def _native_path() -> str:
    from modiff_export.backends.cpu import cpu_class

    return {"amx": "vnni_bf16"}.get(cpu_class(), cpu_class())


NATIVE_PATH = _native_path()  # the distinct path this CPU takes by itself


def _inexact_here() -> set[str]:
    from modiff_export.backends.cpu import CpuPath

    return {p for p in OV_PATHS if not CpuPath.resolve(p).exact}


INEXACT_HERE = _inexact_here()  # paths whose numbers this CPU cannot check (int8 kernels on an AVX2 CPU)


def path_params(paths) -> list:
    """`paths` as parametrize values for numeric tests: a path that cannot be exact on this CPU (it checks only
    structure there) goes to the `slow` set, which .ci/run runs too; the default run keeps what it can check."""
    return [pytest.param(p, marks=pytest.mark.slow) if p in INEXACT_HERE else p for p in paths]


def backend_options(backend: str) -> tuple[str, dict]:
    """'openvino-<cpu path>' -> ('openvino', {'cpu_path': path}); any other backend name as it is, no options."""
    name, _, path = backend.partition("-")
    return (name, {"cpu_path": path}) if path else (backend, {})


def exact_here(runner) -> bool:
    """Whether `runner` computes its graphs' arithmetic on this CPU: False only for an OpenVINO runner whose forced
    CPU path puts int8 kernels on a saturating int8 dot product (an AVX2 CPU; backends/cpu.py)."""
    path = getattr(runner, "cpu_path", None)
    return runner.backend != "openvino" or path is None or path.exact


def skip_numbers_unless_exact(runner) -> None:
    """Call after a test's structural checks (shapes, I/O, caches, the cut), before its numeric ones."""
    if not exact_here(runner):
        pytest.skip(f"CPU path {runner.cpu_path.cpu_class} forced on a CPU whose int8 dot product saturates: its int8 "
                    f"kernels do not compute the graph's codes here, so only shapes, I/O and the cut were checked")
