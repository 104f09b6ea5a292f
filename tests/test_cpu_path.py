"""The runners' one CPU-dependent decision (backends/cpu.py, CpuPath): which class a CPU is, what each class's
path does, forcing it (runner option and MODIFF_CPU_PATH), and its bad input. What each path computes is checked
by the OpenVINO parity and contract tests, which run every path on every machine (tests/conftest.py, OV_PATHS)."""
from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_unet, tiny_model
from reliability_util import error_line, run_cli

from modiff_export.backends import cpu, make_runner
from modiff_export.backends.base import RunnerError
from modiff_export.backends.cpu import CPU_CLASSES, ENV, CpuPath, CpuPathError
from modiff_export.config import QuantConfig
from modiff_export.export.trace import export_model

FLAGS = {  # /proc/cpuinfo flag sets of the machines this project has met (and two it may meet)
    "avx2": {"avx2"},  # AMD EPYC, AVX2 only
    "vnni": {"avx2", "avx512bw", "avx512_vnni"},  # e.g. Cascade Lake: VNNI, no BF16
    "vnni_bf16": {"avx2", "avx512bw", "avx512_vnni", "avx512_bf16"},  # AMD EPYC (Zen 4)
    "amx": {"avx2", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16"},  # Intel Xeon (SPR)
}


def _cpu(monkeypatch, flags: set[str]) -> None:
    monkeypatch.setattr(cpu, "cpu_int8_flags", lambda: {f: f in flags for f in cpu.CPU_FLAGS})


@pytest.mark.parametrize("cls", list(FLAGS))
def test_class_of_each_cpu_and_its_decisions(monkeypatch, cls):
    _cpu(monkeypatch, FLAGS[cls])
    monkeypatch.delenv(ENV, raising=False)
    path = CpuPath.resolve()
    assert path.cpu_class == cls and not path.forced and path.exact  # detected: always the exact path
    assert path.int8_kernels == (cls != "avx2") and path.u8_codes == (cls == "avx2")
    assert path.default_precision == path.precision_here == ("bf16" if cls in ("vnni_bf16", "amx") else "f32")
    assert path.rewrites("prime", ()) == (cls == "avx2")  # weights dequantized at load only without exact int8
    assert path.rewrites("step", ("minmax",)) and path.rewrites("step", ()) == (cls == "avx2")
    assert cls in path.describe()


def test_other_cpus():
    """Alder Lake's AVX-VNNI counts as VNNI; a machine without /proc/cpuinfo flags (not x86 Linux) makes no
    claim of saturation."""
    for flags, cls in (({"avx2", "avx_vnni"}, "vnni"), (set(), "vnni")):
        with pytest.MonkeyPatch.context() as mp:
            _cpu(mp, flags)
            assert cpu.cpu_class() == cls


@pytest.mark.parametrize("forced", CPU_CLASSES)
def test_forcing_on_an_avx2_cpu(monkeypatch, forced):
    """Every class can be forced on any CPU. On an AVX2 CPU, int8 kernels are not exact (the saturating dot
    product) and bf16 runs as f32 (no native bf16): the path says both."""
    _cpu(monkeypatch, FLAGS["avx2"])
    monkeypatch.setenv(ENV, forced)
    path = CpuPath.resolve()
    assert path.cpu_class == forced and path.forced == (forced != "avx2")
    assert path.exact == (forced == "avx2") and path.precision_here == "f32"
    assert ("NOT exact" in path.describe()) == (forced != "avx2")
    assert CpuPath.resolve("auto").cpu_class == "avx2"  # the option wins over the environment


def test_bad_path_names(monkeypatch, tmp_path):
    with pytest.raises(CpuPathError, match="unknown CPU path 'avx3'; expected one of"):
        CpuPath.resolve("avx3")
    monkeypatch.setenv(ENV, "sse4")
    with pytest.raises(CpuPathError, match=f"'sse4' \\(from {ENV}\\)"):
        CpuPath.resolve()
    export_model(tiny_model(build_tiny_unet()), QuantConfig(act_bits=8), tmp_path / "g", progress=False)
    for backend in ("openvino", "ort"):
        with pytest.raises(RunnerError, match=f"{backend} runner: unknown CPU path 'sse4'"):
            make_runner(backend, folder=tmp_path / "g")
    code, _, err = run_cli(["sample", "--backend", "openvino", "--graphs", tmp_path / "g", "--steps", "2",
                            "--batch-size", "1", "--out", tmp_path / "x.png"])
    assert f"unknown CPU path 'sse4' (from {ENV})" in error_line(code, err)
    assert not (tmp_path / "x.png").exists()


def test_runner_takes_its_choices_from_the_path(tmp_path, monkeypatch):
    """What the runners do under a path: the OpenVINO runner's int8 choice, which graphs it rewrites, and the
    precision hint of 'default' (none when detected: the plugin's own choice; the forced class's, as far as this
    CPU has it); ONNX Runtime folds its weights on the avx2 path only."""
    monkeypatch.delenv(ENV, raising=False)
    export_model(tiny_model(build_tiny_unet()), QuantConfig(act_bits=4), tmp_path / "g", progress=False)
    here = cpu.cpu_class()
    for name in CPU_CLASSES:
        ov = make_runner("openvino", folder=tmp_path / "g", cpu_path=name)
        assert ov.cpu_path.cpu_class == name and ov.int8_kernels == (name != "avx2") and ov.u8_codes == (name == "avx2")
        assert ov.precision["prime"] == "default"  # A4: the prime runs at the default precision
        hint = ov.config("prime").get("INFERENCE_PRECISION_HINT")
        assert hint == (None if name == here else ov.cpu_path.precision_here), (name, hint)
        assert make_runner("ort", folder=tmp_path / "g", cpu_path=name).int8_kernels == (name != "avx2")
    monkeypatch.setenv(ENV, "avx2")
    assert make_runner("openvino", folder=tmp_path / "g").u8_codes  # the environment forces it too
    r = make_runner("openvino", folder=tmp_path / "g", cpu_path="avx2")
    r(torch.randn(1, 1, 16, 16), 900.0)
    assert r.describe_path().startswith("openvino avx2") and "compiled precision prime f32" in r.describe_path()
