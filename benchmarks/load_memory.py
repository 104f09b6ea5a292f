"""Resident memory a runner adds by loading graphs and making its first call, per backend and graph folder.

    python benchmarks/load_memory.py [--layers 6] [--work /tmp/load_memory] [--configs fp,ptq,modiff-w8a4]

A PixArt-alpha-architecture transformer with --layers blocks (random weights, latent 16x16x4, 120 caption
tokens x 4096; 28 layers is the published 611M model) is exported as FP, PTQ W8A8 and MoDiff W8A4; each
(backend, folder) is then loaded in a fresh process that makes one call at batch 2 and reports the RSS added
after the call and its peak (ru_maxrss) over the process's RSS before the runner existed. The plain
OpenVINO row (read_model + compile_model + one infer, no runner) is the floor. On CPUs without VNNI/AMX the
runners dequantize int8 weights at load (backends/cpu.py), the path this measures.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CONFIGS = {"fp": dict(mode="fp"), "ptq": dict(mode="ptq"), "modiff-w8a4": dict(act_bits=4)}


def build(work: Path, layers: int, configs: list[str]) -> None:
    import torch
    from diffusers import PixArtTransformer2DModel

    from modiff_export import QuantConfig
    from modiff_export.export.trace import export_model
    from modiff_export.harness.arch_models import PIXART_ALPHA, SCHEDULER
    from modiff_export.models import load_model

    model = work / "model"
    if not (model / "config.json").is_file():
        torch.manual_seed(0)
        PixArtTransformer2DModel(sample_size=16, **{**PIXART_ALPHA, "num_layers": layers}).eval().save_pretrained(model)
        (model / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    for tag in configs:
        if not (work / tag / "manifest.json").is_file():
            export_model(load_model(str(model)), QuantConfig(**CONFIGS[tag]), work / tag, progress=False)


def measure(folder: Path, backend: str) -> dict:
    """In this (fresh) process: RSS added by one runner's load + first call at batch 2."""
    import numpy as np
    import psutil
    import torch

    proc = psutil.Process()
    if backend == "plain":
        import openvino as ov
    else:
        from modiff_export.backends import make_runner
    base = proc.memory_info().rss
    x, ehs = torch.randn(2, 4, 16, 16), torch.randn(2, 120, 4096)
    if backend == "plain":
        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(folder / "prime.onnx")), "CPU",
                                      {"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY"})
        feeds = {"sample": x.numpy(), "timestep": np.full(2, 900.0, np.float32), "encoder_hidden_states": ehs.numpy(),
                 "encoder_attention_mask": np.ones((2, 120), np.float32)}
        held = compiled.create_infer_request()
        held.infer({next(n for n in p.get_names() if n in feeds): feeds[next(n for n in p.get_names() if n in feeds)]
                    for p in compiled.inputs})
    else:
        held = make_runner(backend, folder=folder, threads=1)  # held: measured while it lives
        held(x, 900, ehs)
    # the high-water mark of this process's own memory (ru_maxrss would carry the parent's across exec)
    peak = next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
    added = proc.memory_info().rss - base
    del held
    return {"added_mb": round(added / 2**20), "peak_added_mb": round((peak - base) / 2**20)}


@click.command()
@click.option("--layers", default=6, show_default=True, help="PixArt blocks (28: the published model).")
@click.option("--work", type=click.Path(path_type=Path), default=Path("/tmp/load_memory"), show_default=True)
@click.option("--configs", default="fp,ptq,modiff-w8a4", show_default=True)
@click.option("--backends", default="openvino,ort", show_default=True)
@click.option("--one", nargs=2, hidden=True, help="(internal) folder backend: measure in this process")
def main(layers, work, configs, backends, one):
    if one:
        print(json.dumps(measure(Path(one[0]), one[1])))
        return
    from modiff_export.backends.cpu import cpu_int8_flags

    tags = configs.split(",")
    work.mkdir(parents=True, exist_ok=True)
    build(work, layers, tags)
    print(f"PixArt-alpha architecture, {layers} layers; CPU flags: "
          f"{', '.join(f for f, on in cpu_int8_flags().items() if on) or 'none of ' + ', '.join(cpu_int8_flags())}")
    print("| folder | backend | RSS added after the first call (MB) | peak added (MB) |\n|---|---|---:|---:|")
    rows = [("fp", "plain")] + [(t, b) for t in tags for b in backends.split(",")]
    for tag, backend in rows:
        p = subprocess.run([sys.executable, __file__, "--one", str(work / tag), backend], capture_output=True,
                           text=True)
        if p.returncode:
            print(f"| {tag} | {backend} | failed: {(p.stderr.strip().splitlines() or ['?'])[-1][:120]} | |")
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"| {tag} | {backend} | {r['added_mb']} | {r['peak_added_mb']} |")


if __name__ == "__main__":
    main()
