"""Issue 34, point 1: does a fused delta-path kernel pay on OpenVINO CPU? One MoDiff layer's step (delta path +
int8 conv + rescale and o_hat update) built two ways and timed interleaved, one thread, static batch:

    snippets  today's form: Subtract, Abs, ReduceMax, Divide, Multiply, Round, Clamp, Add ... as plain ops, which
              the CPU plugin fuses into Snippets subgraphs (what the exported graph becomes, export/ov_variant.py)
    custom    the delta path as one custom op (benchmarks/delta_kernel/delta_quant.cpp, built here with cmake
              against the openvino wheel's own CMake package), the rest unchanged

Both feed the codes through the same FakeQuantize into the same int8-weight convolution. Prints median ms per
call, the PERF_COUNT time by node type (Reorders around the custom op included), the exec graph's precision of
the convolution, the outputs' agreement, and the measured floor: one core's copy bandwidth and what the cache
traffic of a CIFAR-size step (a_hat + o_hat read and written, 170 MB of caches at batch 4) costs at it.

    python benchmarks/delta_kernel.py [--rounds 30]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HERE = Path(__file__).resolve().parent / "delta_kernel"
LAYERS = {"32x32 (128 -> 128)": (4, 128, 32, 32), "8x8 (256 -> 256)": (4, 256, 8, 8)}
QMAX = 7.0  # A4


def build_extension(out: Path) -> Path:
    import openvino

    ov_cmake = Path(openvino.__file__).parent / "cmake"
    subprocess.run(["cmake", "-S", str(HERE), "-B", str(out), f"-DOpenVINO_DIR={ov_cmake}"], check=True,
                   capture_output=True)
    subprocess.run(["cmake", "--build", str(out), "-j1"], check=True, capture_output=True)
    return next(out.glob("libmodiff_delta_quant*.so"))


def layer(shape, custom: bool):
    """ov.Model of one layer's step: inputs x, a_hat, o_hat; outputs y (= o_hat_new), a_hat_new."""
    import openvino as ov
    from openvino import opset13 as ops

    B, C, H, W = shape
    rng = np.random.default_rng(0)
    x, a, o = (ops.parameter([B, C, H, W], ov.Type.f32, name=n) for n in ("x", "a_hat", "o_hat"))
    if custom:
        dq = DELTA_FACTORY.create("DeltaQuant", [x.output(0), a.output(0)], {"qmax": QMAX})
        codes, s, a_new = dq.output(0), dq.output(1), dq.output(2)
    else:
        d = ops.subtract(x, a)
        m = ops.reduce_max(ops.abs(d), ops.constant(np.array([1, 2, 3], np.int64)), keep_dims=True)
        s = ops.divide(ops.maximum(m, ops.constant(np.float32(1e-30))), ops.constant(np.float32(QMAX)))
        c = ops.clamp(ops.round(ops.multiply(d, ops.divide(ops.constant(np.float32(1.0)), s)), "half_to_even"),
                      -QMAX, QMAX)
        codes, a_new = c.output(0), ops.add(a, ops.multiply(c, s)).output(0)
    lo, hi = ops.constant(np.float32(-128)), ops.constant(np.float32(127))
    q = ops.fake_quantize(codes, lo, hi, lo, hi, 256)  # identity on the integer codes: the int8 input of the conv
    wq = rng.integers(-127, 128, size=(C, C, 3, 3)).astype(np.int8)
    ws = (rng.random((C, 1, 1, 1), dtype=np.float32) * 1e-3 + 1e-4).astype(np.float32)
    w = ops.multiply(ops.convert(ops.constant(wq), ov.Type.f32), ops.constant(ws))
    conv = ops.convolution(q, w, [1, 1], [1, 1], [1, 1], [1, 1])
    y = ops.add(o, ops.multiply(conv, s))
    res = [ops.result(y), ops.result(a_new)]
    return ov.Model(res, [x, a, o], "custom" if custom else "snippets")


def bandwidth_gbs(mb: int = 512) -> float:
    """One core's copy bandwidth: numpy copies of `mb` MB (read + write counted), best of 5."""
    a = np.ones(mb * 2**20 // 4, np.float32)
    b = np.empty_like(a)
    best = 1e9
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best / 1e9


def main(argv=None) -> None:
    import openvino as ov

    from modiff_export.backends.cpu import CpuPath, cpu_int8_flags
    from modiff_export.harness.latency import loadavg

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args(argv)
    flags = ", ".join(f for f, v in cpu_int8_flags().items() if v)
    print(f"CPU flags: {flags}; class {CpuPath.resolve().describe()}; 1-min load {loadavg()}")
    core = ov.Core()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        lib = build_extension(Path(tmp) / "build")
        print(f"extension built in {time.perf_counter() - t0:.1f} s: {lib.name}")
        core.add_extension(str(lib))
        global DELTA_FACTORY
        DELTA_FACTORY = _factory(str(lib))
        for name, shape in LAYERS.items():
            cfg = {"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
                   "PERF_COUNT": True}
            reqs = {k: core.compile_model(layer(shape, k == "custom"), "CPU", cfg).create_infer_request()
                    for k in ("snippets", "custom")}
            rng = np.random.default_rng(1)
            feeds = {"x": rng.standard_normal(shape, np.float32), "a_hat": rng.standard_normal(shape, np.float32),
                     "o_hat": rng.standard_normal((shape[0], shape[1], shape[2], shape[3]), np.float32)}
            times = {k: [] for k in reqs}
            outs = {}
            for _ in range(args.rounds):
                for k, r in reqs.items():
                    t = time.perf_counter()
                    r.infer(feeds)
                    times[k].append(time.perf_counter() - t)
            for k, r in reqs.items():
                outs[k] = [r.get_output_tensor(i).data.copy() for i in range(2)]
            print(f"\n== layer {name}, batch {shape[0]}, A4, one thread, f32 hint")
            for k, r in reqs.items():
                by_type: dict[str, float] = {}
                for p in r.profiling_info:
                    by_type[p.node_type] = by_type.get(p.node_type, 0.0) + p.real_time.total_seconds() * 1e3
                conv = [p.exec_type for p in r.profiling_info if p.node_type == "Convolution"]
                top = ", ".join(f"{t} {v:.2f}" for t, v in sorted(by_type.items(), key=lambda kv: -kv[1]) if v > 0.005)
                print(f"{k:9s} median {1e3 * np.median(times[k]):.2f} ms/call; counters (ms) by node type: {top}; "
                      f"conv kernel {conv}")
                nodes = sorted(r.profiling_info, key=lambda p: -p.real_time.total_seconds())[:5]
                print("          top nodes: " + "; ".join(f"{p.node_name[:40]} [{p.node_type}/{p.exec_type}] "
                                                      f"{p.real_time.total_seconds() * 1e3:.2f}" for p in nodes))
            dy = np.abs(outs["custom"][0] - outs["snippets"][0]).max() / np.abs(outs["snippets"][0]).max()
            da = np.abs(outs["custom"][1] - outs["snippets"][1]).max() / np.abs(outs["snippets"][1]).max()
            print(f"agreement: max |y diff| {dy:.2e}, max |a_hat diff| {da:.2e} (relative to the largest value)")
            print(f"custom / snippets: {np.median(times['custom']) / np.median(times['snippets']):.2f}x")
    bw = bandwidth_gbs()
    mb = 170 * 2**20
    print(f"\nfloor: one core copies {bw:.1f} GB/s (read + write); a CIFAR-size step reads and writes a_hat + o_hat "
          f"(170 MB at batch 4): {2 * mb / bw / 1e6:.1f} ms")


def _factory(lib: str):
    """Make nodes of the extension's op from Python: OpExtension is registered in the Core; a NodeFactory
    built from the library gives them to Python graph construction."""
    from openvino.utils.node_factory import NodeFactory

    f = NodeFactory()
    f.add_extension(lib)
    return f


DELTA_FACTORY = None

if __name__ == "__main__":
    main()
