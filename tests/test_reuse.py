"""Block reuse (DeepCache-style, docs/design.md section 1.1): the config, the deep branch of the PyTorch
reference, the error-compensation ablation, the shallow graph and its manifest entry, cost accounting, and the
OpenVINO rewrite's sharing rule. Runner scheduling and parity: tests/test_runner_contract.py."""
from __future__ import annotations

import json

import onnx
import pytest
import torch
from conftest import build_tiny_cond_unet, build_tiny_unet, path_params, skip_numbers_unless_exact, tiny_model

from modiff_export.backends import make_runner
from modiff_export.backends.base import RunnerError
from modiff_export.config import ConfigError, QuantConfig
from modiff_export.evaluation import cost
from modiff_export.export import ov_variant
from modiff_export.export.trace import ExportError, export_model
from modiff_export.manifest import Manifest, ManifestError
from modiff_export.quant.quantization import call_role, modiff_layers, quantize
from modiff_export.quant.reuse import ReuseError, deep_branch

W8A4 = QuantConfig(act_bits=4)


def traj(n: int, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0, v = torch.randn(batch, 1, 16, 16, generator=g), torch.randn(batch, 1, 16, 16, generator=g)
    return [(x0 + 0.05 * i * v, 900.0 - 40.0 * i) for i in range(n)]


@pytest.mark.parametrize("fields, message", [
    ({"reuse_interval": 0, "reuse_depth": 1}, "reuse_interval=0"),
    ({"reuse_interval": 2, "reuse_depth": -1}, "reuse_depth=-1"),
    ({"reuse_interval": 2}, "needs both"),
    ({"reuse_depth": 1}, "needs both"),
    ({"reuse_interval": True, "reuse_depth": 1}, "reuse_interval=True"),
    ({"reuse_interval": 2, "reuse_depth": 1, "keyframe_interval": 5}, "cannot be combined"),
    ({"reuse_interval": 2, "reuse_depth": 1, "scale_mode": "static"}, "cannot be combined with block reuse"),
    ({"reuse_compensation": False}, "ablation"),
    ({"reuse_forecast": "linear"}, "needs reuse_interval"),
    ({"reuse_interval": 2, "reuse_depth": 1, "reuse_forecast": "cubic"}, "reuse_forecast='cubic'"),
    ({"mode": "fp", "reuse_interval": 2, "reuse_depth": 1, "reuse_compensation": False}, "ablation"),
])
def test_config_refuses_bad_reuse(fields, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig(**fields)


def test_config_tag_and_round_trip():
    c = W8A4.replace(reuse_interval=3, reuse_depth=2, reuse_compensation=False)
    assert c.tag == "modiff-w8a4-r3d2-nocomp" and QuantConfig(mode="fp", reuse_interval=2, reuse_depth=1).tag == \
        "fp-r2d1"
    assert QuantConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c and c.reuses and not W8A4.reuses
    lin = c.replace(reuse_forecast="linear")
    assert lin.tag == "modiff-w8a4-r3d2-nocomp-lin" and QuantConfig.from_dict(lin.to_dict()) == lin


def test_deep_branch_of_both_unet_classes():
    unet = build_tiny_unet()
    assert deep_branch(unet, 1) == (("down_blocks.0.downsamplers", "down_blocks.1", "mid_block", "up_blocks.0"),
                                    "up_blocks.0")
    assert deep_branch(unet, 2) == (("mid_block",), "mid_block")
    with pytest.raises(ReuseError, match="reuse_depth 3 is outside 1..2"):
        deep_branch(unet, 3)
    with pytest.raises(ReuseError, match="outside 1..2"):
        quantize(build_tiny_cond_unet(), W8A4.replace(reuse_interval=2, reuse_depth=3))
    cond = quantize(build_tiny_cond_unet(), QuantConfig(mode="fp", reuse_interval=2, reuse_depth=1))
    ehs, x = torch.randn(1, 77, 32), torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        full, shallow = cond(x, 900.0, ehs).sample, cond(x, 800.0, ehs).sample
    assert cond.modiff_reuse.reusing and not torch.equal(full, shallow)


def test_reference_skips_the_deep_branch_on_shallow_calls():
    """Deep layers are not called on shallow calls (their caches stay as the last full call left them);
    interval 1 is no reuse; DeepCache's full calls are exactly full precision."""
    unet = quantize(build_tiny_unet(), W8A4.replace(reuse_interval=3, reuse_depth=1))
    layers = {layer.name: layer for layer in modiff_layers(unet)}
    with torch.no_grad():
        for x, t in traj(5):
            unet(x, t)
    assert layers["mid_block.resnets.0.conv1"].calls == 2 and layers["conv_in"].calls == 5
    assert layers["down_blocks.0.downsamplers.0.conv"].calls == 2 and layers["up_blocks.1.resnets.0.conv1"].calls == 5
    plain, every = quantize(build_tiny_unet(), W8A4), quantize(build_tiny_unet(), W8A4.replace(reuse_interval=1,
                                                                                               reuse_depth=1))
    fp = quantize(build_tiny_unet(), QuantConfig(mode="fp"))
    dc = quantize(build_tiny_unet(), QuantConfig(mode="fp", reuse_interval=2, reuse_depth=1))
    with torch.no_grad():
        for i, (x, t) in enumerate(traj(5)):
            assert torch.equal(plain(x, t).sample, every(x, t).sample)
            a, b = fp(x, t).sample, dc(x, t).sample
            assert torch.equal(a, b) == (i % 2 == 0)


def test_module_forecast_equals_the_runners():
    """reuse_forecast="linear" on the quantized module alone (it schedules itself: a diffusers pipeline) computes
    exactly what the runner's forecast computes (design section 1.2), and differs from plain reuse from the
    first shallow call after the second full call (call 4 at interval 3) on."""
    from modiff_export.backends import make_runner

    config = W8A4.replace(reuse_interval=3, reuse_depth=1, reuse_forecast="linear")
    alone = quantize(build_tiny_unet(), config)
    plain = quantize(build_tiny_unet(), config.replace(reuse_forecast="none"))
    runner = make_runner("torch", quantize(build_tiny_unet(), config))
    with torch.no_grad():
        for i, (x, t) in enumerate(traj(7)):
            a, b, c = alone(x, t).sample, runner(x, t), plain(x, t).sample
            assert torch.equal(a, b), i
            assert torch.equal(a, c) == (i <= 3), i


def test_no_compensation_ablation_differs_from_the_second_step_on():
    comp = quantize(build_tiny_unet(), W8A4.replace(reuse_interval=2, reuse_depth=1))
    nocomp = quantize(build_tiny_unet(), W8A4.replace(reuse_interval=2, reuse_depth=1, reuse_compensation=False))
    flags = {layer.name: layer.compensates for layer in modiff_layers(nocomp)}
    assert not flags["mid_block.resnets.0.conv1"] and not flags["up_blocks.0.resnets.0.conv1"] and flags["conv_in"]
    with torch.no_grad():
        for i, (x, t) in enumerate(traj(6)):
            a, b = comp(x, t).sample, nocomp(x, t).sample
            # prime, shallow, first step, shallow: identical; the step at call 4 is the first to read the deep
            # layers' a_hat written by a step (a_hat + Q(d) against x)
            assert torch.equal(a, b) == (i <= 3), i


def test_call_role_and_cost():
    assert [call_role(i, None, 3, True) for i in range(7)] == ["prime", "shallow", "shallow", "step", "shallow",
                                                               "shallow", "step"]
    assert [call_role(i, None, 2, False) for i in range(4)] == ["prime", "shallow", "prime", "shallow"]
    unet = build_tiny_unet()
    macs = cost.count_macs(unet, torch.zeros(1, 1, 16, 16), torch.tensor(500))
    deep_prefixes, _ = deep_branch(unet, 1)
    deep = frozenset(m.name for m in macs if any(m.name.startswith(p + ".") for p in deep_prefixes))
    cfg = W8A4.replace(reuse_interval=3, reuse_depth=1)
    prime, step = cost.bops_per_call(macs, cfg, "prime"), cost.bops_per_call(macs, cfg, "step")
    shallow = cost.bops_per_call(macs, cfg, "shallow", deep)
    assert 0 < shallow < step and cost.bops_per_trajectory(macs, cfg, 7, deep) == prime + 2 * step + 4 * shallow
    with pytest.raises(ValueError, match="deep-branch layer names"):
        cost.bops_per_trajectory(macs, cfg, 7)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("reuse") / "g"
    export_model(tiny_model(build_tiny_unet()), W8A4.replace(reuse_interval=2, reuse_depth=1), out, progress=False)
    return out


def test_shallow_graph_and_manifest(folder):
    m = Manifest.load(folder)
    assert m.roles == ["prime", "step", "shallow"] and m.reuse.interval == 2 and m.reuse.depth == 1
    assert m.reuse.feature.key == "up_blocks.0.feature" and "mid_block.resnets.0.conv1" in m.reuse.deep_layers
    graph = onnx.load(str(folder / "shallow.onnx"), load_external_data=False).graph
    ins, outs = [i.name for i in graph.input], [o.name for o in graph.output]
    assert ins == [s.name for s in m.graph_inputs("shallow")] and ins[-1] == "cache_in.up_blocks.0.feature"
    assert "cache_in.mid_block.resnets.0.conv1.a_hat" not in ins and "cache_in.conv_in.a_hat" in ins
    assert outs == [s.name for s in m.graph_outputs("shallow")] and "cache_out.up_blocks.0.feature" not in outs
    assert "cache_out.up_blocks.0.feature" in [s.name for s in m.graph_outputs("step")]
    assert m.cache_bytes_per_sample == 4 * sum(_numel(c) for c in m.buffers)  # the feature is a cache too
    assert m.buffers[-1] == m.reuse.feature and _numel(m.reuse.feature) == 32 * 16 * 16


def _numel(c) -> int:
    n = 1
    for d in c.concrete(1):
        n *= d
    return n


@pytest.mark.parametrize("change, message", [
    (lambda d: d["reuse"].update(interval=5), "differ from quant_config"),
    (lambda d: d.update(reuse=None), "shallow graph is listed exactly"),
    (lambda d: d["graphs"].pop("shallow"), "shallow graph is listed exactly"),
    (lambda d: d["reuse"].update(deep_layers=["nope"]), "does not have"),
    (lambda d: d["reuse"]["feature"].update(kind="a_hat"), "kind"),
])
def test_manifest_refuses_inconsistent_reuse(folder, tmp_path, change, message):
    d = json.loads((folder / "manifest.json").read_text())
    change(d)
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(d)


def test_export_refuses_a_depth_beyond_the_blocks(tmp_path):
    with pytest.raises(ExportError, match="reuse_depth 4 is outside 1..2"):
        export_model(tiny_model(build_tiny_unet()), W8A4.replace(reuse_interval=2, reuse_depth=4), tmp_path / "g",
                     progress=False)
    assert not (tmp_path / "g").exists()


def test_ov_share_lever_never_mixes_deep_and_outer_layers(folder):
    """The time-embedding projections of deep and outer resnets read the same tensor with the same quantizer,
    but their a_hat caches advance on different calls: "share" must keep them apart (measured: without the
    groups, OpenVINO's step output differed from the reference by 1.4x the quantization error)."""
    m = Manifest.load(folder)
    deep = set(m.reuse.deep_layers)
    groups = {c.input: "deep" if c.layer in deep else "outer" for c in m.caches}

    def shared(groups):
        proto = onnx.load(str(folder / "step.onnx"))
        ov_variant.rewrite(proto, ("share",), groups)
        nodes = [n for n in proto.graph.node if n.name.endswith("/shared_a_hat")]
        return [(_layer(n.input[0]) in deep, _layer(n.output[0]) in deep) for n in nodes]

    assert any(a != b for a, b in shared(None))  # the hazard exists in this graph
    assert shared(groups) and all(a == b for a, b in shared(groups))


def _layer(cache_out: str) -> str:
    assert cache_out.startswith("cache_out.") and cache_out.endswith(".a_hat"), cache_out
    return cache_out[len("cache_out."):-len(".a_hat")]


def test_openvino_reuse_cache_modes(folder):
    """Static shapes: stateful caches (the step graph cut into three stateful parts, backends/ov_split.py);
    dynamic shapes cannot cut per batch, so they take ping-pong caches and refuse stateful ones."""
    assert make_runner("openvino", folder=folder).cache_mode == "stateful"
    assert make_runner("openvino", folder=folder, static_shapes=False).cache_mode == "pingpong"
    with pytest.raises(RunnerError, match="needs static shapes"):
        make_runner("openvino", folder=folder, cache_mode="stateful", static_shapes=False)


@pytest.mark.parametrize("cpu_path", path_params(["avx2", "vnni"]))
def test_openvino_cut_step_graph_equals_pingpong(folder, cpu_path):
    """The three stateful parts compute what the step and shallow graphs with explicit cache I/O compute: same
    compiled ops, only cut, so outputs and caches agree to float rounding (1e-5 relative: the same kernels on
    the same values; the codes could differ only at exact ties). It fails if a shallow call ran the deep part
    (its caches would advance) or if outer_out read a stale or missing feature. Under both int8 choices of
    backends/cpu.py, forced: the u8-code rewrite of AVX2 CPUs leaves unnamed tensors that the cut must name
    (before it did, this failed there with a KeyError on a link)."""
    from modiff_export.backends import ov_split

    opts = dict(precision="f32", prime_precision="f32", cpu_path=cpu_path)
    cut = make_runner("openvino", folder=folder, **opts)
    pp = make_runner("openvino", folder=folder, cache_mode="pingpong", **opts)
    roles, pairs = [], []
    for n, (x, t) in enumerate(traj(7)):
        roles.append(cut.schedule())
        a, b = cut(x, t), pp(x, t)
        ca, cb = cut.caches(), pp.caches()
        assert a.shape == b.shape and ca.keys() == cb.keys()
        pairs.append((n, a, b, ca, cb))
    assert "shallow" in roles and "step" in roles
    assert [p.name for p in cut.parts] == list(ov_split.PARTS) and "shallow" not in cut.requests
    m = Manifest.load(folder)
    deep, layer_of = set(m.reuse.deep_layers), {c.input: c.layer for c in m.caches}
    assert all((layer_of[c] in deep) == (p.name == "deep") for p in cut.parts for c in p.caches)
    skip_numbers_unless_exact(cut)
    for n, a, b, ca, cb in pairs:
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item()), (n, (a - b).abs().max())
        for k in cb:
            assert torch.allclose(ca[k], cb[k], rtol=1e-5, atol=1e-5 * (cb[k].abs().max().item() + 1e-12)), (n, k)


@pytest.mark.parametrize("cpu_path", path_params(["avx2", "vnni"]))
def test_openvino_with_its_rewrite_tracks_the_reference_closely(folder, cpu_path):
    """At f32 with every lever the OpenVINO reuse trajectory stays within half the quantization error of the
    reference (the sharing bug above gave 1.4x), under both int8 choices of backends/cpu.py (forced)."""
    ref = make_runner("torch", quantize(build_tiny_unet(), W8A4.replace(reuse_interval=2, reuse_depth=1)))
    fp = make_runner("torch", quantize(build_tiny_unet(), QuantConfig(mode="fp")))
    ov = make_runner("openvino", folder=folder, precision="f32", prime_precision="f32", cpu_path=cpu_path)
    rms = [], []
    for x, t in traj(7):
        a, b, f = ref(x, t), ov(x, t), fp(x, t)
        assert b.shape == a.shape
        rms[0].append((a - b).pow(2).mean().sqrt().item())
        rms[1].append((a - f).pow(2).mean().sqrt().item())
    skip_numbers_unless_exact(ov)
    assert sum(rms[0][1:]) <= 0.5 * sum(rms[1][1:])


def test_engine_builder_plans_the_shallow_engine(folder):
    """build-engine plans one TensorRT engine per graph role: the shallow graph gets its own profile, covering
    exactly its network inputs (the outer caches and the feature)."""
    from modiff_export.engine import EngineBuildOptions, plan_profiles

    m = Manifest.load(folder)
    p = plan_profiles(m, EngineBuildOptions(min_batch=1, opt_batch=2, max_batch=4))
    assert set(p) == {"prime", "step", "shallow"}
    shallow = {name: (lo, opt, hi) for name, lo, opt, hi in p["shallow"]}
    assert shallow["cache_in.up_blocks.0.feature"] == ((1, 32, 16, 16), (2, 32, 16, 16), (4, 32, 16, 16))
    model = onnx.load(str(folder / "shallow.onnx"), load_external_data=False)
    init = {i.name for i in model.graph.initializer}
    assert list(shallow) == [i.name for i in model.graph.input if i.name not in init]


def test_the_server_loop_serves_reuse_folders(folder):
    """`serve` runs any runner through serving/sampler.py: with block reuse each group's trajectory is scheduled
    by the runner (prime, shallow, step, ...) and the same requests give the same images, alone or mixed."""
    from modiff_export.serving.sampler import Item, generate_items

    m = Manifest.load(folder)
    runner = make_runner("ort", folder=folder)
    calls = []
    for role in ("prime", "step", "shallow"):
        impl = getattr(runner, f"{role}_impl")
        setattr(runner, f"{role}_impl", lambda *a, _impl=impl, _role=role: calls.append(_role) or _impl(*a))
    items = [Item(seed=1, steps=4), Item(seed=2, steps=3), Item(seed=3, steps=4)]
    mixed = generate_items(runner, m.model.scheduler_config, items, m.model.sample_shape)
    assert calls == ["prime", "shallow", "step", "shallow", "prime", "shallow", "step"]
    alone = generate_items(runner, m.model.scheduler_config, items[1:2], m.model.sample_shape)
    assert torch.allclose(alone[0], mixed[1], atol=1e-5)


def test_reuse_cost_row_counts_the_schedule_and_the_feature():
    """The demo's cost rows of reuse configs: BOPs per role and trajectory, bytes of caches + feature."""
    unet = build_tiny_unet()
    macs = cost.count_macs(unet, torch.zeros(1, 1, 16, 16), torch.tensor(500))
    fp = cost.reuse_cost_row(unet, macs, QuantConfig(mode="fp", reuse_interval=3, reuse_depth=1), 7, (1, 16, 16))
    assert fp["bops_step"] is None and fp["cache_bytes"] == 4 * 32 * 16 * 16  # the feature only
    assert fp["bops_traj"] == 3 * fp["bops_prime"] + 4 * fp["bops_shallow"] and fp["bops_shallow"] < fp["bops_prime"]
    m = cost.reuse_cost_row(unet, macs, W8A4.replace(reuse_interval=3, reuse_depth=1), 7, (1, 16, 16))
    assert m["bops_traj"] == m["bops_prime"] + 2 * m["bops_step"] + 4 * m["bops_shallow"]
    assert m["cache_bytes"] > fp["cache_bytes"] and m["config"] == "modiff-w8a4-r3d1"
    lin = cost.reuse_cost_row(unet, macs, W8A4.replace(reuse_interval=3, reuse_depth=1, reuse_forecast="linear"), 7,
                              (1, 16, 16))
    # same work; the runner's forecast keeps three more feature-size buffers (design section 1.2)
    assert lin["bops_traj"] == m["bops_traj"] and lin["cache_bytes"] == m["cache_bytes"] + 3 * fp["cache_bytes"]


def test_speed_reuse_table_sums_the_schedule():
    from modiff_export.harness import speed

    def row(label, graphs, role, ms, prime_of=None):
        return {"label": label, "graphs": graphs, "role": role, "ms": ms, "cpu_ms": ms / 2, "prime_of": prime_of,
                "per_call": True,
                "cache_bytes": 2**20, "plain": False, "runner": (), "hint": None}

    rows = [{**row(speed.FP_DEFAULT, "fp", "prime", 10.0), "per_call": False, "plain": True},
            row("MoDiff W8A4 reuse D=1 prime (runner)", "m", "prime", 20.0),
            row("MoDiff W8A4 reuse D=1 step (runner)", "m", "step", 8.0, "MoDiff W8A4 reuse D=1 prime (runner)"),
            row("MoDiff W8A4 reuse D=1 shallow (runner)", "m", "shallow", 2.0, "MoDiff W8A4 reuse D=1 prime (runner)")]
    total, _, counts = speed.reuse_trajectory_ms(rows, rows[3], 5)
    assert counts == {"prime": 1, "step": 4, "shallow": 20} and total == 20 + 4 * 8 + 20 * 2
    lines = speed.reuse_table(rows, intervals=(5,))
    # wall and CPU-time ratios (cpu_ms is half of ms in every row here, so both ratios are equal)
    ratios = f"| {total / 250:.2f} | - | {total / 250:.2f} | - |"
    assert "| MoDiff W8A4 reuse | 1 | 5 |" in lines[2] and ratios in lines[2]
    assert speed.config_args("modiff-w8a4-d2")[-4:] == ["--reuse-interval", "2", "--reuse-depth", "2"]
    assert speed.config_args("fp") == ["--mode", "fp", "--weight-bits", "8", "--act-bits", "8"]
    assert speed.config_args(speed.reuse_key("modiff-w8a4", 1, "lin"))[-6:] == [
        "--reuse-interval", "2", "--reuse-depth", "1", "--reuse-forecast", "linear"]
    assert speed.config_args(speed.reuse_key("modiff-w8a4", 0, "tay"))[-6:] == [
        "--reuse-interval", "2", "--reuse-depth", "0", "--reuse-forecast", "taylor"]
    labels = [v.label for v in speed.reuse_variants("w8a4", (), (1,))]
    assert labels == [f"MoDiff W8A4 reuse+linear D=1 {r} (runner)" for r in ("prime", "step", "shallow")]
    # the warmup: calls 0-2 full, then the schedule restarts (full at 3, 8, 13, 18, 23): 1 prime, 7 steps, 17 shallow
    _, _, counts = speed.reuse_trajectory_ms(rows, rows[3], 5, warmup=3)
    assert counts == {"prime": 1, "step": 7, "shallow": 17}
