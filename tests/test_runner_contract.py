"""The runner contract (docs/design.md section 4), one suite over every backend that runs here.

Each backend is built for the same tiny UNet and W8A4 MoDiff config: `torch` quantizes it in memory,
graph backends run its exported folder. TensorRT needs a GPU and is covered by tests/test_engine.py.
OpenVINO runs under every distinct CPU path (backends/cpu.py: "openvino-avx2", "openvino-vnni", "openvino-vnni_bf16"),
forced, on whatever CPU runs the suite; where a path cannot be exact here, only its structure is checked.
"""
from __future__ import annotations

import pytest
import torch
from conftest import (
    INEXACT_HERE,
    NATIVE_PATH,
    OV_BACKENDS,
    backend_options,
    build_tiny_cond_unet,
    build_tiny_unet,
    exact_here,
    skip_numbers_unless_exact,
    tiny_model,
)

from modiff_export.backends import make_runner
from modiff_export.backends.base import RunnerError
from modiff_export.config import QuantConfig
from modiff_export.export.trace import export_model
from modiff_export.quant.quantization import quantize

CFG = QuantConfig(act_bits=4)
NATIVE = f"openvino-{NATIVE_PATH}"


def _paths(default: set[str], **options) -> list:
    """The OpenVINO backends of every CPU path, as (backend, options) or backend params: those in `default` in the
    default run, the others in the `slow` set (which .ci/run runs too, so every path runs on every machine)."""
    return [(b, options) if b in default else pytest.param(b, options, marks=pytest.mark.slow) for b in OV_BACKENDS]


# parity and reuse: avx2, vnni_bf16 and this CPU's own path in the default run; vnni (int8 kernels like vnni_bf16,
# f32 like avx2) in the slow set here (its parity runs by default in tests/test_openvino.py)
PARITY = {"openvino-avx2", "openvino-vnni_bf16", NATIVE} - {f"openvino-{p}" for p in INEXACT_HERE}  # AVX2 CPUs:
# int8-kernel paths check only structure there, so they go to the slow set
BACKENDS = ["torch", "ort", *[b if b in PARITY else pytest.param(b, marks=pytest.mark.slow) for b in OV_BACKENDS]]
# lifecycle and input checks (the base class's, the same on every path): this CPU's path, the others slow
GENERIC = ["torch", "ort", *[b if b == NATIVE else pytest.param(b, marks=pytest.mark.slow) for b in OV_BACKENDS]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    export_model(tiny_model(build_tiny_unet()), CFG, root / "uncond", progress=False)
    export_model(tiny_model(build_tiny_cond_unet(), "tiny-cond"), CFG, root / "cond", progress=False)
    return root


def make(backend: str, folders, kind: str = "uncond"):
    if backend == "torch":
        unet = build_tiny_unet() if kind == "uncond" else build_tiny_cond_unet()
        return make_runner("torch", quantize(unet, CFG))
    name, options = backend_options(backend)
    return make_runner(name, folder=folders / kind, **options)


def _rms(t: torch.Tensor) -> float:
    return t.double().pow(2).mean().sqrt().item()


def trajectory(n: int, batch: int = 2, shape=(1, 16, 16), seed: int = 0):
    """n smooth UNet inputs [B, C, H, W] at decreasing timesteps, as a sampler produces them."""
    g = torch.Generator().manual_seed(seed)
    x0, v = torch.randn(batch, *shape, generator=g), torch.randn(batch, *shape, generator=g)
    return [(x0 + 0.05 * i * v, 900.0 - 40.0 * i) for i in range(n)]


@pytest.mark.parametrize("backend", GENERIC)
def test_prime_step_reset_and_cache_keys(backend, folders):
    runner = make(backend, folders)
    (x0, t0), (x1, t1), (x2, t2) = trajectory(3)
    assert runner.caches() == {} and runner.batch_size is None
    with pytest.raises(RunnerError, match="step\\(\\) before prime"):
        runner.step(x0, t0)
    out = runner.prime(x0, t0)  # activates the runner on first use, whatever the backend
    assert runner.is_active and out.shape == (2, 1, 16, 16) and out.dtype == torch.float32
    caches = runner.caches()
    assert caches and all(k.endswith((".a_hat", ".o_hat")) for k in caches)
    if runner.manifest is not None:
        assert list(caches) == runner.cache_keys  # manifest order
    assert torch.allclose(caches["conv_in.a_hat"], x0)  # prime: a_hat is the input itself
    runner.step(x1, t1)
    assert not torch.allclose(runner.caches()["conv_in.a_hat"], x0) and runner.calls == 2
    runner.reset()
    assert runner.caches() == {} and runner.calls == 0


def _assert_follows(ref, runner, backend: str, calls: int) -> None:
    """`runner` against the PyTorch reference `ref` over a `calls`-call trajectory, with the yardsticks
    test_same_outputs_across_backends explains (prime: float rounding or bf16; steps: 1.5x the quantization
    error against an FP UNet)."""
    fp = make_runner("torch", quantize(build_tiny_unet(), QuantConfig(mode="fp")))
    exact = exact_here(runner)
    for i, (x, t) in enumerate(trajectory(calls)):
        a, b, f = ref(x, t), runner(x, t), fp(x, t)
        assert b.shape == a.shape and bool(torch.isfinite(b).all()), f"call {i}"
        if not exact:
            continue
        if i == 0 and backend.startswith("openvino") and runner.precision["prime"] != "f32":
            assert _rms(a - b) <= 2e-2 * _rms(a), "prime (default precision)"
        elif i == 0:
            assert (a - b).abs().max() <= 1e-4 * a.abs().max(), "prime"
        else:
            assert _rms(a - b) <= 1.5 * _rms(a - f) + 1e-6, f"call {i} ({ref.schedule()})"
    assert set(runner.caches()) == set(ref.caches())  # one cache per (layer, kind), named alike
    skip_numbers_unless_exact(runner)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_outputs_across_backends(backend, folders):
    """Every backend computes what the PyTorch reference computes. Prime: float rounding only (1e-4 of the
    output's range); OpenVINO's prime runs at the plugin's default precision (bf16 on CPUs with BF16: 8
    significant bits, 2^-9 relative per op), so there rms(backend - torch) <= 2% of rms(torch).
    Steps: a 1-ulp difference upstream can flip a rounding of the small delta, so the yardstick is the
    quantization error itself, as in tests/test_ort_parity.py: rms(backend - torch) <= 1.5 x rms(torch - FP)
    (two equally valid roundings differ by up to ~sqrt(2) x the rounding error)."""
    ref, runner = make("torch", folders), make(backend, folders)
    _assert_follows(ref, runner, backend, 4)


@pytest.mark.parametrize("backend", GENERIC)
def test_new_trajectory_is_detected(backend, folders):
    """A timestep above the last one, or another batch, starts a new trajectory in __call__ (no stale
    caches); step() refuses both with a clear error."""
    runner, fresh = make(backend, folders), make(backend, folders)
    steps = trajectory(3)
    for x, t in steps:
        runner(x, t)
    x_new, t_new = trajectory(1, seed=5)[0]
    with pytest.raises(RunnerError, match="does not continue the trajectory"):
        runner.step(x_new, t_new)
    assert torch.equal(runner(x_new, t_new), fresh(x_new, t_new))  # same as a runner that never ran
    assert runner.calls == 1
    x3, t3 = trajectory(2, batch=3, seed=6)[1]
    with pytest.raises(RunnerError, match="batch 3 does not match"):
        runner.step(x3, t3)
    assert runner(x3, t3).shape[0] == 3 and runner.calls == 1 and runner.batch_size == 3


@pytest.mark.parametrize("backend", GENERIC)
def test_bad_inputs_leave_the_caches_alone(backend, folders):
    runner = make(backend, folders)
    (x0, t0), (x1, t1) = trajectory(2)
    runner(x0, t0)
    before = runner.caches()
    bad = x1.clone()
    bad[0, 0, 0, 0] = float("nan")
    cases = [((bad, t1), "contains NaN"), ((x1[:, :, :8], t1), "the model takes"),
             ((x1[0], t1), "must be a \\[B, C, H, W\\]"), ((x1[:0], t1), "batch 0 is outside"),
             ((x1, torch.zeros(3)), "'timestep' must be a scalar or \\[B=2\\]"),
             ((x1, t1, torch.zeros(2, 77, 32)), "unconditional")]
    for args, message in cases:
        with pytest.raises(RunnerError, match=message):
            runner.step(*args)
    after = runner.caches()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("backend", GENERIC)
def test_conditional_checks(backend, folders):
    runner = make(backend, folders, "cond")
    x, t = trajectory(1, shape=(4, 8, 8))[0]
    with pytest.raises(RunnerError, match="'encoder_hidden_states' .* is required"):
        runner(x, t)
    if runner.encoder_shape is not None:  # graphs fix S and D; the PyTorch UNet takes any S
        with pytest.raises(RunnerError, match="encoder_hidden_states"):
            runner(x, t, torch.zeros(2, 5, 32))
    runner(x, t, torch.zeros(2, 77, 32))
    assert runner.calls == 1


@pytest.mark.parametrize("backend", GENERIC)
def test_lifecycle(backend, folders):
    runner = make(backend, folders)
    (x0, t0), (x1, t1) = trajectory(2)
    with runner:
        a = runner(x0, t0)
        runner(x1, t1)
    assert not runner.is_active and runner.batch_size is None  # deactivate ends the trajectory
    assert torch.equal(runner(x0, t0), a) and runner.is_active  # reusable, activates again by itself
    runner.deactivate()


# -- block reuse (docs/design.md section 1.1): every runner schedules prime / step / shallow by itself ------
REUSE = QuantConfig(act_bits=4, reuse_interval=3, reuse_depth=1)
DEEPCACHE = QuantConfig(mode="fp", reuse_interval=2, reuse_depth=2)
FORECAST = {"modiff_lin": REUSE.replace(reuse_forecast="linear"),  # design section 1.2
            "fp_lin": QuantConfig(mode="fp", reuse_interval=3, reuse_depth=1, reuse_forecast="linear"),
            "fp_r3": QuantConfig(mode="fp", reuse_interval=3, reuse_depth=1)}


@pytest.fixture(scope="module")
def reuse_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract_reuse")
    export_model(tiny_model(build_tiny_unet()), REUSE, root / "modiff", progress=False)
    export_model(tiny_model(build_tiny_unet()), DEEPCACHE, root / "fp", progress=False)
    for kind, config in FORECAST.items():
        export_model(tiny_model(build_tiny_unet()), config, root / kind, progress=False)
    return root


def make_reuse(backend: str, reuse_folders, kind: str = "modiff", **kwargs):
    if backend == "torch":
        config = {"modiff": REUSE, "fp": DEEPCACHE, **FORECAST}[kind]
        return make_runner("torch", quantize(build_tiny_unet(), config))
    name, options = backend_options(backend)
    return make_runner(name, folder=reuse_folders / kind, **options, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reuse_schedule_and_shallow_caches(backend, reuse_folders):
    """Calls 0, 3, 6 are full (prime, step, step), the others shallow; a shallow call leaves the deep layers'
    caches and the feature as the last full call wrote them and advances the outer layers' caches."""
    runner = make_reuse(backend, reuse_folders)
    steps = trajectory(7)
    with pytest.raises(RunnerError, match="shallow\\(\\) before prime"):
        runner.shallow(*steps[0])
    roles = []
    for i, (x, t) in enumerate(steps):
        roles.append(runner.schedule())
        before = runner.caches()
        runner(x, t)
        after = runner.caches()
        if roles[-1] == "shallow":
            assert torch.equal(after["up_blocks.0.feature"], before["up_blocks.0.feature"])
            assert torch.equal(after["mid_block.resnets.0.conv1.a_hat"], before["mid_block.resnets.0.conv1.a_hat"])
            assert torch.equal(after["down_blocks.0.downsamplers.0.conv.o_hat"],
                               before["down_blocks.0.downsamplers.0.conv.o_hat"])
            assert not torch.equal(after["conv_in.a_hat"], before["conv_in.a_hat"])
        elif i:
            assert not torch.equal(after["up_blocks.0.feature"], before["up_blocks.0.feature"])
    assert roles == ["prime", "shallow", "shallow", "step", "shallow", "shallow", "step"]
    if runner.manifest is not None:
        assert list(runner.caches()) == runner.cache_keys and runner.cache_keys[-1] == "up_blocks.0.feature"
    with pytest.raises(RunnerError, match="does not continue the trajectory"):
        runner.shallow(*trajectory(1, seed=3)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_reuse_same_outputs_across_backends(backend, reuse_folders):
    """Whole trajectories with reuse against the PyTorch reference, with the yardsticks of
    test_same_outputs_across_backends; DeepCache (fp) exactly up to float rounding on every call."""
    ref, runner = make_reuse("torch", reuse_folders, "fp"), make_reuse(backend, reuse_folders, "fp")
    for i, (x, t) in enumerate(trajectory(5)):
        a, b = ref(x, t), runner(x, t)
        assert (a - b).abs().max() <= 1e-4 * a.abs().max(), f"DeepCache call {i}"
    assert list(runner.caches()) == ["mid_block.feature"] and runner.schedule() == "shallow"
    ref, runner = make_reuse("torch", reuse_folders), make_reuse(backend, reuse_folders)
    _assert_follows(ref, runner, backend, 8)  # MoDiff last: it skips the numbers where a path cannot be exact


@pytest.mark.parametrize("backend, options", [("torch", {}), ("ort", {}), *_paths(PARITY),
                                              *_paths({NATIVE}, cache_mode="pingpong")])
def test_reuse_forecast_extrapolates_the_feature(backend, options, reuse_folders):
    """reuse_forecast="linear" (design section 1.2), interval 3: shallow call k after full call j reads
    F_j + k (F_j - F_j-1) / 3 (checked on the feature cache each shallow call leaves, to float rounding of
    that one expression), F_j itself while there is only one full call; so calls 0-3 are exactly those of the
    same graphs without the forecast and call 4 is not. OpenVINO: the cut stateful parts (the feature lives in a
    link tensor) and ping-pong buffers."""
    lin, plain = make_reuse(backend, reuse_folders, "modiff_lin", **options), make_reuse(backend, reuse_folders,
                                                                                         **options)
    assert lin.forecast is not None and plain.forecast is None
    full = []
    for i, (x, t) in enumerate(trajectory(7)):
        role = lin.schedule()
        a, b = lin(x, t), plain(x, t)
        feature = lin.caches()["up_blocks.0.feature"]
        if role != "shallow":
            full.append(feature)
        else:
            k = i - 3 * (len(full) - 1)
            want = full[-1] if len(full) == 1 else full[-1] + k * (full[-1] - full[-2]) / 3
            assert torch.allclose(feature, want, rtol=1e-5, atol=1e-6 * want.abs().max().item()), i
        assert torch.equal(a, b) == (i <= 3), i
    assert len(full) == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_reuse_forecast_same_outputs_across_backends(backend, reuse_folders):
    """DeepCache with the linear forecast against the PyTorch reference: full precision, so every call agrees to
    float rounding (the yardstick of the DeepCache test above); the forecast changes calls 4 and 5."""
    ref, runner = make_reuse("torch", reuse_folders, "fp_lin"), make_reuse(backend, reuse_folders, "fp_lin")
    plain = make_reuse("torch", reuse_folders, "fp_r3")
    for i, (x, t) in enumerate(trajectory(6)):
        a, b, c = ref(x, t), runner(x, t), plain(x, t)
        assert (a - b).abs().max() <= 1e-4 * a.abs().max(), f"call {i}"
        assert torch.equal(a, c) == (i <= 3), i


@pytest.mark.parametrize("backend", GENERIC)
def test_shallow_needs_a_reuse_model(backend, folders):
    runner = make(backend, folders)
    runner(*trajectory(1)[0])
    with pytest.raises(RunnerError, match="block reuse"):
        runner.shallow(*trajectory(2)[1])
