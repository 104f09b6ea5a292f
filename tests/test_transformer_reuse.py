"""Block reuse for diffusion transformers (issue 33; docs/design.md sections 1.1-1.2): the middle blocks'
residual as the reused feature, the depth rule, the warmup schedule, the Taylor forecast's arithmetic, module ==
runner bit for bit, ORT / OpenVINO parity with the PyTorch reference, and bad input."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    OV_BACKENDS,
    backend_options,
    build_tiny_dit,
    build_tiny_flux,
    build_tiny_pixart,
    build_tiny_sd3,
    build_tiny_unet,
    skip_numbers_unless_exact,
    tiny_model,
)

from modiff_export.backends import make_runner
from modiff_export.backends.torch_runner import TorchRunner
from modiff_export.config import ConfigError, QuantConfig
from modiff_export.export.trace import export_model
from modiff_export.models import denoiser
from modiff_export.quant.forecast import Forecast
from modiff_export.quant.quantization import call_role, modiff_layers, quantize
from modiff_export.quant.reuse import ReuseError, deep_branch

BUILD = {"dit": lambda: build_tiny_dit(num_layers=3), "pixart": lambda: build_tiny_pixart(num_layers=3),
         "sd3": lambda: build_tiny_sd3(num_layers=3), "flux": lambda: build_tiny_flux(num_single_layers=2)}
TAYLOR = QuantConfig(act_bits=8, reuse_interval=3, reuse_depth=1, reuse_forecast="taylor", reuse_warmup=2)


def _inputs(model, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    hw = denoiser.sample_hw(model)
    shape = denoiser.graph_shape(denoiser.latent_channels(model), hw, denoiser.packed(model))
    cond = denoiser.conditioning_of(model).example(batch, hw, g)
    return torch.randn(batch, *shape, generator=g), torch.randn(batch, *shape, generator=g), cond


# -- the rules --------------------------------------------------------------------------------------
def test_deep_branch_of_transformers():
    """Depth D computes D blocks at each end (FLUX: double then single blocks); 0 reuses every block."""
    assert deep_branch(build_tiny_dit(num_layers=5), 2) == (("transformer_blocks.2",), "transformer_blocks.2")
    assert deep_branch(build_tiny_dit(num_layers=2), 0) == (("transformer_blocks.0", "transformer_blocks.1"),
                                                             "transformer_blocks.1")
    assert deep_branch(build_tiny_flux(num_single_layers=2), 1) == (
        ("single_transformer_blocks.0",), "single_transformer_blocks.0")
    with pytest.raises(ReuseError, match=r"reuse_depth 2 is outside 0..1: DiTTransformer2DModel has 4"):
        deep_branch(build_tiny_dit(num_layers=4), 2)
    with pytest.raises(ReuseError, match="outside 1..2"):  # a UNet has nothing to compute at depth 0
        deep_branch(build_tiny_unet(), 0)


def test_dit_final_layer_embedding_is_never_deep():
    """DiT's final layer calls transformer_blocks[0].norm1.emb itself: with every block reused (D = 0) those layers
    still run on shallow calls, so they are outer layers (their caches are the shallow graph's)."""
    q = quantize(build_tiny_dit(), QuantConfig(act_bits=8, reuse_interval=2, reuse_depth=0))
    names = [layer.name for layer in modiff_layers(q)]
    emb = [n for n in names if n.startswith("transformer_blocks.0.norm1.emb")]
    assert emb and not any(q.modiff_reuse.is_deep(n) for n in emb)
    assert q.modiff_reuse.is_deep("transformer_blocks.0.attn1.to_q") and not q.modiff_reuse.is_deep("proj_out_1")


def test_warmup_schedule():
    """The first W calls are full, then the schedule starts again at call W (full at W, W + N, ...); the module and
    the runners share the rule (call_role)."""
    roles = [call_role(i, None, 3, True, 2) for i in range(9)]
    assert roles == ["prime", "step", "step", "shallow", "shallow", "step", "shallow", "shallow", "step"]
    assert [call_role(i, None, 3, True) for i in range(4)] == ["prime", "shallow", "shallow", "step"]
    with pytest.raises(ConfigError, match="reuse_warmup=2 delays block reuse"):
        QuantConfig(reuse_warmup=2)
    with pytest.raises(ConfigError, match="reuse_warmup=-1"):
        QuantConfig(reuse_interval=2, reuse_depth=0, reuse_warmup=-1)
    assert TAYLOR.tag == "modiff-w8a8-r3d1-tay-wu2"


def test_taylor_forecast_arithmetic():
    """Second order from finite differences over the actual gaps between full calls (warmup: 1 call, then N):
    exact on a quadratic trajectory sampled at uniform gaps, and the documented formula at uneven ones."""
    f = Forecast(3, order=2)
    F = lambda t: 2.0 + 0.5 * t - 0.25 * t * t  # noqa: E731  (a quadratic in the call index)
    for t in (0, 3, 6):
        f.full(torch.tensor([F(t)]))
        if t < 6:
            f.reused(), f.reused()
    # at uniform gaps N the finite differences are the derivatives at t - N/2 and the curvature: F(6 + k) of the
    # Taylor form is F(6) + k F'(6 - N/2) + k^2/2 F'' (TaylorSeer's; not the exact quadratic, the derivative lags)
    for k in (1, 2):
        expect = F(6) + k * (0.5 - 0.5 * (6 - 1.5)) + k * k / 2 * (-0.5)
        assert f.reused().item() == pytest.approx(expect, rel=1e-6)
    g = Forecast(3, order=2)  # uneven: full calls at 0, 1 (warmup), 4
    for t, reused in ((0, 0), (1, 2), (4, 0)):
        g.full(torch.tensor([F(t)]))
        for _ in range(reused):
            g.reused()
    d1_old, d1 = F(1) - F(0), (F(4) - F(1)) / 3
    assert g.reused().item() == pytest.approx(F(4) + d1 + 0.5 * (d1 - d1_old) / 2, rel=1e-6)
    lin = Forecast(3, order=1)
    lin.full(torch.tensor([1.0]))
    assert lin.reused() is None  # one full call: the recorded feature itself
    lin.full(torch.tensor([4.0]))
    assert lin.reused().item() == pytest.approx(5.5)  # d1 = (4 - 1) / 2 calls (one reused call between)


# -- the reference ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(BUILD))
def test_shallow_call_reuses_the_middle_residual(kind):
    """FP, D = 1: a shallow call with the inputs of the full call before it returns exactly that call's output (the
    outer blocks see the same entry and the recorded residual); with other inputs the outer blocks' change shows,
    and the deep blocks are not called."""
    model = BUILD[kind]()
    q = quantize(model, QuantConfig(mode="fp", reuse_interval=2, reuse_depth=1)).eval()
    x, x2, cond = _inputs(q)
    calls = []
    deep = q.get_submodule(q.modiff_reuse.deep_prefixes[0])
    handle = next(m for m in deep.modules() if isinstance(m, torch.nn.Linear)).register_forward_hook(
        lambda *a: calls.append(1))
    with torch.no_grad():
        full = denoiser.call(q, x, torch.full((2,), 900.0), cond)
        n_full = len(calls)
        same = denoiser.call(q, x, torch.full((2,), 900.0), cond)
    assert q.modiff_reuse.reusing and n_full > 0 and len(calls) == n_full
    assert torch.equal(full, same)
    q.modiff_reuse.reset()
    with torch.no_grad():
        denoiser.call(q, x, torch.full((2,), 900.0), cond)
        other = denoiser.call(q, x2, torch.full((2,), 880.0), cond)
        q.modiff_reuse.reset()
        exact = denoiser.call(q, x2, torch.full((2,), 880.0), cond)
    assert not torch.equal(other, full) and not torch.equal(other, exact)
    handle.remove()


@pytest.mark.parametrize("kind", list(BUILD))
def test_module_equals_runner_bit_for_bit(kind):
    """The quantized module scheduling itself (a diffusers pipeline: warmup, interval, Taylor forecast applied by the
    module) and the PyTorch runner (which sets the phase and forecasts itself) compute the same bits, and the deep
    layers' caches keep what the last full call wrote across the shallow calls (the next full delta spans them)."""
    model = BUILD[kind]()
    a = quantize(copy.deepcopy(model), TAYLOR).eval()
    runner = TorchRunner(quantize(copy.deepcopy(model), TAYLOR))
    x, v, cond = _inputs(a)
    deep = next(layer for layer in modiff_layers(a) if a.modiff_reuse.is_deep(layer.name) and layer.uses_cache)
    roles = []
    with torch.no_grad():
        for i in range(9):
            roles.append(runner.schedule())
            before = None if deep.a_hat is None else deep.a_hat.clone()
            t = torch.full((2,), 900.0 - 50 * i)
            out = denoiser.call(a, x + 0.05 * i * v, t, cond)
            assert torch.equal(out, runner(x + 0.05 * i * v, t, cond)), f"call {i} ({roles[-1]})"
            if roles[-1] == "shallow":
                assert torch.equal(deep.a_hat, before)
    assert roles == ["prime", "step", "step", "shallow", "shallow", "step", "shallow", "shallow", "step"]


# -- the graphs ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    root = tmp_path_factory.mktemp("treuse")
    out = {}
    for kind in ("dit", "flux", "sd3"):
        model = tiny_model(BUILD[kind](), kind)
        export_model(model.copy(), TAYLOR, root / kind, progress=False)
        out[kind] = (model, root / kind)
    return out


@pytest.mark.parametrize("backend", ["ort", *OV_BACKENDS])
@pytest.mark.parametrize("kind", ["dit", "flux", "sd3"])
def test_cross_backend_parity(graphs, kind, backend):
    """Per call against the PyTorch reference (warmup 2, interval 3, D = 1, Taylor): the prime within float rounding;
    every step and shallow call within 1.5 x the quantization error of the same schedule (W8A8 against FP in
    PyTorch) + a float floor, the bound of the SDXL reuse test: a rounding flip of an 8-bit code between two
    float evaluation orders moves an output by about one quantization step, so the two backends' outputs differ
    by at most about what quantization itself adds. The OpenVINO runner runs the cut stateful form (backends/
    ov_split.py), which must find the residual between its parts."""
    model, folder = graphs[kind]
    name, opts = backend_options(backend)
    run = make_runner(name, folder=folder, **({"threads": 1, "precision": "f32", **opts} if name == "openvino" else {}))
    ref = TorchRunner(quantize(copy.deepcopy(model.unet), TAYLOR))
    fp = TorchRunner(quantize(copy.deepcopy(model.unet), TAYLOR.replace(mode="fp")))
    x, v, cond = _inputs(model.unet)
    roles = []
    for i in range(8):
        roles.append(ref.schedule())
        xi, t = x + 0.05 * i * v, 900.0 - 50 * i
        a, b, f = ref(xi, t, cond), run(xi, t, cond), fp(xi, t, cond)
        if i == 0:
            skip_numbers_unless_exact(run)
        err, q = (a - b).pow(2).mean().sqrt().item(), (a - f).pow(2).mean().sqrt().item()
        bound = 1e-4 * a.abs().max().item() if i == 0 else 1.5 * q + 1e-5
        assert err <= bound, f"{backend} call {i} ({roles[-1]}): rms {err:.2e} > {bound:.2e}"
    assert roles.count("shallow") == 4
    if name == "openvino":
        assert run._split  # the stateful cut, not the ping-pong fallback


# -- bad input ----------------------------------------------------------------------------------------
def test_export_refuses_a_depth_the_transformer_cannot_take(tmp_path):
    model = tiny_model(build_tiny_dit(num_layers=3), "dit")
    with pytest.raises(Exception, match=r"reuse_depth 2 is outside 0..1"):
        export_model(model, QuantConfig(act_bits=8, reuse_interval=2, reuse_depth=2), tmp_path / "g", progress=False)
    assert not (tmp_path / "g").exists()
