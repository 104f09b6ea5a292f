"""Sampling loop: every scheduler, determinism, CFG batch doubling, runner reset per batch."""
import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from modiff_export import QuantConfig, quantize
from modiff_export.backends.torch_runner import TorchRunner
from modiff_export.sampling import FLOW, SCHEDULERS, SamplingError, generate, make_scheduler, save_grid

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


@pytest.mark.parametrize("name", sorted(set(SCHEDULERS) - set(FLOW)))  # flow ones: tests/test_flow_matching.py
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
    kw = dict(cond=cond, uncond=uncond, progress=False)
    x = generate(spy, make_scheduler("dpmpp", SCHED_CONFIG), 3, 3, 0, (4, 8, 8), guidance_scale=7.5, **kw)
    assert x.shape == (3, 4, 8, 8) and torch.isfinite(x).all()
    assert spy.events == ["reset", 6, 6, 6]
    y = generate(spy, make_scheduler("dpmpp", SCHED_CONFIG), 3, 3, 0, (4, 8, 8), guidance_scale=1.0, **kw)
    assert spy.events[4:] == ["reset", 3, 3, 3] and not torch.allclose(x, y)
    with pytest.raises(SamplingError, match="needs uncond conditioning"):
        generate(spy, make_scheduler("ddim", SCHED_CONFIG), 2, 3, 0, (4, 8, 8), cond=cond,
                 guidance_scale=3.0, progress=False)


def test_save_grid_upscales_and_writes_atomically(tmp_path):
    from PIL import Image

    imgs = torch.linspace(-1, 1, 5 * 64).reshape(5, 1, 8, 8)
    path = save_grid(imgs, tmp_path / "g.png")
    im = Image.open(path)
    assert im.mode == "L" and im.size[0] >= 3 * 64 and im.size[1] >= 2 * 64  # 3 x 2 grid of >= 64 px cells
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png"]


def _load_triton_copy(name: str):
    """A serving/triton_models module, imported with a stand-in for Triton's `triton_python_backend_utils`
    (only its sequence flags are used here)."""
    import importlib.util
    import sys
    import types
    from pathlib import Path

    stub = types.ModuleType("triton_python_backend_utils")
    stub.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START, stub.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 1, 2
    sys.modules.setdefault("triton_python_backend_utils", stub)
    path = Path(__file__).resolve().parent.parent / "modiff_export" / "serving" / "triton_models" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"triton_copy_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_triton_constants_are_the_packages():
    """The Python-backend models cannot import the package: their copies of the schedulers, overrides,
    seed offset and minimum batch must stay those of sampling.py and serving/sampler.py."""
    from modiff_export import sampling
    from modiff_export.serving import sampler

    copy = _load_triton_copy("sampler")
    assert {k: v.__name__ for k, v in copy.SCHEDULERS.items()} == {k: v.__name__ for k, v in SCHEDULERS.items()}
    assert copy.OVERRIDES == sampling._OVERRIDES
    assert copy.EHS_SEED_OFFSET == sampling.ENCODER_SEED_OFFSET
    assert _load_triton_copy("unet_python").MIN_BATCH == sampler.MIN_BATCH


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "dpmpp"])
def test_triton_sampler_copy_matches_denoise(scheduler):
    """The Triton Python-backend sampler's trajectory (a copy of sampling.denoise: one BLS call per step,
    START/END flags per sequence) gives the image sampling.generate gives for the same seed, exactly;
    the BLS call is replaced by a PyTorch runner per correlation id."""
    import asyncio
    import itertools

    copy_module = _load_triton_copy("sampler")
    unet = quantize(tiny_unet(), QuantConfig(mode="modiff", act_bits=4))
    model = object.__new__(copy_module.TritonPythonModel)
    model.scheduler_config, model.sample_shape, model.ehs_shape = dict(SCHED_CONFIG), (1, 8, 8), None
    model.conditioning, model.packed = [], False
    model.ids = itertools.count(7)
    runners, flags_seen = {}, []

    async def fake_unet(cid, sample, t, ehs, flags):
        if flags & 1:  # START: a fresh sequence
            runners[cid] = TorchRunner(unet)
            runners[cid].reset()
        flags_seen.append(flags)
        return runners[cid](sample, t, ehs)

    model._unet = fake_unet
    got = asyncio.run(model._trajectory({"seed": 5, "steps": 6, "scheduler": scheduler, "guidance_scale": 1.0,
                                         "given": {}}))
    ref = generate(TorchRunner(unet), make_scheduler(scheduler, SCHED_CONFIG), 6, 1, 5, (1, 8, 8), progress=False)
    assert flags_seen[0] == 1 and flags_seen[-1] == 2 and len(flags_seen) == 6
    assert torch.equal(torch.from_numpy(got), ref[0])


def test_triton_copy_builds_the_servers_conditioning():
    """The Triton sampler's copy of serving.sampler.item_conditioning gives the same named inputs (SDXL's
    states, text_embeds and time_ids; a label; FLUX.1-dev's embedded guidance), given values and defaults
    drawn from the seed alike."""
    from modiff_export.models.conditioning import CondInput, Conditioning
    from modiff_export.serving.sampler import Item, item_conditioning

    copy_module = _load_triton_copy("sampler")
    model = object.__new__(copy_module.TritonPythonModel)
    cases = [Conditioning((CondInput("encoder_hidden_states", (5, 3)), CondInput("text_embeds", (4,)),
                           CondInput("time_ids", (6,), kind="time_ids"))),
             Conditioning((CondInput("class_labels", (), "int64", "labels", 10),)),
             Conditioning((CondInput("encoder_hidden_states", (5, 3)), CondInput("pooled_projections", (4,)),
                           CondInput("guidance", (), kind="guidance")))]
    for cond in cases:
        model.conditioning = cond.to_list()
        for given in ({}, {"text_embeds": torch.arange(4.0)}):
            given = {k: v for k, v in given.items() if cond.get(k) is not None}
            it = Item(11, 4, "ddim", 3.5, class_label=7, conditioning=given or None)
            want = item_conditioning(it, cond, (8, 8))
            got = model._conditioning({"seed": 11, "guidance_scale": 3.5, "label": 7, "given": given}, (8, 8))
            for w, g in zip(want, got):
                assert w.keys() == g.keys() and all(torch.equal(w[k], g[k]) for k in w)
