"""Issue 13, item 4: a new trajectory never silently reuses the previous one's caches: the quantized
PyTorch model inside a diffusers pipeline, and every runner driven twice by the sampling loop,
give the same images the second time."""
from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_unet, tiny_model
from diffusers import DDIMPipeline, DDIMScheduler

from modiff_export.backends import make_runner
from modiff_export.config import QuantConfig
from modiff_export.export.trace import export_model
from modiff_export.quant.quantization import quantize
from modiff_export.sampling import generate, make_scheduler

CONFIG = QuantConfig(act_bits=4)


def test_quantized_unet_in_a_diffusers_pipeline_twice():
    """The issue's report: the second call started from the first call's stale caches (24 dB apart)."""
    pipe = DDIMPipeline(unet=quantize(build_tiny_unet(0), CONFIG), scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    images = [pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=5,
                   output_type="np").images for _ in range(2)]
    assert (images[0] == images[1]).all()


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_runner_twice_through_the_sampling_loop(backend, tmp_path):
    if backend == "torch":
        runner = make_runner("torch", quantize(build_tiny_unet(0), CONFIG))
    else:
        export_model(tiny_model(build_tiny_unet(0)), CONFIG, tmp_path / "g", progress=False)
        runner = make_runner("ort", folder=tmp_path / "g", threads=1)
    runs = []
    for _ in range(2):
        scheduler = make_scheduler("dpmpp", {"num_train_timesteps": 1000})
        runs.append(generate(runner, scheduler, 5, 2, 0, (1, 16, 16), progress=False))
    assert torch.equal(runs[0], runs[1])


def test_runner_detects_a_new_trajectory_without_reset():
    """`__call__` alone (no reset between): a timestep going back up starts over with prime."""
    runner = make_runner("torch", quantize(build_tiny_unet(0), CONFIG))
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))  # [B, C, H, W]
    first = [runner(x, t).clone() for t in (900.0, 700.0, 500.0)]
    second = [runner(x, t).clone() for t in (900.0, 700.0, 500.0)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
