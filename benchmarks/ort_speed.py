"""Per-call latency on ONNX Runtime CPU at batch 16 (one run, interleaved rounds, medians):
FP32 graph, ONNX Runtime's own static W8A8 (the peer), MoDiff prime/step, PTQ, and the
`--target ort` variants (weight-folded "fold", and "integer" ConvInteger/MatMulInteger), with
ratios to FP32 and the CPU's int8 instruction support. The peer is commands/demo.py's (PEER_SETTINGS);
the untuned peer (PEER_DEFAULT_SETTINGS) is timed too.

    python benchmarks/ort_speed.py [--model digits] [--act-bits 4] [--batch 16] [--rounds 10] [--threads 1]

--threads sets ONNX Runtime's intra-op threads (and PyTorch's for the recorded FP trajectories). On a
shared 2-core machine 1 is the robust choice (a second thread that loses its core stalls every op).
"""
from __future__ import annotations

import copy
import shutil
import sys
import tempfile
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from modiff_export.config import QuantConfig  # noqa: E402
from modiff_export.export.ort_variant import write_variant  # noqa: E402
from modiff_export.export.trace import export_model  # noqa: E402
from modiff_export.harness import latency  # noqa: E402
from modiff_export.models import load_model  # noqa: E402


@click.command()
@click.option("--model", default="digits", show_default=True)
@click.option("--weight-bits", default=8, show_default=True)
@click.option("--act-bits", default=4, show_default=True)
@click.option("--batch", default=16, show_default=True)
@click.option("--rounds", default=10, show_default=True)
@click.option("--threads", default=1, show_default=True)
def main(model, weight_bits, act_bits, batch, rounds, threads):
    from modiff_export.backends.torch_runner import TorchRunner
    from modiff_export.harness.peer import PEER_DEFAULT_SETTINGS, peer_quantize
    from modiff_export.harness.recorder import Recorder
    from modiff_export.quant.quantization import quantize
    from modiff_export.sampling import generate, make_scheduler

    torch.set_num_threads(threads)
    load0 = open("/proc/loadavg").read().split()[:3]
    m = load_model(model)
    work = Path(tempfile.mkdtemp(prefix="ort_speed-"))
    try:
        graphs = {}
        for cfg in (QuantConfig(mode="fp"), QuantConfig(mode="ptq", weight_bits=weight_bits, act_bits=act_bits),
                    QuantConfig(mode="modiff", weight_bits=weight_bits, act_bits=act_bits)):
            export_model(m.copy(), cfg, work / cfg.tag, progress=False)
            graphs[cfg.mode] = work / cfg.tag
            if cfg.mode != "fp":
                for method in ("fold", "integer"):
                    write_variant(work / cfg.tag, work / f"{cfg.tag}-{method}", method=method)
                    graphs[f"{cfg.mode}-{method}"] = work / f"{cfg.tag}-{method}"
        if not m.conditional:  # peer: calibrated on inputs recorded from FP trajectories
            rec = Recorder(TorchRunner(quantize(copy.deepcopy(m.unet), QuantConfig(mode="fp"))))
            generate(rec, make_scheduler("ddim", m.scheduler_config), 25, 16, 0, m.sample_shape, progress=False)
            graphs["peer"] = peer_quantize(graphs["fp"], work / "peer", rec.inputs)
            graphs["peer-default"] = peer_quantize(graphs["fp"], work / "peer-default", rec.inputs,
                                                   settings=PEER_DEFAULT_SETTINGS)
        b = f"W{weight_bits}A{act_bits}"
        wanted = [("FP32 graph", "fp", "prime"), ("ORT static W8A8 (peer)", "peer", "prime"),
                  ("ORT static W8A8 (untuned peer)", "peer-default", "prime"),
                  (f"MoDiff {b} prime (Q/DQ)", "modiff", "prime"), (f"MoDiff {b} step (Q/DQ)", "modiff", "step"),
                  (f"MoDiff {b} prime (ort fold)", "modiff-fold", "prime"), (f"MoDiff {b} step (ort fold)",
                                                                             "modiff-fold", "step"),
                  (f"MoDiff {b} step (ort integer)", "modiff-integer", "step"),
                  (f"PTQ {b} (Q/DQ)", "ptq", "prime"), (f"PTQ {b} (ort fold)", "ptq-fold", "prime"),
                  (f"PTQ {b} (ort integer)", "ptq-integer", "prime")]
        sessions, feeds = {}, {}
        for label, key, role in wanted:
            if key in graphs:
                sessions[label] = latency.make_session(graphs[key] / f"{role}.onnx", threads)
                feeds[label] = latency.session_feeds(sessions[label], batch)
        lat = latency.measure_latency(sessions, feeds, rounds=rounds, warmup=2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import onnxruntime

    load1 = open("/proc/loadavg").read().split()[:3]
    print(f"CPU: {latency.cpu_line()}; onnxruntime {onnxruntime.__version__} CPU, {threads} intra-op "
          f"thread(s), batch {batch}, median of {rounds} interleaved rounds; torch {torch.__version__}; "
          f"load average {' '.join(load0)} before, {' '.join(load1)} after")
    ref = lat["FP32 graph"]
    print("| graph | ms / call | x FP32 |\n|---|---|---|")
    for label, t in lat.items():
        print(f"| {label} | {t * 1e3:.1f} | {t / ref:.2f} |")


if __name__ == "__main__":
    main()
