"""The second validation model's training presets, train-demo's overwrite guard, the delta clip factor
(benchmarks/delta_clip.py) and GPTQ rounding (quant/gptq.py, calibration/hessians.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from modiff_export.config import QuantConfig
from modiff_export.models import ASSETS, EMBEDDED, load_model
from modiff_export.models.train import ARCHITECTURES, UNET_CONFIG
from modiff_export.quant.gptq import apply_gptq, gptq_quantize
from modiff_export.quant.quantization import (
    modiff_layers,
    quantize,
    quantize_codes,
    weight_scale,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import build_tiny_unet
from test_calibration import tiny_model

from cli import cli

ROOT = Path(__file__).resolve().parent.parent


def test_default_architecture_is_the_shipped_one():
    """train-demo's default preset must still describe the shipped weights' config (reproducibility)."""
    shipped = json.loads((ASSETS / "config.json").read_text())
    unet_config, sched = ARCHITECTURES["digits"]
    assert unet_config is UNET_CONFIG
    for k, v in unet_config.items():
        assert shipped[k] == (list(v) if isinstance(v, tuple) else v), k
    assert json.loads((ASSETS / "scheduler_config.json").read_text())["beta_schedule"] == sched["beta_schedule"]


def test_digits_b_differs_and_loads():
    b, _ = ARCHITECTURES["digits_b"]
    assert b["layers_per_block"] != UNET_CONFIG["layers_per_block"] and not b["add_attention"]
    if not (EMBEDDED["digits_b"] / "config.json").is_file():
        pytest.skip("digits_b assets not shipped in this checkout")
    m = load_model("digits_b")
    assert m.name == "digits_b" and m.sample_shape == (1, 16, 16)
    assert m.scheduler_config["beta_schedule"] == "linear"
    assert not any("attn" in n for n, _ in m.unet.named_modules())


def test_train_demo_refuses_to_overwrite(tmp_path):
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    res = CliRunner().invoke(cli, ["train-demo", "--out", str(tmp_path), "--what", "unet", "--steps", "1"])
    assert res.exit_code == 1 and "error:" in res.output and "--overwrite" in res.output, res.output
    assert (tmp_path / "diffusion_pytorch_model.safetensors").read_bytes() == b"x"


def test_delta_clip_scales_the_dynamic_scale():
    cfg = QuantConfig(mode="modiff", weight_bits=8, act_bits=3)
    unet = quantize(build_tiny_unet(0), cfg)
    layer = next(modiff_layers(unet))
    d = torch.randn(2, layer.inner.in_channels, 16, 16)
    s1 = layer._act_scale(d)
    layer.delta_clip = 0.5
    assert torch.allclose(layer._act_scale(d), 0.5 * s1)


def test_calibrated_clip_ratios_clip_at_3_bits():
    """benchmarks/delta_clip.py (benchmark-only ablation, loaded from its file: benchmarks are no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("delta_clip", ROOT / "benchmarks" / "delta_clip.py")
    delta_clip = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(delta_clip)
    config = QuantConfig(mode="modiff", weight_bits=8, act_bits=3)
    ratios = delta_clip.calibrate_delta_clip(tiny_model(), config, steps=4, samples=2)
    assert ratios and all(0.2 <= r <= 1.0 for r in ratios.values())
    assert sorted(ratios.values())[len(ratios) // 2] < 1.0  # absmax is not MSE-optimal at 3 bits


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    x = torch.randn(4096, 8, generator=g) @ torch.randn(8, 64, generator=g) + 0.1 * torch.randn(4096, 64, generator=g)
    h = x.T @ x / len(x)
    s = weight_scale(w, 4)
    q = gptq_quantize(w, s, 4, h)
    assert torch.equal(quantize_codes(q, s[:, None], 4) * s[:, None], q)  # on the layer's own grid
    rtn = quantize_codes(w, s[:, None], 4) * s[:, None]
    err_gptq, err_rtn = ((w - q) @ x.T).pow(2).mean(), ((w - rtn) @ x.T).pow(2).mean()
    assert err_gptq < 0.7 * err_rtn, (err_gptq, err_rtn)


def test_gptq_blocked_is_the_textbook_loop():
    """The lazy-batch form (blocks of columns, later blocks updated by one matmul) does the same float64
    arithmetic as the column-by-column loop: the same codes, whatever the block size."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 300, generator=g)
    x = torch.randn(2048, 16, generator=g) @ torch.randn(16, 300, generator=g)
    x = x + 0.1 * torch.randn(2048, 300, generator=g)  # correlated inputs: GPTQ moves many codes
    h, s = x.T @ x / len(x), weight_scale(w, 4)
    ref = gptq_quantize(w, s, 4, h, block=1)
    for block in (7, 128, 1000):
        assert torch.equal(gptq_quantize(w, s, 4, h, block=block), ref), block


def test_hessian_groups_fit_the_budget():
    from modiff_export.calibration.hessians import HessianBudgetError, _hessian_groups
    from modiff_export.quant.gptq import hessian_bytes

    unet = build_tiny_unet(0)
    names = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    biggest = max(hessian_bytes(unet, {n}) for n in names)
    groups = _hessian_groups(unet, names, budget=biggest)
    assert [n for g in groups for n in g] == names and len(groups) > 1  # every layer once, in order
    assert all(hessian_bytes(unet, set(g)) <= biggest for g in groups)
    assert _hessian_groups(unet, names, budget=10**12) == [names]  # all at once when it fits
    with pytest.raises(HessianBudgetError, match="--recipe paper"):
        _hessian_groups(unet, names, budget=biggest - 1)


def test_apply_gptq_keeps_weights_on_grid():
    unet = quantize(build_tiny_unet(0), QuantConfig(mode="modiff", weight_bits=4, act_bits=4))
    layers = [layer for layer in modiff_layers(unet) if layer.inner.weight.dim() == 2][:2]
    h = {layer.name: torch.eye(layer.inner.weight.shape[1]) for layer in layers}
    before = {layer.name: layer.quantized_weight().clone() for layer in layers}
    assert apply_gptq(unet, h) == [layer.name for layer in layers]
    for layer in layers:  # identity Hessian: GPTQ is round-to-nearest
        assert torch.equal(layer.quantized_weight(), before[layer.name])


def test_int8_io_time_recipe_keeps_ort_parity(tmp_path):
    """The recommended mixed precision (W8A3 + INT8_IO_TIME_LAYERS at W8A8) exports and matches PyTorch per
    step with the same yardstick as tests/test_ort_parity.py (rms(ort - torch) <= 1.5 x quantization error)."""
    import copy

    from test_ort_parity import _case, _fp_trajectory, rms

    from modiff_export import quantize as quantize_
    from modiff_export.backends.ort_runner import OrtRunner
    from modiff_export.backends.torch_runner import TorchRunner
    from modiff_export.calibration.recipe import INT8_IO_TIME_LAYERS
    from modiff_export.export.trace import export_model

    unet, info, ehs = _case("uncond")
    cfg = QuantConfig(weight_bits=8, act_bits=3, int8_layers=INT8_IO_TIME_LAYERS)
    manifest = export_model(info.copy(), cfg, tmp_path / "g", progress=False)
    bits = {layer.name: (layer.weight_bits, layer.act_bits) for layer in manifest.layers}
    assert bits["conv_in"] == bits["conv_out"] == bits["time_embedding.linear_1"] == (8, 8)
    assert (8, 3) in bits.values()
    ref, ort = TorchRunner(quantize_(copy.deepcopy(unet), cfg)), OrtRunner(tmp_path / "g")
    inputs, fp_preds = _fp_trajectory(unet, info, ehs, "ddim")
    for i, ((x, t), fp) in enumerate(zip(inputs, fp_preds)):
        a, b = ref(x, t, ehs), ort(x, t, ehs)
        if i:
            assert rms(a - b) <= 1.5 * max(rms(a - fp), 1e-12), f"step {i}"


@pytest.mark.parametrize("conv,shape", [
    (dict(kernel_size=3, padding=1), (3, 4, 9, 7)), (dict(kernel_size=3, stride=2, padding=1), (2, 4, 9, 8)),
    (dict(kernel_size=1), (2, 4, 5, 5)), (dict(kernel_size=3, padding=2, dilation=2), (2, 4, 6, 6)),
    (dict(kernel_size=(3, 1), padding=(1, 0)), (2, 4, 6, 6))])
def test_gathered_columns_are_im2col_rows(conv, shape):
    """GPTQ's conv rows are gathered patch by patch (only the sampled ones); they must be exactly the
    rows of im2col (F.unfold), in the same (sample, position) order, and the same random subset."""
    import torch.nn.functional as F

    from modiff_export.quant.gptq import input_rows as _columns

    m = torch.nn.Conv2d(4, 8, **conv)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    ref = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)   # [B, Cin*k*k, L]
    ref = ref.transpose(1, 2).reshape(-1, ref.shape[1])                 # [B*L, Cin*k*k]
    assert torch.equal(_columns(m, x), ref)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(_columns(m, x, 10, g1), ref[torch.randperm(ref.shape[0], generator=g2)[:10]])


def test_digits_dit_is_the_shipped_class_conditional_dit():
    """The third validation model: train-demo --arch digits_dit's preset describes the shipped weights, and
    they load as a class-conditional DiT with 10 digit classes (label 10 = the CFG null class)."""
    from modiff_export.models.train import DIT_CONFIG

    shipped = json.loads((EMBEDDED["digits_dit"] / "config.json").read_text())
    assert shipped["_class_name"] == "DiTTransformer2DModel"
    for k, v in DIT_CONFIG.items():
        assert shipped[k] == v, k
    m = load_model("digits_dit")
    assert m.num_classes == 10 and m.sample_shape == (1, 16, 16) and not m.conditional
    emb = m.unet.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert emb.num_embeddings == 11  # ten digits + the null class trained by label dropout


def test_digits_dit_b_differs_and_loads():
    """The second transformer validation model: deeper and narrower than digits_dit, digits_b's linear betas; its
    preset describes the shipped weights, class-conditional with the CFG null class."""
    from modiff_export.models.train import DIT_CONFIG, DIT_CONFIG_B, SCHEDULER_CONFIG_B

    assert DIT_CONFIG_B["num_layers"] != DIT_CONFIG["num_layers"]
    assert DIT_CONFIG_B["num_attention_heads"] != DIT_CONFIG["num_attention_heads"]
    assert ARCHITECTURES["digits_dit_b"] == (DIT_CONFIG_B, SCHEDULER_CONFIG_B)
    if not (EMBEDDED["digits_dit_b"] / "config.json").is_file():
        pytest.skip("digits_dit_b assets not shipped in this checkout")
    shipped = json.loads((EMBEDDED["digits_dit_b"] / "config.json").read_text())
    assert shipped["_class_name"] == "DiTTransformer2DModel"
    for k, v in DIT_CONFIG_B.items():
        assert shipped[k] == v, k
    m = load_model("digits_dit_b")
    assert m.name == "digits_dit_b" and m.num_classes == 10 and m.sample_shape == (1, 16, 16)
    assert m.scheduler_config["beta_schedule"] == "linear"
    assert len(m.unet.transformer_blocks) == 6
    assert m.unet.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == 11
