"""Flow matching in the sampling loop (issue 32, point 3): FlowMatchEulerDiscreteScheduler and its Heun variant
drive any runner through sampling.denoise, `auto` picks the model's own sampler, FLUX's resolution-dependent shift
is FluxPipeline's, and a sampler that does not fit the model's training objective is refused in one line.

The flow model here is a tiny random UNet2DModel whose scheduler config is a FlowMatchEulerDiscreteScheduler (what
the loop and the runners see of SD3/FLUX: a velocity model and sigmas 1 -> 0); random weights serve the loop and
parity, never quality."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny_unet
from reliability_util import error_line, run_cli
from test_sampling import _load_triton_copy

from modiff_export import QuantConfig, quantize
from modiff_export.backends import make_runner
from modiff_export.backends.torch_runner import TorchRunner
from modiff_export.evaluation.metrics import psnr
from modiff_export.export.trace import export_model
from modiff_export.models import LoadedModel
from modiff_export.sampling import (
    SamplingError,
    denoise,
    flow_shift_mu,
    generate,
    make_scheduler,
    resolve_scheduler,
    set_timesteps,
)

FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}  # SD3's
FLUX = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
        "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
        "max_image_seq_len": 4096}  # FLUX.1's
DDPM = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000}


def test_auto_and_refusals():
    assert resolve_scheduler("auto", DDPM) == "ddim" and resolve_scheduler("auto", {}) == "ddim"
    assert resolve_scheduler("auto", FLOW) == "flow_euler"
    assert resolve_scheduler("auto", {**FLOW, "_class_name": "FlowMatchHeunDiscreteScheduler"}) == "flow_heun"
    assert type(make_scheduler("auto", FLOW)).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert make_scheduler("flow_euler", FLOW).config.shift == 3.0  # the folder's own config
    with pytest.raises(SamplingError, match="'flow_euler' does not fit this model: it was trained for epsilon"):
        make_scheduler("flow_euler", DDPM)
    with pytest.raises(SamplingError, match="'ddim' does not fit this model: it was trained for flow matching"):
        make_scheduler("ddim", FLOW)
    with pytest.raises(SamplingError, match="v_prediction"):
        make_scheduler("flow_heun", {**DDPM, "prediction_type": "v_prediction"})


def test_cli_refuses_a_flow_sampler_for_a_ddpm_model(tmp_path):
    code, _, err = run_cli(["sample", "--model", "digits", "--scheduler", "flow_euler", "--steps", "2",
                            "--batch-size", "1", "--out", tmp_path / "x.png"])
    assert "does not fit this model" in error_line(code, err) and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("hw", [(64, 64), (128, 128), (32, 48)])
def test_flux_shift_is_fluxpipelines(hw):
    """mu from the latent size equals FluxPipeline's calculate_shift of its packed sequence length, and the
    sigmas the loop sets are those FluxPipeline sets."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    seq = (hw[0] // 2) * (hw[1] // 2)
    want = calculate_shift(seq, FLUX["base_image_seq_len"], FLUX["max_image_seq_len"], FLUX["base_shift"],
                           FLUX["max_shift"])
    assert flow_shift_mu(FLUX, (1, 16, *hw)) == pytest.approx(want, rel=1e-12)
    assert flow_shift_mu(FLOW, (1, 16, *hw)) is None
    ours, theirs = make_scheduler("flow_euler", FLUX), make_scheduler("flow_euler", FLUX)
    set_timesteps(ours, 28, (1, 16, *hw))  # what denoise calls
    theirs.set_timesteps(28, mu=want)
    assert torch.allclose(ours.sigmas, theirs.sigmas)


def test_denoise_is_the_flow_euler_update():
    """With the FP model, denoise with flow_euler is x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i, 1000 sigma_i)
    from x_0 = noise (no input scaling, no init sigma), then clamped: the update SD3/FLUX pipelines run."""
    unet = build_tiny_unet()
    runner = TorchRunner(quantize(copy.deepcopy(unet), QuantConfig(mode="fp")))
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    got = denoise(runner, make_scheduler("flow_euler", FLOW), noise, 6)
    sched = make_scheduler("flow_euler", FLOW)
    sched.set_timesteps(6)
    x = noise.clone()
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            v = unet(x, t).sample
            x = x + (sched.sigmas[i + 1] - sched.sigmas[i]) * v
    assert torch.allclose(got, x.clamp(-1, 1), atol=1e-5)


@pytest.fixture(scope="module")
def flow_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    for bits in (8, 4):
        export_model(LoadedModel.from_unet(build_tiny_unet(), "tiny-flow", FLOW), QuantConfig(act_bits=bits),
                     root / f"a{bits}", progress=False)
    return root


@pytest.mark.parametrize("scheduler", ["flow_euler", "flow_heun"])
@pytest.mark.parametrize("bits, min_db", [pytest.param(8, 40.0, marks=pytest.mark.slow), (4, 30.0)])
def test_flow_trajectories_on_every_runner(flow_folders, scheduler, bits, min_db):
    """Whole 8-step flow trajectories of MoDiff W8A{bits} on ONNX Runtime and OpenVINO against the PyTorch
    reference, from the same noise: the aims of the other models' trajectory parity (40 dB at A8, 30 dB at A4).
    Heun calls the model twice per step, the second time at the next timestep: the timesteps stay
    non-increasing, so one trajectory and one set of caches (the runner would start a new one otherwise)."""
    ref = TorchRunner(quantize(build_tiny_unet(), QuantConfig(act_bits=bits)))
    sched = make_scheduler(scheduler, FLOW)
    want = generate(ref, sched, 8, 2, 0, (1, 16, 16), progress=False)
    assert ref.calls == len(sched.timesteps) and ref.calls == (8 if scheduler == "flow_euler" else 15)
    for backend in ("ort", "openvino"):
        runner = make_runner(backend, folder=flow_folders / f"a{bits}")
        got = generate(runner, make_scheduler(scheduler, FLOW), 8, 2, 0, (1, 16, 16), progress=False)
        assert runner.calls == ref.calls
        assert psnr(want, got) >= min_db, (backend, psnr(want, got))


@pytest.mark.parametrize("scheduler", ["flow_euler", "flow_heun"])
def test_triton_sampler_copy_runs_flow(scheduler):
    """The Triton Python-backend sampler (a copy of sampling.denoise) gives the image generate gives for a flow
    model, exactly, and refuses a DDPM sampler for it; its copy of the FLUX shift is the package's."""
    import asyncio
    import itertools

    mod = _load_triton_copy("sampler")
    assert mod.FLOW == ("flow_euler", "flow_heun")
    for shape in ((1, 16, 64, 64), (1, 16, 32, 48)):
        assert mod.flow_shift_mu(FLUX, shape) == flow_shift_mu(FLUX, shape)
    unet = quantize(build_tiny_unet(), QuantConfig(act_bits=4))
    model = object.__new__(mod.TritonPythonModel)
    model.scheduler_config, model.sample_shape, model.ehs_shape = dict(FLOW), (1, 16, 16), None
    model.conditioning, model.packed = [], False
    model.ids = itertools.count(1)
    runners = {}

    async def fake_unet(cid, sample, t, ehs, flags):
        if flags & 1:
            runners[cid] = TorchRunner(unet)
        return runners[cid](sample, t, ehs)

    model._unet = fake_unet
    got = asyncio.run(model._trajectory({"seed": 3, "steps": 5, "scheduler": scheduler, "guidance_scale": 1.0,
                                         "given": {}}))
    ref = generate(TorchRunner(unet), make_scheduler(scheduler, FLOW), 5, 1, 3, (1, 16, 16), progress=False)
    assert torch.equal(torch.from_numpy(got), ref[0])


def test_cli_on_a_flow_model_folder(tmp_path):
    """A local diffusers folder whose scheduler is a FlowMatchEulerDiscreteScheduler: `sample` defaults to its
    own flow sampler on torch and on the exported graphs (OpenVINO), and refuses a DDPM sampler in one line."""
    import json

    build_tiny_unet().save_pretrained(str(tmp_path / "m"), safe_serialization=True)
    (tmp_path / "m" / "scheduler_config.json").write_text(json.dumps(FLOW))
    code, out, err = run_cli(["sample", "--model", tmp_path / "m", "--steps", "3", "--batch-size", "1",
                              "--act-bits", "4", "--out", tmp_path / "t.png"])
    assert code == 0 and "flow_eulerx3" in out, err
    code, _, err = run_cli(["export", "--model", tmp_path / "m", "--act-bits", "4", "--out", tmp_path / "g",
                            "--quiet"])
    assert code == 0, err
    code, out, err = run_cli(["sample", "--backend", "openvino", "--graphs", tmp_path / "g", "--steps", "3",
                              "--batch-size", "1", "--out", tmp_path / "o.png"])
    assert code == 0 and "flow_eulerx3" in out and (tmp_path / "o.png").is_file(), err
    code, _, err = run_cli(["sample", "--backend", "ort", "--graphs", tmp_path / "g", "--scheduler", "ddim",
                            "--steps", "3", "--batch-size", "1", "--out", tmp_path / "d.png"])
    assert "trained for flow matching" in error_line(code, err) and not (tmp_path / "d.png").exists()
