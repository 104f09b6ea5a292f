"""--prompts: encoder states from a pipeline folder's own text encoder for sample/evaluate/calibrate."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_cond_unet

from modiff_export import QuantConfig
from modiff_export.models import load_model
from modiff_export.models.conditioning import CondInput, Conditioning
from modiff_export.sampling import Trajectories, batch_conditioning, generate, make_scheduler, sample_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    pytest.importorskip("transformers", reason="transformers is not installed")
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from test_diffusers_unet import _tiny_sd

    tmp = tmp_path_factory.mktemp("pipe")
    tok, text, vae = _tiny_sd(tmp)
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=build_tiny_cond_unet(),
                            scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(tmp / "pipe")
    (tmp / "prompts.txt").write_text("a red cat\n\nblue sky\n")
    return tmp


def test_random_conditioning_unchanged():
    """Without prompts: the random states sample_model always used (seed + batch + 1_000_003), zeros as uncond."""
    m = load_model("digits")
    m.conditioning = Conditioning((CondInput("encoder_hidden_states", (5, 3)),))
    cond, uncond = batch_conditioning(m, Trajectories(seed=7), 2, 0, 4)
    ehs, unc = cond["encoder_hidden_states"], uncond["encoder_hidden_states"]
    assert torch.equal(ehs, torch.randn((4, 5, 3), generator=torch.Generator().manual_seed(7 + 2 + 1_000_003)))
    assert torch.equal(unc, torch.zeros(4, 5, 3))


def test_sample_model_uses_the_prompts(pipeline):
    from modiff_export.models.prompts import PromptEncoder, encode_prompts

    m = load_model(str(pipeline / "pipe"))
    traj = Trajectories("ddim", 3, 3, 3, seed=0, guidance_scale=5.0,
                        prompts=encode_prompts(m, str(pipeline / "pipe"), str(pipeline / "prompts.txt")))
    enc = PromptEncoder(pipeline / "pipe")
    cond = enc.encode(["a red cat", "blue sky"])
    c, u = batch_conditioning(m, traj, 1, 3, 3)  # images 3, 4, 5 -> prompts 1, 0, 1 (cycled)
    ehs, unc = c["encoder_hidden_states"], u["encoder_hidden_states"]
    assert torch.equal(ehs, cond[[1, 0, 1]]) and torch.equal(unc, enc.negative.expand(3, -1, -1))
    cfg = QuantConfig(act_bits=8)
    x = sample_model(m, cfg, traj, progress=False)
    import copy

    from modiff_export.backends import make_runner
    from modiff_export.quant.quantization import quantize

    r = make_runner("torch", quantize(copy.deepcopy(m.unet), cfg))
    ref = generate(r, make_scheduler("ddim", m.scheduler_config), 3, 3, 0, m.sample_shape, cond[[0, 1, 0]],
                   enc.negative.expand(3, -1, -1), 5.0, progress=False)
    assert torch.equal(x, ref)


def _cli(*args):
    return subprocess.run([sys.executable, "cli.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)


@pytest.mark.slow  # three CLI runs with text encoders: ~14 s
def test_cli_prompts(pipeline, tmp_path):
    pipe, prompts = str(pipeline / "pipe"), str(pipeline / "prompts.txt")
    p = _cli("sample", "--model", pipe, "--prompts", prompts, "--steps", "2", "--batch-size", "2", "--guidance-scale",
             "4",
             "--out", str(tmp_path / "s.png"))
    assert p.returncode == 0, p.stderr[-500:]
    p = _cli("calibrate", "--model", pipe, "--prompts", prompts, "--steps", "2", "--samples", "2", "--batch-size", "2",
             "--act-bits", "4", "--method", "absmax", "--out", str(tmp_path / "c.json"), "--quiet")
    assert p.returncode == 0, p.stderr[-500:]
    assert json.loads((tmp_path / "c.json").read_text())["provenance"]["conditioning"] == "2 prompts"
    p = _cli("sample", "--prompts", prompts, "--steps", "2")  # digits: no text encoder
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].startswith("error: --prompts needs --model")
