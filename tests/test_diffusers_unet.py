"""ModiffUNet inside diffusers pipelines: same images as our own loop from the same noise, caches reset
at the start of every pipeline call (DDPMPipeline on digits; a tiny StableDiffusionPipeline with CFG)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import build_tiny_cond_unet, build_tiny_dit, build_tiny_pixart

from modiff_export import QuantConfig
from modiff_export.export.trace import export_model
from modiff_export.models import LoadedModel, load_model
from modiff_export.sampling import generate, make_scheduler, with_null_class
from modiff_export.serving.diffusers_unet import ModiffUNet


def test_ddpm_pipeline_on_digits_equals_our_loop():
    from diffusers import DDPMPipeline, DDPMScheduler

    m = load_model("digits")
    cfg = QuantConfig(act_bits=4)
    unet = ModiffUNet.from_unet(m.unet, cfg)
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(m.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    images = [pipe(batch_size=2, generator=torch.Generator().manual_seed(s), num_inference_steps=8,
                   output_type="np").images
              for s in (0, 0, 1)]  # [B, H, W, C] in [0, 1]
    ours = ModiffUNet.from_unet(m.unet, cfg).runner
    for s, img in zip((0, 0, 1), images):
        x = generate(ours, make_scheduler("ddpm", m.scheduler_config), 8, 2, s, m.sample_shape, progress=False)
        # exact: same runner code, same noise, same scheduler calls; (x/2 + 0.5) is exact in float
        np.testing.assert_array_equal(img, (x / 2 + 0.5).permute(0, 2, 3, 1).numpy())
    assert unet.trajectories == 3  # one cache reset per pipeline call, detected from the timesteps
    assert not np.array_equal(images[0], images[2])


def _tiny_sd(tmp_path):
    """Text encoder, tokenizer (hand-written vocab), VAE and conditional UNet, all tiny and random."""
    pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in letters:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), pad_token="<|endoftext|>",
                        model_max_length=77)
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1)).eval()
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",),
                        latent_channels=4, norm_num_groups=8, sample_size=8).eval()
    return tok, text, vae


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_tiny_stable_diffusion_pipeline_with_ort_graphs(tmp_path, guidance):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tok, text, vae = _tiny_sd(tmp_path)
    # as in Stable Diffusion (the pipeline rewrites clip_sample=True / steps_offset=0 configs to these)
    sched_cfg = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                 "beta_end": 0.012,
                 "clip_sample": False, "steps_offset": 1}
    export_model(LoadedModel.from_unet(build_tiny_cond_unet(), "tiny-sd", sched_cfg), QuantConfig(act_bits=4),
                 tmp_path / "g", progress=False)
    unet = ModiffUNet.from_folder(tmp_path / "g", "ort", threads=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler.from_config(sched_cfg), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red cat", "blue sky"]
    latents = [pipe(prompts, height=8, width=8, num_inference_steps=5, guidance_scale=guidance, output_type="latent",
                    generator=torch.Generator().manual_seed(3)).images for _ in range(2)]
    assert unet.trajectories == 2
    assert torch.equal(latents[0], latents[1])  # second call did not inherit the first call's caches
    cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, guidance > 1.0, None)
    ours = generate(unet.runner, make_scheduler("ddim", sched_cfg), 5, 2, 3, (4, 8, 8), cond,
                    uncond if guidance > 1.0 else None, guidance, progress=False)
    # exact: the pipeline sends [uncond, cond], our loop [cond, uncond]; per-sample scales make the
    # runner batch-invariant and every call has batch >= 2 (one ORT GEMM code path)
    assert torch.equal(latents[0].clamp(-1, 1), ours)
    img = pipe(prompts, height=8, width=8, num_inference_steps=2, guidance_scale=guidance, output_type="np",
               generator=torch.Generator().manual_seed(3)).images
    assert img.shape == (2, 8, 8, 3) and np.isfinite(img).all()


def test_new_trajectory_detection():
    class Fake:
        def __init__(self):
            self.resets = 0

        def reset(self):
            self.resets += 1

        def __call__(self, sample, t, ehs):
            return sample

    r = Fake()
    u = ModiffUNet(r, {"in_channels": 1, "out_channels": 1, "sample_size": 4})
    x = torch.zeros(2, 1, 4, 4)
    for t in (999, 800, 800, 500):   # PNDM repeats a timestep: same trajectory
        u(x, torch.tensor(t))
    assert r.resets == 1
    u(x, torch.tensor(999))          # timestep went up: new pipeline call
    u(torch.zeros(3, 1, 4, 4), torch.tensor(10))  # new batch size
    assert r.resets == 3
    out = u(torch.zeros(3, 1, 4, 4), 5, return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == (3, 1, 4, 4)


def test_serve_prompts_match_the_pipeline(tmp_path):
    """serve's `prompt` input, encoded by the pipeline folder's own text encoder, gives the image the
    StableDiffusionPipeline gives for that prompt and seed (same runner, guidance with the empty prompt)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from modiff_export.models.prompts import PromptEncoder, PromptError
    from modiff_export.serving.triton_server import (
        ModiffModel,
        ServeConfig,
        load_runner,
    )

    tok, text, vae = _tiny_sd(tmp_path)
    sched_cfg = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                 "beta_end": 0.012,
                 "clip_sample": False, "steps_offset": 1}
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=build_tiny_cond_unet(),
                                   scheduler=DDIMScheduler.from_config(sched_cfg), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "pipe")
    m = load_model(str(tmp_path / "pipe"))
    export_model(m, QuantConfig(act_bits=4), tmp_path / "g", progress=False)
    cfg = ServeConfig(folder=str(tmp_path / "g"), pipeline=str(tmp_path / "pipe"), max_steps=10)
    runner, meta = load_runner(cfg)
    served = ModiffModel(runner, meta, cfg, PromptEncoder(tmp_path / "pipe"))
    req = {"seed": np.array([[5]], np.int64), "steps": np.array([[4]], np.int32), "prompt": np.array([[b"a red cat"]],
                                                                                                     object),
           "guidance_scale": np.array([[6.0]], np.float32)}
    image = served.infer([req])[0]["image"][0]  # [4, 8, 8]
    pipe.unet = ModiffUNet.from_folder(tmp_path / "g", "ort", threads=1)
    pipe.set_progress_bar_config(disable=True)
    lat = pipe("a red cat", height=8, width=8, num_inference_steps=4, guidance_scale=6.0, output_type="latent",
               generator=torch.Generator().manual_seed(5)).images[0]
    # exact: same noise (seed 5), same prompt/empty-prompt states, both UNet calls at batch 2
    np.testing.assert_array_equal(image, lat.clamp(-1, 1).numpy())
    other = served.infer([{**req, "prompt": np.array([[b"blue sky"]], object)}])[0]["image"][0]
    assert not np.array_equal(image, other)
    with pytest.raises(PromptError, match="tokenizer"):
        PromptEncoder(tmp_path / "g")


# -- diffusion transformers (issue 19) ------------------------------------------------------------------
DIT_SCHED = {"num_train_timesteps": 1000}


def _dit_pipeline(transformer, latent_channels: int = 1):
    """DiTPipeline around `transformer` with a tiny random VAE and DDIM; the VAE's decode input (the final
    latents: scaling_factor 1) is recorded in `pipe.latents_seen`, since DiTPipeline returns only
    decoded images and our loop returns (clamped) latents."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=latent_channels, norm_num_groups=8,
                        sample_size=8, scaling_factor=1.0).eval()  # 1.0: the latents reach decode unrounded
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler.from_config(DIT_SCHED))
    pipe.set_progress_bar_config(disable=True)
    pipe.latents_seen = []
    decode = vae.decode
    vae.decode = lambda z, *a, **k: (pipe.latents_seen.append(z.clone()), decode(z, *a, **k))[1]
    return pipe


def _drop_in(transformer, cfg, source: str, tmp_path):
    """ModiffUNet around `transformer`: the torch MoDiff reference, or (source "ort") an exported ORT folder."""
    if source == "torch":
        return ModiffUNet.from_unet(transformer, cfg)
    export_model(LoadedModel.from_unet(transformer, "tiny-transformer", DIT_SCHED), cfg, tmp_path / "g",
                 progress=False)
    return ModiffUNet.from_folder(tmp_path / "g", "ort", threads=1)


@pytest.mark.parametrize("source", ["torch", "ort"])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_dit_pipeline_equals_our_loop(tmp_path, source, guidance):
    """DiTPipeline with the drop-in as its transformer (the torch MoDiff reference, or an exported ORT folder)
    gives our own loop's latents from the same noise and labels, exactly: same runner, DiTPipeline's
    randn_tensor = torch.randn(shape, generator) as `generate`, guidance in one doubled batch [labels, null]
    in both (the pipeline's null class 1000 becomes the model's 10), and every runner call at batch >= 2."""
    dit, cfg = build_tiny_dit(), QuantConfig(act_bits=4)
    unet = _drop_in(dit, cfg, source, tmp_path)
    pipe = _dit_pipeline(unet)
    labels = [3, 8]
    images = [pipe(labels, guidance_scale=guidance, num_inference_steps=5, output_type="np",
                   generator=torch.Generator().manual_seed(4)).images for _ in range(2)]
    assert unet.trajectories == 2 and np.array_equal(images[0], images[1])  # caches reset per pipeline call
    assert images[0].shape == (2, 8, 8, 3) and np.isfinite(images[0]).all()
    cond, null = with_null_class(torch.tensor(labels), 10)
    ours = generate(unet.runner, make_scheduler("ddim", DIT_SCHED), 5, 2, 4, (1, 8, 8), cond, null, guidance,
                    progress=False, noise=torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(4)))
    seen = pipe.latents_seen[0][:2]  # with guidance the pipeline keeps a doubled batch and drops its 2nd half
    assert torch.equal(seen.clamp(-1, 1), ours)


def test_dit_pipeline_learned_sigma(tmp_path):
    """A learned-sigma DiT (out_channels 2): the drop-in returns [eps, zeros]; DiTPipeline splits
    out_channels // 2 and discards the zeros, so its latents are our loop's (torch reference, exact)."""
    dit = build_tiny_dit(out_channels=2)
    unet = ModiffUNet.from_unet(dit, QuantConfig(act_bits=4))
    assert unet.config.out_channels == 2
    out = unet(torch.zeros(2, 1, 8, 8), timestep=torch.tensor([10, 10]), class_labels=torch.tensor([1, 1000])).sample
    assert out.shape == (2, 2, 8, 8) and torch.equal(out[:, 1:], torch.zeros(2, 1, 8, 8))
    pipe = _dit_pipeline(unet)
    pipe([5, 6], guidance_scale=3.0, num_inference_steps=4, output_type="np",
         generator=torch.Generator().manual_seed(2))
    ours = generate(unet.runner, make_scheduler("ddim", DIT_SCHED), 4, 2, 2, (1, 8, 8),
                    *with_null_class(torch.tensor([5, 6]), 10), 3.0,
                    progress=False)
    assert torch.equal(pipe.latents_seen[0][:2].clamp(-1, 1), ours)


@pytest.mark.parametrize("source", ["torch", "ort"])
def test_pixart_alpha_pipeline_equals_our_loop(tmp_path, source):
    """PixArtAlphaPipeline with the drop-in as its transformer (learned sigma: the torch reference's config has
    out_channels 8 -> [eps, zeros], the folder's 4 -> eps) gives our loop's latents, exactly (batch-invariant
    per-sample scales; the pipeline sends [uncond, cond], we send [cond, uncond], both at batch 4). No T5
    tokenizer can be built offline here, so the pipeline gets prompt_embeds / negative_prompt_embeds and their
    padding masks (captions of 5 and 9 tokens, a negative caption of 1: a tokenizer's masks) directly;
    tokenizer and text_encoder are None. Our loop gets the same masks through generate(attention_masks=)."""
    from diffusers import AutoencoderKL, DDIMScheduler, PixArtAlphaPipeline

    pixart, cfg = build_tiny_pixart(), QuantConfig(act_bits=4)
    unet = _drop_in(pixart, cfg, source, tmp_path)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8,
                        sample_size=8).eval()
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=unet,
                               scheduler=DDIMScheduler.from_config(DIT_SCHED))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    cond, neg = torch.randn(2, 120, 24, generator=g), torch.zeros(2, 120, 24)
    mask, neg_mask = torch.zeros(2, 120, dtype=torch.int64), torch.zeros(2, 120, dtype=torch.int64)
    mask[0, :5], mask[1, :9], neg_mask[:, :1] = 1, 1, 1
    lat = pipe(prompt_embeds=cond, prompt_attention_mask=mask, negative_prompt_embeds=neg,
               negative_prompt_attention_mask=neg_mask, negative_prompt=None, guidance_scale=4.5,
               num_inference_steps=4, height=8, width=8,
               use_resolution_binning=False, output_type="latent", generator=torch.Generator().manual_seed(6)).images
    ours = generate(unet.runner, make_scheduler("ddim", DIT_SCHED), 4, 2, 6, (4, 8, 8), cond, neg, 4.5,
                    progress=False, attention_masks=(mask, neg_mask))
    assert unet.trajectories == 1 and torch.equal(lat.clamp(-1, 1), ours)
    unmasked = generate(unet.runner, make_scheduler("ddim", DIT_SCHED), 4, 2, 6, (4, 8, 8), cond, neg, 4.5,
                        progress=False)
    assert not torch.allclose(unmasked, ours, atol=1e-3), "the masks do not reach the graphs"


@pytest.mark.parametrize("source", ["torch", "ort"])
def test_padding_mask_is_applied_as_diffusers_applies_it(tmp_path, source):
    """A PixArt call's encoder_attention_mask reaches the graphs: the drop-in of an FP export (no quantization
    error) gives the diffusers model's own masked output within float rounding, for the tokenizer form [B, S]
    and the bias form [B, 1, S] (0 / -10000), and not its unmasked output."""
    import copy

    pixart = build_tiny_pixart()
    unet = _drop_in(copy.deepcopy(pixart), QuantConfig(mode="fp"), source, tmp_path)
    g = torch.Generator().manual_seed(1)
    x, ehs = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 120, 24, generator=g)
    mask = torch.zeros(2, 120, dtype=torch.int64)
    mask[0, :7], mask[1, :30] = 1, 1
    t = torch.tensor([900, 900])
    with torch.no_grad():
        kw = {"timestep": t, "encoder_hidden_states": ehs, "added_cond_kwargs": {"resolution": None,
                                                                                 "aspect_ratio": None}}
        want = pixart(x, encoder_attention_mask=mask, **kw).sample[:, :4]
        plain = pixart(x, **kw).sample[:, :4]
    bias = ((1 - mask.float()) * -10000.0).unsqueeze(1)  # [B, 1, S]
    for form in (mask, bias):
        unet.new_trajectory()
        got = unet(x, t, ehs, encoder_attention_mask=form).sample[:, :4]
        assert (got - want).abs().max() <= 1e-4 * want.abs().max(), "the masked output differs from diffusers'"
    assert (plain - want).abs().max() > 1e-2 * want.abs().max()  # the mask matters on this model


def test_padding_mask_for_graphs_without_one_is_an_error():
    """A model that takes no mask (a conditional UNet) refuses a mask with padding in one line, and accepts an
    all-ones mask, which changes nothing."""
    from modiff_export.backends import make_runner
    from modiff_export.backends.base import RunnerError
    from modiff_export.quant.quantization import quantize

    runner = make_runner("torch", quantize(build_tiny_cond_unet(), QuantConfig(act_bits=8)))
    x, ehs = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    assert runner(x, 900, ehs, torch.ones(2, 77)).shape == (2, 4, 8, 8)
    padded = torch.ones(2, 77)
    padded[:, 7:] = 0
    runner.reset()
    with pytest.raises(RunnerError, match="takes no 'encoder_attention_mask'"):
        runner(x, 900, ehs, padded)
