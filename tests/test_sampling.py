"""Sampling loop: every scheduler, determinism, CFG batch doubling, runner reset per batch."""
import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from modiff_export import QuantConfig, quantize
from modiff_export.backends.torch_runner import TorchRunner
from modiff_export.sampling import SCHEDULERS, SamplingError, generate, make_scheduler, save_grid

SCHED_CONFIG = {"num_train_timesteps": 1000}


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
                       norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()


def tiny_cond_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64),
                                norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


class SpyRunner(TorchRunner):
    """Records every reset and every call's batch size."""

    def __init__(self, unet):
        super().__init__(unet)
        self.events = []

    def reset(self):
        self.events.append("reset")
        super().reset()

    def __call__(self, sample, timestep, ehs=None):
        self.events.append(sample.shape[0])
        return super().__call__(sample, timestep, ehs)



@pytest.fixture(scope="module")
def runner():
    return TorchRunner(tiny_unet())


def run(runner, name, seed=0, steps=4, batch=2):
    return generate(runner, make_scheduler(name, SCHED_CONFIG), steps, batch, seed, (1, 8, 8), progress=False)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_each_scheduler_runs_and_is_deterministic(runner, name):
    x = run(runner, name)
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
    assert x.abs().max() <= 1.0
    assert torch.equal(x, run(runner, name))            # same seed, stochastic steps included
    assert not torch.allclose(x, run(runner, name, seed=1))


def test_named_samplers_are_configured():
    assert make_scheduler("pndm", SCHED_CONFIG).config.skip_prk_steps
    assert make_scheduler("dpmpp", SCHED_CONFIG).config.algorithm_type == "dpmsolver++"
    with pytest.raises(SamplingError, match="unknown scheduler 'nope'"):
        make_scheduler("nope", SCHED_CONFIG)


def test_runner_reset_at_start_of_each_batch():
    spy = SpyRunner(quantize(tiny_unet(), QuantConfig(mode="modiff", act_bits=4)))
    generate(spy, make_scheduler("ddim", SCHED_CONFIG), 3, 2, 0, (1, 8, 8), progress=False)
    generate(spy, make_scheduler("ddim", SCHED_CONFIG), 3, 3, 1, (1, 8, 8), progress=False)  # new batch size
    assert spy.events == ["reset", 2, 2, 2, "reset", 3, 3, 3]


def test_given_noise_is_used(runner):
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    a = generate(runner, make_scheduler("ddim", SCHED_CONFIG), 3, 2, 0, (1, 8, 8), progress=False, noise=noise)
    b = generate(runner, make_scheduler("ddim", SCHED_CONFIG), 3, 2, 99, (1, 8, 8), progress=False, noise=noise)
    assert torch.equal(a, b)
    with pytest.raises(SamplingError, match="noise must have shape"):
        generate(runner, make_scheduler("ddim", SCHED_CONFIG), 3, 2, 0, (1, 8, 8), progress=False, noise=noise[:1])


def test_cfg_doubles_batch_through_one_runner_call():
    spy = SpyRunner(quantize(tiny_cond_unet(), QuantConfig(mode="modiff", act_bits=8)))
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 4, 32, generator=g), torch.zeros(3, 4, 32)
    kw = dict(encoder_hidden_states=cond, uncond_hidden_states=uncond, progress=False)
    x = generate(spy, make_scheduler("dpmpp", SCHED_CONFIG), 3, 3, 0, (4, 8, 8), guidance_scale=7.5, **kw)
    assert x.shape == (3, 4, 8, 8) and torch.isfinite(x).all()
    assert spy.events == ["reset", 6, 6, 6]
    y = generate(spy, make_scheduler("dpmpp", SCHED_CONFIG), 3, 3, 0, (4, 8, 8), guidance_scale=1.0, **kw)
    assert spy.events[4:] == ["reset", 3, 3, 3] and not torch.allclose(x, y)
    with pytest.raises(SamplingError, match="uncond_hidden_states"):
        generate(spy, make_scheduler("ddim", SCHED_CONFIG), 2, 3, 0, (4, 8, 8), encoder_hidden_states=cond,
                 guidance_scale=3.0, progress=False)


def test_save_grid_upscales_and_writes_atomically(tmp_path):
    from PIL import Image

    imgs = torch.linspace(-1, 1, 5 * 64).reshape(5, 1, 8, 8)
    path = save_grid(imgs, tmp_path / "g.png")
    im = Image.open(path)
    assert im.mode == "L" and im.size[0] >= 3 * 64 and im.size[1] >= 2 * 64  # 3 x 2 grid of >= 64 px cells
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png"]
