"""TorchRunner: the PyTorch reference behind the runner contract (backends/base.py)."""
from __future__ import annotations

import pytest
import torch

from modiff_export.backends.base import RunnerError
from modiff_export.backends.torch_runner import TorchRunner
from modiff_export.config import QuantConfig
from modiff_export.quant.quantization import list_caches, modiff_layers, quantize


def inputs(n, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, v = torch.randn(batch, 1, 16, 16, generator=g), torch.randn(batch, 1, 16, 16, generator=g)
    return [x0 + 0.05 * i * v for i in range(n)], [900.0 - 40.0 * i for i in range(n)]


def test_prime_step_reset_follow_the_contract(make_tiny_unet):
    unet = quantize(make_tiny_unet(), QuantConfig(act_bits=4))
    runner = TorchRunner(unet)
    assert runner.uses_cache and runner.keyframe_interval is None
    xs, ts = inputs(4)
    with runner:
        assert runner.is_active
        assert runner.caches() == {}
        out0 = runner.prime(xs[0], ts[0])
        assert out0.shape == (2, 1, 16, 16) and runner.batch_size == 2 and runner.calls == 1
        caches = runner.caches()
        assert list(caches) == [f"{c.layer}.{c.kind}" for c in list_caches(unet)]
        assert len(caches) == 2 * len(list(modiff_layers(unet)))
        outs = [out0] + [runner.step(x, t) for x, t in zip(xs[1:], ts[1:])]
        assert runner.calls == 4
        # step consumes and replaces the caches
        assert not torch.equal(runner.caches()["conv_in.a_hat"], caches["conv_in.a_hat"])
        # the same trajectory through plain calls of the quantized unet (auto prime, then steps)
        ref = quantize(make_tiny_unet(), QuantConfig(act_bits=4))
        with torch.no_grad():
            expect = [ref(x, t).sample for x, t in zip(xs, ts)]
        assert all(torch.equal(a, b) for a, b in zip(outs, expect))
        # __call__ picks prime after reset, step afterwards; identical trajectory again
        runner.reset()
        assert runner.caches() == {} and runner.batch_size is None and runner.calls == 0
        again = [runner(x, t) for x, t in zip(xs, ts)]
        assert all(torch.equal(a, b) for a, b in zip(again, outs))
        # prime mid-trajectory re-primes: a_hat equals the input of conv_in again
        runner.prime(xs[2], ts[2])
        assert torch.equal(runner.caches()["conv_in.a_hat"], xs[2])
    assert not runner.is_active
    assert all(l.phase is None for l in modiff_layers(unet))  # phases restored


def test_step_before_prime_raises(tiny_unet):
    runner = TorchRunner(quantize(tiny_unet, QuantConfig()))
    xs, ts = inputs(1)
    with pytest.raises(RunnerError, match=r"step\(\) before prime\(\)"):
        runner.step(xs[0], ts[0])
    runner.prime(xs[0], ts[0])
    runner.reset()
    with pytest.raises(RunnerError, match="before prime"):
        runner.step(xs[0], ts[0])


@pytest.mark.parametrize("where", ["sample", "timestep"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_input_raises_naming_the_input(tiny_unet, where, bad):
    runner = TorchRunner(quantize(tiny_unet, QuantConfig()))
    xs, ts = inputs(2)
    x, t = xs[0].clone(), torch.tensor([ts[0]] * 2)
    if where == "sample":
        x[1, 0, 3, 4] = bad
    else:
        t[1] = bad
    with pytest.raises(RunnerError, match=f"'{where}' contains NaN or Inf"):
        runner.prime(x, t)
    runner.prime(xs[0], ts[0])
    with pytest.raises(RunnerError, match=f"'{where}'"):
        runner.step(x, t)


def test_nan_encoder_hidden_states_raises(tiny_cond_unet):
    runner = TorchRunner(quantize(tiny_cond_unet, QuantConfig()))
    ehs = torch.randn(2, 7, 32)
    ehs[0, 0, 0] = float("nan")
    with pytest.raises(RunnerError, match="'encoder_hidden_states' contains NaN"):
        runner.prime(torch.randn(2, 4, 8, 8), 500, ehs)


def test_cond_runner_prime_step(tiny_cond_unet):
    runner = TorchRunner(quantize(tiny_cond_unet, QuantConfig()))
    ehs = torch.randn(2, 7, 32)
    x = torch.randn(2, 4, 8, 8)
    a = runner(x, 500, ehs)
    b = runner(x, 480, ehs)
    assert a.shape == b.shape == (2, 4, 8, 8) and runner.calls == 2
    with pytest.raises(RunnerError, match="encoder_hidden_states"):
        runner.step(x, 460, torch.randn(3, 7, 32))


def test_batch_change_without_reset(tiny_unet):
    """step() refuses another batch; __call__ takes it as a new trajectory and primes (the runner
    contract: a new trajectory never reuses the old caches)."""
    runner = TorchRunner(quantize(tiny_unet, QuantConfig()))
    xs, ts = inputs(2, batch=2)
    runner(xs[0], ts[0])
    runner(xs[1], ts[1])
    x3, _ = inputs(1, batch=3)
    with pytest.raises(RunnerError, match=r"batch 3 does not match the cached batch 2; call reset\(\)"):
        runner.step(x3[0], ts[1])
    out = runner(x3[0], ts[1])
    assert runner.calls == 1 and runner.batch_size == 3
    assert torch.equal(runner.caches()["conv_in.a_hat"], x3[0])  # primed: a_hat is the input itself
    assert out.shape[0] == 3


def test_keyframes_reprime(tiny_unet):
    unet = quantize(tiny_unet, QuantConfig(act_bits=4, keyframe_interval=2))
    runner = TorchRunner(unet)
    assert runner.keyframe_interval == 2
    xs, ts = inputs(5)
    for i, (x, t) in enumerate(zip(xs, ts)):
        runner(x, t)
        assert torch.equal(runner.caches()["conv_in.a_hat"], x) == (i % 2 == 0), i


@pytest.mark.parametrize("mode", ["fp", "ptq"])
def test_cacheless_modes_always_prime(tiny_unet, mode):
    runner = TorchRunner(quantize(tiny_unet, QuantConfig(mode=mode)))
    assert not runner.uses_cache
    xs, ts = inputs(2)
    a = runner.step(xs[0], ts[0])  # no caches: step is just a full call
    assert torch.equal(runner(xs[0], ts[0]), a)
    assert runner.caches() == {}
