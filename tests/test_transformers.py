"""Diffusion transformers (issue 19): DiTTransformer2DModel (class-conditional) and PixArtTransformer2DModel
(text-conditional, learned sigma) through load, quantize, export, check, the runners and the CLI, on tiny
random-weight models (the UNet counterparts: test_export.py, test_ort_parity.py, test_openvino.py,
test_runner_contract.py, test_bad_inputs.py)."""
from __future__ import annotations

import copy
import json
import re
import shutil

import pytest
import torch
from conftest import build_tiny_dit, build_tiny_pixart
from reliability_util import diff_snapshots, error_line, run_cli, snapshot

from modiff_export import QuantConfig, quantize
from modiff_export.backends import make_runner
from modiff_export.backends.base import RunnerError
from modiff_export.backends.torch_runner import TorchRunner
from modiff_export.evaluation.metrics import psnr
from modiff_export.export.trace import export_model
from modiff_export.manifest import Manifest
from modiff_export.models import denoiser, load_model
from modiff_export.models.loading import ModelError
from modiff_export.sampling import Trajectories, run_batches

SCHED = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000}


def _save(model, folder, pipeline: bool = False):
    """A model folder (config + safetensors + scheduler_config.json) or a pipeline folder (transformer/ +
    scheduler/)."""
    sub = folder / "transformer" if pipeline else folder
    model.save_pretrained(sub, safe_serialization=True)
    sched = folder / "scheduler" / "scheduler_config.json" if pipeline else folder / "scheduler_config.json"
    sched.parent.mkdir(parents=True, exist_ok=True)
    sched.write_text(json.dumps({**SCHED, "num_train_timesteps": 500}))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{"dit", "pixart": model folders; "dit_graphs", "pixart_graphs": W8A8 exports}."""
    root = tmp_path_factory.mktemp("transformers")
    out = {"dit": _save(build_tiny_dit(), root / "dit"), "pixart": _save(build_tiny_pixart(), root / "pixart")}
    for kind in ("dit", "pixart"):
        export_model(load_model(str(out[kind])), QuantConfig(act_bits=8), root / f"{kind}-g", progress=False)
        out[f"{kind}_graphs"] = root / f"{kind}-g"
    return out


# -- loading ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pipeline", [False, True])
def test_load_dit_and_pixart(tmp_path, pipeline):
    dit = load_model(str(_save(build_tiny_dit(), tmp_path / "d", pipeline)))
    assert type(dit.unet).__name__ == "DiTTransformer2DModel"
    assert (dit.num_classes, dit.conditional, dit.sample_shape, dit.out_channels) == (10, False, (1, 8, 8), 1)
    assert dit.scheduler_config["num_train_timesteps"] == 500  # read from the folder's scheduler config
    assert dit.info.num_classes == 10 and dit.info.class_conditional
    pa = load_model(str(_save(build_tiny_pixart(), tmp_path / "p", pipeline)))
    assert (pa.num_classes, pa.conditional, pa.cross_attention_dim, pa.encoder_seq_len) == (None, True, 24, 120)
    assert pa.out_channels == 4, "learned sigma: the epsilon half (in_channels) is the noise prediction"


def test_adapter_returns_the_epsilon_half_and_keeps_names():
    pa = build_tiny_pixart()
    x, ehs = torch.randn(2, 4, 8, 8), torch.randn(2, 120, 24)
    with torch.no_grad():
        full = pa(x, encoder_hidden_states=ehs, timestep=torch.tensor([10.0, 10.0]),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        eps = denoiser.call(pa, x, torch.tensor([10.0, 10.0]), ehs)
    assert full.shape[1] == 8 and torch.equal(eps, full[:, :4])
    names = [n for n, m in pa.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    q = quantize(pa, QuantConfig(act_bits=4))
    assert [layer.name for layer in q.modules() if type(layer).__name__ == "MoDiffLayer"] == names  # diffusers names
    assert "caption_projection.linear_1" in names


def test_wrong_class_name_is_refused(tmp_path):
    folder = _save(build_tiny_dit(), tmp_path / "d")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "_class_name": "HunyuanDiT2DModel"}))
    with pytest.raises(ModelError, match="_class_name is 'HunyuanDiT2DModel'"):
        load_model(str(folder))


# -- export + check ---------------------------------------------------------------------------------
def test_export_manifest_and_check(folders):
    m = Manifest.load(folders["dit_graphs"])
    assert [(s.name, s.shape, s.dtype) for s in m.inputs][2] == ("class_labels", ("batch",), "int64")
    assert m.model.num_classes == 10 and m.cond_input == "class_labels" and m.caches
    p = Manifest.load(folders["pixart_graphs"])
    assert [(s.name, s.shape) for s in p.inputs][2:] == [("encoder_hidden_states", ("batch", 120, 24)),
                                                         ("encoder_attention_mask", ("batch", 120))]
    assert p.mask_input == "encoder_attention_mask" and m.mask_input is None
    assert p.outputs[0].shape == ("batch", 4, 8, 8)
    for kind in ("dit", "pixart"):
        code, out, err = run_cli(["check", folders[f"{kind}_graphs"]])
        assert code == 0, err


def test_manifest_refuses_labels_without_num_classes(folders, tmp_path):
    g = tmp_path / "g"
    shutil.copytree(folders["dit_graphs"], g)
    d = json.loads((g / "manifest.json").read_text())
    d["model"]["num_classes"] = None
    (g / "manifest.json").write_text(json.dumps(d))
    code, _, err = run_cli(["check", g])
    assert "class_labels" in error_line(code, err)


# -- parity -----------------------------------------------------------------------------------------
# Thresholds: the UNet tests ask 40 dB (W8A8) / 30 dB (W8A4) of whole trajectories on the trained digits
# model (test_openvino.py::test_digits_trajectory_parity), the targets of issue 19. ORT computes the
# PyTorch reference's float operations (test_ort_parity.py), so it must meet them on a random DiT too;
# the same targets are asked of OpenVINO. On CPUs without VNNI/AMX the OpenVINO runner dequantizes the weights
# at load (its int8 dot product saturates there: backends/cpu.py); before that it measured 17 dB at W8A8 here.
@pytest.mark.parametrize("backend", ["ort", "openvino"])
@pytest.mark.parametrize("act_bits,min_psnr", [(8, 40.0), (4, 30.0)])
def test_dit_cfg_trajectory_parity(tmp_path, backend, act_bits, min_psnr):
    m = load_model(str(_save(build_tiny_dit(), tmp_path / "d")))
    cfg = QuantConfig(act_bits=act_bits)
    export_model(m.copy(), cfg, tmp_path / "g", progress=False)
    traj = Trajectories("ddim", 10, 4, 4, 0, guidance_scale=2.0)
    kw = {"threads": 1} if backend == "openvino" else {}
    runners = (TorchRunner(quantize(copy.deepcopy(m.unet), cfg)), make_runner(backend, folder=tmp_path / "g", **kw))
    imgs = [run_batches(r, m, traj, progress=False) for r in runners]
    value = psnr(imgs[0], imgs[1])
    assert value >= min_psnr, f"{backend} vs PyTorch DiT CFG trajectory PSNR {value:.1f} dB < {min_psnr} dB"
    other = run_batches(runners[0], m, traj.replace(labels=(9, 8, 7, 6)), progress=False)
    assert psnr(imgs[0], other) < min_psnr, "the class labels do not reach the model"


@pytest.mark.parametrize("backend", ["ort", "openvino"])
def test_pixart_per_step_parity(folders, backend):
    """Per step, as test_ort_parity.py: prime within float rounding, steps within 1.5 x the quantization
    error itself (rms(backend - torch) <= 1.5 x rms(torch - fp) + a float floor); with caption padding masks
    that differ per sample, which must reach the graphs (the unmasked prime differs by far more)."""
    m = load_model(str(folders["pixart"]))
    ref = TorchRunner(quantize(copy.deepcopy(m.unet), QuantConfig(act_bits=8)))
    fp = TorchRunner(quantize(copy.deepcopy(m.unet), QuantConfig(mode="fp")))
    kw = {"threads": 1} if backend == "openvino" else {}
    run = make_runner(backend, folder=folders["pixart_graphs"], **kw)
    g = torch.Generator().manual_seed(0)
    x, ehs = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 120, 24, generator=g)
    mask = torch.ones(2, 120)
    mask[0, 7:], mask[1, 60:] = 0, 0  # captions of 7 and 60 tokens, padded to 120
    x0 = x + 0.05 * torch.randn(x.shape, generator=g)
    for i, t in enumerate((900, 800, 700, 600)):
        x = x0 if i == 0 else x + 0.05 * torch.randn(x.shape, generator=g)
        a, b, f = ref(x, t, ehs, mask), run(x, t, ehs, mask), fp(x, t, ehs, mask)
        err, q = (a - b).pow(2).mean().sqrt().item(), (a - f).pow(2).mean().sqrt().item()
        if i == 0:
            assert err <= 1e-4 * a.abs().max().item(), f"{backend} prime differs by {err}"
            b0 = b
        else:
            assert err <= 1.5 * q + 1e-5, f"{backend} step {i}: rms {err:.2e} vs quantization error {q:.2e}"
    run.reset()
    unmasked = run(x0, 900, ehs)  # no mask: every caption token attended
    assert (unmasked - b0).abs().max().item() > 100 * 1e-4 * b0.abs().max().item(), "the mask does not reach the graph"


# -- bad inputs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "ort", "openvino"])
def test_runner_bad_conditioning(folders, backend):
    dit = TorchRunner(quantize(load_model(str(folders["dit"])).unet, QuantConfig(act_bits=8))) \
        if backend == "torch" else make_runner(backend, folder=folders["dit_graphs"])
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(RunnerError, match=r"class label 11 is outside 0\.\.10"):
        dit(x, 900, torch.tensor([0, 11]))
    with pytest.raises(RunnerError, match=r"'class_labels' \[B\] int64 is required"):
        dit(x, 900)
    with pytest.raises(RunnerError, match="'class_labels' must be int64"):
        dit(x, 900, torch.randn(2, 77, 32))
    assert dit(x, 900, torch.tensor([3, 10])).shape == (2, 1, 8, 8)  # 10: the null class
    pa = make_runner(backend, folder=folders["pixart_graphs"]) if backend != "torch" else \
        TorchRunner(quantize(load_model(str(folders["pixart"])).unet, QuantConfig(act_bits=8)))
    if backend != "torch":  # the torch runner knows no sequence length: the model takes any
        with pytest.raises(RunnerError, match=r"'encoder_hidden_states' must be float32 \[B, 120, 24\]"):
            pa(torch.randn(2, 4, 8, 8), 900, torch.randn(2, 77, 24))
    x4, ehs = torch.randn(2, 4, 8, 8), torch.randn(2, 120, 24)
    with pytest.raises(RunnerError, match=r"'encoder_attention_mask' must be float32 \[B, 120\]"):
        pa(x4, 900, ehs, torch.ones(2, 77))
    with pytest.raises(RunnerError, match=r"only 0 \(padding\) and 1 \(attend\)"):
        pa(x4, 900, ehs, torch.full((2, 120), 0.5))
    with pytest.raises(RunnerError, match="takes no encoder states"):
        dit(x, 900, torch.tensor([3, 10]), torch.ones(2, 8))
    uncond = make_runner("torch", quantize(load_model("digits").unet, QuantConfig(act_bits=8)))
    with pytest.raises(RunnerError, match="unconditional"):
        uncond(torch.randn(1, 1, 16, 16), 900, torch.tensor([1]))


@pytest.mark.parametrize("args,match", [
    (["--labels", "11"], r"class label 11 is outside 0\.\.10"),
    (["--labels", "x"], "comma-separated integers"),
])
def test_cli_bad_labels(folders, tmp_path, args, match):
    before = snapshot(tmp_path)
    code, _, err = run_cli(["sample", "--model", folders["dit"], "--steps", "2", "--batch-size", "2",
                            "--out", tmp_path / "s.png", *args])
    assert re.search(match, error_line(code, err))
    assert not diff_snapshots(before, snapshot(tmp_path)), "something was written"


def test_cli_labels_on_unconditional_and_graphs(folders, tmp_path):
    code, _, err = run_cli(["sample", "--steps", "2", "--batch-size", "1", "--labels", "3",
                            "--out", tmp_path / "u.png"])
    assert "not class-conditional" in error_line(code, err)
    code, _, err = run_cli(["sample", "--backend", "ort", "--graphs", folders["dit_graphs"], "--steps", "2",
                            "--batch-size", "2", "--labels", "1,2", "--guidance-scale", "2",
                            "--out", tmp_path / "s.png"])
    assert code == 0, err
    assert (tmp_path / "s.png").is_file()
    code, _, err = run_cli(["sample", "--model", folders["dit"], "--act-bits", "4", "--steps", "2",
                            "--batch-size", "2", "--class-label", "4", "--out", tmp_path / "t.png"])
    assert code == 0, err
    code, _, err = run_cli(["calibrate", "--model", folders["dit"], "--steps", "2", "--samples", "2",
                            "--batch-size", "2", "--labels", "12", "--out", tmp_path / "c.json"])
    assert "class label 12 is outside 0..10" in error_line(code, err) and not (tmp_path / "c.json").exists()
    code, _, err = run_cli(["package-triton", folders["dit_graphs"], "--out", tmp_path / "repo"])  # issue 19: served
    assert code == 0, err
    assert 'name: "class_label"' in (tmp_path / "repo" / "modiff" / "config.pbtxt").read_text()


# -- TensorRT planning (CPU-testable up to the TensorRT call) ----------------------------------------
def test_tensorrt_planning_of_a_dit(tmp_path):
    """build-engine's planning on a DiT's graphs: one optimization profile entry for every network input,
    class_labels included (int64 [batch], as the manifest says), and at W4A4 with block scales (opset 21)
    the transformer's Linear weights are INT4 block-quantized, so --precision int4 has something to run
    (TensorRT's INT4 is weight-only block-quantized MatMul/Gemm: nearly all of a transformer's compute)."""
    import onnx

    from modiff_export.engine import EngineBuildOptions, builder_settings, count_block_quantized_weights, plan_profiles

    m = load_model(str(_save(build_tiny_dit(), tmp_path / "d")))
    cfg = QuantConfig(weight_bits=4, act_bits=4, weight_block_size=16)
    export_model(m.copy(), cfg, tmp_path / "g", opset=21, progress=False)
    man = Manifest.load(tmp_path / "g")
    p = plan_profiles(man, EngineBuildOptions(min_batch=2, opt_batch=4, max_batch=8))
    for role, entries in p.items():
        model = onnx.load(str(tmp_path / "g" / man.graphs[role]), load_external_data=False)
        init = {i.name for i in model.graph.initializer}
        assert [e[0] for e in entries] == [i.name for i in model.graph.input if i.name not in init]
        labels = next(e for e in entries if e[0] == "class_labels")
        assert labels[1:] == ((2,), (4,), (8,))
    assert next(s for s in man.inputs if s.name == "class_labels").dtype == "int64"
    n = count_block_quantized_weights(tmp_path / "g" / man.graphs["step"])
    linears = sum(1 for _, mod in m.unet.named_modules() if isinstance(mod, torch.nn.Linear))
    assert n >= linears // 2 > 0
    s = builder_settings(man, EngineBuildOptions(precision="int4"), block_quantized_weights=n)
    assert s["strongly_typed"] and f"{n} found" in s["explain"]
