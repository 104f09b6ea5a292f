"""Issue 13, items 5 and 6 through the Python API: every runner is activated the same way (by the
base class, on first use) on every backend that runs here, TensorRT without TensorRT is one clear
error, and bad inputs to a runner are a RunnerError that leaves its caches as they were.
(The general runner contract is tests/test_runner_contract.py.)"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny_unet
from reliability_util import error_line, run_cli

from modiff_export.backends import RunnerError, make_runner
from modiff_export.backends.base import MAX_BATCH
from modiff_export.config import ConfigError, QuantConfig
from modiff_export.engine import BuildInfo, TensorRTUnavailable
from modiff_export.export.trace import export_model
from modiff_export.fsutil import sha256_file
from modiff_export.models import load_model
from modiff_export.quant.quantization import quantize

CONFIG = QuantConfig(act_bits=4)
BACKENDS = ["torch", "ort"]  # every backend that runs on this CPU machine (trt: see below)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("activation") / "tiny"
    build_tiny_unet(0).save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def graphs(model_dir) -> Path:
    out = model_dir.parent / "g"
    export_model(load_model(str(model_dir)), CONFIG, out, progress=False)
    return out


def new_runner(backend: str, graphs: Path):
    if backend == "torch":
        return make_runner("torch", quantize(build_tiny_unet(0), CONFIG))
    return make_runner("ort", folder=graphs, threads=1)


def inputs(seed: int = 0, batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 1, 16, 16, generator=g) for _ in range(3)]  # 3 x [B, 1, 16, 16]


TIMESTEPS = (900.0, 800.0, 700.0)


def trajectory(runner, xs) -> list[torch.Tensor]:
    return [runner(x, t).clone() for x, t in zip(xs, TIMESTEPS)]


# -- activation --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_first_use_activates_and_deactivate_then_reuse_works(backend, graphs):
    xs = inputs()
    implicit = new_runner(backend, graphs)
    assert not implicit.is_active
    first = trajectory(implicit, xs)  # __call__ -> prime, then step, without activate()
    assert implicit.is_active and implicit.calls == 3 and implicit.caches()

    explicit = new_runner(backend, graphs)
    with explicit:
        assert explicit.is_active
        assert all(torch.equal(a, b) for a, b in zip(trajectory(explicit, xs), first))
    assert not explicit.is_active and explicit.caches() == {}

    implicit.deactivate()
    assert not implicit.is_active and implicit.batch_size is None and implicit.caches() == {}
    out = implicit.prime(xs[0], TIMESTEPS[0])  # prime after deactivate: activates again, a fresh trajectory
    assert implicit.is_active and torch.equal(out, first[0])
    assert torch.equal(implicit.step(xs[1], TIMESTEPS[1]), first[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_without_prime_is_refused_even_when_inactive(backend, graphs):
    runner = new_runner(backend, graphs)
    with pytest.raises(RunnerError, match="before prime"):
        runner.step(inputs()[0], 900.0)


@pytest.fixture
def fake_engines(graphs, tmp_path) -> Path:
    """An engine folder as build-engine writes it (manifest + build.json with digests), placeholder
    plans: everything a TrtRunner checks before it needs TensorRT."""
    folder = tmp_path / "engines"
    folder.mkdir()
    shutil.copyfile(graphs / "manifest.json", folder / "manifest.json")
    for role in ("prime", "step"):
        (folder / f"{role}.plan").write_bytes(b"placeholder plan")
    BuildInfo(tensorrt="none", options={"min_batch": 1, "opt_batch": 2, "max_batch": 4, "cuda_graph": False},
              settings={}, profiles={}, plans={r: f"{r}.plan" for r in ("prime", "step")},
              digests={r: sha256_file(folder / f"{r}.plan") for r in ("prime", "step")}).write(folder)
    return folder


def _tensorrt_installed() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_tensorrt_installed(), reason="TensorRT is installed: the runner would really start")
@pytest.mark.parametrize("use", ["prime", "call", "activate", "with"])
def test_trt_without_tensorrt_is_one_clear_error_on_first_use(fake_engines, use):
    runner = make_runner("trt", folder=fake_engines)  # constructing needs no TensorRT
    x = inputs()[0]
    with pytest.raises(TensorRTUnavailable) as ei:
        if use == "prime":
            runner.prime(x, 900.0)
        elif use == "call":
            runner(x, 900.0)
        elif use == "activate":
            runner.activate()
        else:
            with runner:
                pass
    assert "\n" not in str(ei.value) and "TensorRT is not installed" in str(ei.value)
    assert not runner.is_active


@pytest.mark.skipif(_tensorrt_installed(), reason="TensorRT is installed: the runner would really start")
@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_trt_backend_through_the_cli(fake_engines, model_dir, command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [command, "--backend", "trt", "--engines", fake_engines, "--model", model_dir, "--steps", "2",
            "--batch-size", "2"]
    code, _, err = run_cli(args + (["--num-samples", "2"] if command == "evaluate" else ["--out", "s.png"]))
    assert "TensorRT is not installed" in error_line(code, err)
    assert not (tmp_path / "s.png").exists()


# -- bad inputs to a runner: RunnerError, caches untouched --------------------------------------------
BAD = {
    "wrong-channels": lambda: (torch.zeros(2, 3, 16, 16), 900.0),
    "wrong-size": lambda: (torch.zeros(2, 1, 8, 8), 900.0),
    "3d-sample": lambda: (torch.zeros(1, 16, 16), 900.0),
    "batch-0": lambda: (torch.zeros(0, 1, 16, 16), 900.0),
    "batch-too-large": lambda: (torch.zeros(MAX_BATCH + 1, 1, 16, 16), 900.0),
    "numpy-sample": lambda: (np.zeros((2, 1, 16, 16), np.float32), 900.0),
    "timestep-wrong-length": lambda: (torch.zeros(2, 1, 16, 16), torch.tensor([900.0, 800.0, 700.0])),
    "timestep-string": lambda: (torch.zeros(2, 1, 16, 16), "nine hundred"),
    "nan-sample": lambda: (torch.full((2, 1, 16, 16), float("nan")), 900.0),
    "inf-sample": lambda: (torch.full((2, 1, 16, 16), float("inf")), 900.0),
    "nan-timestep": lambda: (torch.zeros(2, 1, 16, 16), float("nan")),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", sorted(BAD))
def test_bad_input_to_a_runner_is_a_runner_error(backend, bad, graphs):
    runner = new_runner(backend, graphs)
    sample, t = BAD[bad]()
    with pytest.raises(RunnerError) as ei:
        runner(sample, t)
    assert "\n" not in str(ei.value)
    assert runner.batch_size is None and runner.caches() == {}


@pytest.mark.parametrize("backend", BACKENDS)
def test_encoder_states_on_an_unconditional_unet(backend, graphs):
    with pytest.raises(RunnerError, match="unconditional"):
        new_runner(backend, graphs)(inputs()[0], 900.0, torch.zeros(2, 77, 32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", ["nan-sample", "inf-sample", "nan-timestep", "wrong-size"])
def test_bad_step_mid_trajectory_leaves_the_caches_as_they_were(backend, bad, graphs):
    """The issue's NaN case: a bad input after prime must not reach the caches; the trajectory then
    continues exactly as if the bad call had not happened."""
    xs = inputs()
    reference = trajectory(new_runner(backend, graphs), xs)
    runner = new_runner(backend, graphs)
    runner(xs[0], TIMESTEPS[0])
    before = runner.caches()
    sample, t = BAD[bad]()
    with pytest.raises(RunnerError):
        runner.step(sample, TIMESTEPS[1] if bad != "nan-timestep" else t)
    after = runner.caches()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(runner(xs[1], TIMESTEPS[1]), reference[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_refuses_another_batch_or_a_timestep_going_up(backend, graphs):
    runner = new_runner(backend, graphs)
    xs = inputs()
    runner.prime(xs[0], 800.0)
    with pytest.raises(RunnerError, match="batch"):
        runner.step(inputs(batch=3)[0], 700.0)
    with pytest.raises(RunnerError, match="does not continue"):
        runner.step(xs[1], 900.0)


def test_nan_output_is_an_error_and_drops_the_caches(graphs):
    """Finite inputs, NaN out (damaged weights): never a silent result."""
    unet = build_tiny_unet(0)
    with torch.no_grad():
        unet.conv_out.weight.fill_(float("nan"))
    runner = make_runner("torch", quantize(unet, QuantConfig(mode="fp")))
    with pytest.raises(RunnerError, match="NaN or Inf"):
        runner(inputs()[0], 900.0)
    assert runner.batch_size is None


@pytest.mark.parametrize("field", ["skip_layers", "int8_layers"])
@pytest.mark.parametrize("value", [None, 5, "conv_in", {"conv_in": 1}, [1, 2]])
def test_quant_config_pattern_fields_are_config_errors(field, value):
    with pytest.raises(ConfigError, match=field):
        QuantConfig(**{field: value})
