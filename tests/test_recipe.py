"""Issue 11, point 3: the recommended recipe is what the CLI does by default, for any diffusers UNet
folder: `calibrate` rounds <= 4-bit weights with GPTQ into a weights file beside the JSON, `export
--calibration` bakes exactly those codes into the int8 initializers, and the exported graphs keep
their parity with the PyTorch reference (the tolerance of tests/test_ort_parity.py, explained there:
per step, rms(ort - torch) <= 1.5 x rms(torch - fp))."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import build_tiny_cond_unet, build_tiny_unet
from safetensors.torch import load_file
from test_ort_parity import _fp_trajectory, rms
from torch import nn

from cli import cli  # noqa: E402
from modiff_export import QuantConfig, quantize
from modiff_export.backends.ort_runner import OrtRunner
from modiff_export.backends.torch_runner import TorchRunner
from modiff_export.calibration.file import load_calibration, weights_path
from modiff_export.calibration.recipe import INT8_IO_TIME_LAYERS, apply_recipe, gptq_layers, recipe_int8_layers
from modiff_export.manifest import Manifest
from modiff_export.models import LoadedModel
from modiff_export.quant.quantization import modiff_layers


def test_recipe_adds_only_the_layers_a_model_has():
    toy = nn.Module()
    toy.conv_in, toy.proj = nn.Conv2d(1, 4, 3), nn.Linear(4, 4)
    a4 = QuantConfig(act_bits=4)
    assert recipe_int8_layers(a4, toy) == ("conv_in",)  # no conv_out / time embedding here: not an error
    assert apply_recipe(a4, toy, "paper") == a4
    assert apply_recipe(QuantConfig(), toy) == QuantConfig()  # W8A8: W8A8 layers would change nothing
    assert apply_recipe(QuantConfig(mode="fp", act_bits=4), toy).int8_layers == ()
    assert apply_recipe(a4.replace(int8_layers=("proj",)), toy).int8_layers == ("proj", "conv_in")  # user's stay
    for unet in (build_tiny_unet(), build_tiny_cond_unet()):  # diffusers UNets have all four
        assert recipe_int8_layers(a4, unet) == INT8_IO_TIME_LAYERS
        w4 = apply_recipe(QuantConfig(weight_bits=4, act_bits=4), unet)
        every = [n for n, m in unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert gptq_layers(w4, unet) == every == gptq_layers(a4, unet)  # W8 weights too (docs/quality.md)
        assert gptq_layers(w4.replace(skip_layers=("conv_in",)), unet) == every[1:]  # skipped: full precision
        assert gptq_layers(w4, unet, "paper") == [] and gptq_layers(QuantConfig(mode="fp"), unet) == []


def _save(kind: str, folder: Path) -> nn.Module:
    unet = build_tiny_unet() if kind == "uncond" else build_tiny_cond_unet()
    unet.save_pretrained(str(folder), safe_serialization=True)
    (folder / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler",
                                                              "num_train_timesteps": 1000}))
    return unet


def _run(*args) -> None:
    res = CliRunner().invoke(cli, [str(a) for a in args] + ["--quiet"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("kind", ["uncond", "cond"])
def test_default_cli_path_bakes_gptq_weights_and_keeps_parity(tmp_path, kind):
    unet = _save(kind, tmp_path / "model")
    bits = ["--model", tmp_path / "model", "--weight-bits", "4", "--act-bits", "4"]
    _run("calibrate", *bits, "--steps", "4", "--samples", "2", "--batch-size", "2", "--out", tmp_path / "cal.json")
    d = json.loads((tmp_path / "cal.json").read_text())
    cfg = apply_recipe(QuantConfig(weight_bits=4, act_bits=4), unet)
    assert d["weights"]["layers"] == sorted(gptq_layers(cfg, unet))
    if kind == "cond":  # attention Linears on [B, S, D] inputs and cross-attention on encoder states too
        assert any(n.endswith("attn2.to_k") for n in d["weights"]["layers"])
    _run("export", *bits, "--calibration", tmp_path / "cal.json", "--out", tmp_path / "g")

    m = Manifest.load(tmp_path / "g")
    assert m.quant_config == cfg and m.quant_config.int8_layers == INT8_IO_TIME_LAYERS
    assert sorted(lay.name for lay in m.layers if lay.weight_rounding == "gptq") == d["weights"]["layers"]
    # the graph's int8 initializers are exactly the stored GPTQ codes, and GPTQ did change them
    stored = load_file(str(weights_path(tmp_path / "cal.json")))
    graph = onnx.load(str(tmp_path / "g" / "step.onnx")).graph
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    nearest = {l.name: l.weight_codes() for l in modiff_layers(quantize(copy.deepcopy(unet), cfg))}
    changed = 0
    for name in d["weights"]["layers"]:
        codes, got = stored[f"{name}.codes"].numpy(), inits[f"{name}.weight.int8"]
        assert np.array_equal(got, codes) or np.array_equal(got.T, codes), name  # MatMul stores W^T
        changed += int((nearest[name] != torch.from_numpy(codes).float()).any())
    assert changed >= len(d["weights"]["layers"]) // 2, f"GPTQ changed only {changed} layers"

    # `sample/evaluate --backend torch --calibration F` quantize with the same recipe and GPTQ weights
    from modiff_export.commands.sample import resolve

    options = {"model": str(tmp_path / "model"), "backend": "torch", "graphs": None, "engines": None,
               "weight_bits": 4, "act_bits": 4, "scheduler": "ddim", "steps": 2, "batch_size": 1, "seed": 0,
               "guidance_scale": 1.0, "prompts": None}
    resolved, _ = resolve(options, str(tmp_path / "cal.json"))
    torch_cfg, runner = resolved.config, resolved.runner
    assert torch_cfg == cfg
    assert sorted(l.name for l in modiff_layers(runner.unet) if l.weight_rounding == "gptq") == d["weights"]["layers"]

    # parity: the PyTorch reference with the same calibration file vs ONNX Runtime, per step
    ref_unet = quantize(copy.deepcopy(unet), cfg)
    load_calibration(tmp_path / "cal.json", LoadedModel.from_unet(unet, "m").content_hash, cfg).apply(ref_unet)
    ref, ort = TorchRunner(ref_unet), OrtRunner(tmp_path / "g")
    ehs = None
    if kind == "cond":
        ehs = torch.randn(4, 77, 32, generator=torch.Generator().manual_seed(7))  # [B, S, D]
    inputs, fp_preds = _fp_trajectory(unet, LoadedModel.from_unet(unet, "m"), ehs, "ddim")
    for i, ((x, t), fp) in enumerate(zip(inputs, fp_preds)):
        a, b = ref(x, t, ehs), ort(x, t, ehs)
        if i == 0:  # prime: float32 summation order only
            assert (a - b).abs().max() <= 1e-4 * a.abs().max()
        else:
            assert rms(a - b) <= 1.5 * rms(a - fp), f"step {i}"

    # `serve --backend torch --graphs g` (resolve.py): the PyTorch reference *of the folder* reads the weights
    # back from its graphs, so it computes exactly what the calibration-file reference computes; the
    # folder's config alone (nearest rounding) would not
    from modiff_export.backends import RunnerError
    from modiff_export.resolve import RunnerOptions, resolve_runner

    of_folder = resolve_runner(RunnerOptions("torch", str(tmp_path / "model"), str(tmp_path / "g"))).runner
    got = {l.name: l.quantized_weight() for l in modiff_layers(of_folder.unet)}
    want = {l.name: l.quantized_weight() for l in modiff_layers(ref_unet)}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    plain = {l.name: l.quantized_weight() for l in modiff_layers(quantize(copy.deepcopy(unet), cfg))}
    assert sum(not torch.equal(plain[k], want[k]) for k in want) >= len(want) // 2
    ref.reset()
    for x, t in inputs[:3]:
        assert torch.equal(of_folder(x, t, ehs), ref(x, t, ehs))
    # an ONNX Runtime variant folds the int8 codes to floats: refused rather than served with other weights
    from modiff_export.export.ort_variant import write_variant

    write_variant(tmp_path / "g", tmp_path / "g-ort")
    with pytest.raises(RunnerError, match="cannot be reproduced on torch"):
        resolve_runner(RunnerOptions("torch", str(tmp_path / "model"), str(tmp_path / "g-ort")))
