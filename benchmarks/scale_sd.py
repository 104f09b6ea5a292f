"""Scale check: export a UNet2DConditionModel with Stable Diffusion v1.5's architecture (random
weights, nothing downloaded) as MoDiff prime/step graphs, and as an fp graph (3.4 GB of float32
weights: over protobuf's 2 GB limit, so export.py must switch to ONNX external data).

    python benchmarks/scale_sd.py [--out /tmp/scale_sd] [--jobs modiff:float32,modiff:float16,fp:float32]
                                  [--doc docs/scale.md]

Each export runs in its own child process so its peak memory (resource.getrusage maxrss) is its own.
Reports export time, peak RSS, graph sizes (with external-data files) and cache bytes per sample at a
64x64 latent; with classifier-free guidance every image is a UNet batch of 2, so per image = 2 x
per sample. Writes the table into --doc (temp file, then rename).
"""
from __future__ import annotations

import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


def child(mode: str, cache_dtype: str, out: Path) -> dict:
    """One export in this process; returns its figures."""
    import torch
    from diffusers import UNet2DConditionModel

    from modiff_export.config import QuantConfig
    from modiff_export.export.trace import PROTOBUF_LIMIT, export_model
    from modiff_export.models import LoadedModel

    torch.manual_seed(0)
    t0 = time.time()
    unet = UNet2DConditionModel(**SD15_UNET).float().eval().requires_grad_(False)
    params = sum(p.numel() for p in unet.parameters())
    info = LoadedModel.from_unet(unet, "sd15-random")
    t_build = time.time() - t0
    config = QuantConfig(mode=mode, weight_bits=8, act_bits=8)
    t0 = time.time()
    manifest = export_model(info, config, out, cache_dtype=cache_dtype, overwrite=True, progress=True)
    t_export = time.time() - t0
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    external = {g: (out / f"{g}.data").is_file() for g in manifest.graphs.values() if g}
    per_sample = manifest.cache_bytes_per_sample
    return {"mode": mode, "cache_dtype": cache_dtype, "params": params, "build_s": round(t_build, 1),
            "export_s": round(t_export, 1), "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "files": files, "external_data": external, "protobuf_limit": PROTOBUF_LIMIT,
            "n_caches": len(manifest.caches), "cache_bytes_per_sample": per_sample,
            "cache_bytes_per_image_cfg": 2 * per_sample}


def shapes_only() -> dict:
    """Cache sizes without weights or compute: the UNet on PyTorch's meta device, with hooks on every
    Conv2d/Linear (MoDiff caches each one's input a_hat and output o_hat), one sample at 64x64."""
    import torch
    import torch.nn as nn
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    sizes = {"a_hat": 0, "o_hat": 0, "layers": 0}

    def hook(m, i, o):
        sizes["a_hat"] += i[0].numel()
        sizes["o_hat"] += o.numel()
        sizes["layers"] += 1

    for m in unet.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        unet(torch.zeros(1, 4, 64, 64, device="meta"), torch.tensor([500.0], device="meta"),
             encoder_hidden_states=torch.zeros(1, 77, 768, device="meta"))
    n = sizes["a_hat"] + sizes["o_hat"]
    return {"params": sum(p.numel() for p in unet.parameters()), **sizes,
            "bytes_per_sample": {"float32": 4 * n, "float16": 2 * n}}


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def write_doc(results: list[dict], failures: list[str], doc: Path, cmd: str) -> None:
    from modiff_export.fsutil import atomic_write_text

    lines = ["# Scale: a Stable-Diffusion-v1.5-sized UNet", "",
             f"Command: `{cmd}` (machine: {platform.machine()}, {_cpu()}, "
             f"{_mem_gib():.0f} GiB RAM, Python {platform.python_version()}).", "",
             "A `UNet2DConditionModel` with SD v1.5's configuration (block_out_channels 320/640/1280/1280, "
             "layers_per_block 2, cross_attention_dim 768, attention_head_dim 8, 3 x CrossAttnDownBlock2D + "
             "DownBlock2D, UpBlock2D + 3 x CrossAttnUpBlock2D) with random weights, exported at a 64x64 latent "
             "(W8A8, dynamic per-sample scales). Each export ran in its own process; peak RSS is that process's "
             "`ru_maxrss` (model construction included).", "",
             "| graphs | cache dtype | params | export s | peak RSS GiB | files | external data | caches | "
             "cache bytes / sample | / image with CFG (batch 2) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        files = ", ".join(f"{k} {_gb(v)}" for k, v in r["files"].items() if not k.endswith(".json"))
        ext = ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in r["external_data"].items())
        lines.append(f"| {r['mode']} | {r['cache_dtype']} | {r['params'] / 1e6:.0f} M | {r['export_s']:.0f} | "
                     f"{r['peak_rss_gib']:.1f} | {files} | {ext} | {r['n_caches']} | "
                     f"{r['cache_bytes_per_sample'] / 2**20:.1f} MiB | "
                     f"{r['cache_bytes_per_image_cfg'] / 2**20:.1f} MiB |")
    lines += ["", "export.py writes a graph with external data (`<graph>.onnx.data`) when its initializers exceed "
              f"{results[0]['protobuf_limit'] / 2**30:.2f} GiB (protobuf's 2 GiB limit less headroom)."
              if results else "",
              "The MoDiff graphs hold int8 weights (about 1 byte per parameter) and stay below it; the fp graph "
              "(4 bytes per parameter) does not.", "",
              "Cache memory is the real cost of MoDiff at this size: every Conv/Linear keeps its last input "
              "(`a_hat`) and last output (`o_hat`) for every sample in flight, and these caches are graph "
              "inputs and outputs of the step graph (two sets on the device for ping-pong)."]
    if failures:
        lines += ["", "## Failures", ""] + [f"- {f}" for f in failures]
    atomic_write_text(doc, "\n".join(lines) + "\n")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _mem_gib() -> float:
    import psutil

    return psutil.virtual_memory().total / 2**30


@click.command()
@click.option("--out", default="/tmp/scale_sd", show_default=True,
              help="Folder for the exported graphs (deleted after).")
@click.option("--jobs", default="modiff:float32,modiff:float16,fp:float32", show_default=True,
              help="Comma list of mode:cache_dtype exports.")
@click.option("--doc", default=str(ROOT / "docs" / "scale.md"), show_default=True)
@click.option("--keep", is_flag=True, help="Keep the exported graphs.")
@click.option("--child-job", default=None, hidden=True)
@click.option("--shapes-only", is_flag=True, help="Only print cache sizes (meta device: no weights, seconds).")
def main(out, jobs, doc, keep, child_job, shapes_only):
    out = Path(out)
    if shapes_only:
        print(json.dumps(globals()["shapes_only"](), indent=1))
        return
    if child_job:
        mode, dtype = child_job.split(":")
        print("RESULT " + json.dumps(child(mode, dtype, out / f"{mode}-{dtype}")), flush=True)
        return
    results, failures = [], []
    for job in jobs.split(","):
        print(f"== {job}", flush=True)
        t0 = time.time()
        proc = subprocess.run([sys.executable, __file__, "--out", str(out), "--child-job", job],
                              stdout=subprocess.PIPE, stderr=None, text=True)
        res = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not res:
            tail = proc.stdout.strip().splitlines()[-3:]
            failures.append(f"{job}: exit code {proc.returncode} after {time.time() - t0:.0f} s ({' | '.join(tail)})")
            print(failures[-1], flush=True)
        else:
            results.append(json.loads(res[-1][7:]))
            print(json.dumps(results[-1], indent=1), flush=True)
        if not keep:
            shutil.rmtree(out / job.replace(":", "-"), ignore_errors=True)
    default_jobs = jobs == "modiff:float32,modiff:float16,fp:float32"
    cmd = "python benchmarks/scale_sd.py" + ("" if default_jobs else f" --jobs {jobs}")
    write_doc(results, failures, Path(doc), cmd)
    print(f"wrote {doc}", flush=True)


if __name__ == "__main__":
    main()
