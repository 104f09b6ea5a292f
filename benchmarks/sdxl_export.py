"""How large an SDXL UNet this machine exports (issue 32 point 6): random weights in SDXL-base's UNet architecture
(2.6B parameters at full depth), `export_model` MoDiff W8A8 at a chosen latent, in a child process under an
address-space cap so that running out of memory is a MemoryError, not the kernel's OOM killer. Prints the
export's wall time, the child's peak RSS (VmHWM) and, when it fails, what stopped it.

    python benchmarks/sdxl_export.py [--layers 1,2,10] [--latent 128] [--cap-gb 22] [--work /tmp/sdxl]

--layers: transformer_layers_per_block of the three levels (SDXL-base: 1,2,10; fewer = "reduced depth").
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SDXL_BASE_UNET = {  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, as diffusers documents it
    "in_channels": 4, "out_channels": 4, "block_out_channels": (320, 640, 1280), "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816, "use_linear_projection": True,
}


def child(layers: tuple[int, ...], latent: int, work: Path) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    from modiff_export import QuantConfig
    from modiff_export.export.trace import export_model
    from modiff_export.models import LoadedModel

    torch.manual_seed(0)
    t0 = time.time()
    unet = UNet2DConditionModel(sample_size=latent, transformer_layers_per_block=layers, **SDXL_BASE_UNET).eval()
    unet.requires_grad_(False)
    params = sum(p.numel() for p in unet.parameters())
    model = LoadedModel.from_unet(unet, "sdxl-random")
    built = time.time() - t0
    print(json.dumps({"params": params, "built_s": round(built, 1)}), flush=True)
    t0 = time.time()
    man = export_model(model, QuantConfig(act_bits=8), work / "graphs", overwrite=True, progress=True)
    print(json.dumps({"export_s": round(time.time() - t0, 1), "caches": len(man.caches),
                      "cache_mb_per_sample": round(man.cache_bytes_per_sample / 2**20, 1)}), flush=True)


@click.command()
@click.option("--layers", default="1,2,10", show_default=True, help="transformer_layers_per_block per level.")
@click.option("--latent", default=128, show_default=True, help="Latent height = width (128: 1024 px).")
@click.option("--cap-gb", default=22.0, show_default=True, help="Address-space cap of the exporting child.")
@click.option("--work", default="/tmp/sdxl-export", show_default=True, type=click.Path(file_okay=False))
@click.option("--child-run", is_flag=True, hidden=True)
def main(layers, latent, cap_gb, work, child_run):
    layers_t = tuple(int(x) for x in layers.split(","))
    work = Path(work)
    if child_run:
        cap = int(cap_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        child(layers_t, latent, work)
        return
    from modiff_export.harness.latency import cpu_line, loadavg

    print(f"Command: python benchmarks/sdxl_export.py {' '.join(sys.argv[1:])}\nCPU: {cpu_line()}; load {loadavg()}")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    p = subprocess.run([sys.executable, __file__, "--child-run", "--layers", layers, "--latent", str(latent),
                        "--cap-gb", str(cap_gb), "--work", str(work)], capture_output=True, text=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(p.stdout.strip())
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    frames = [ln.strip() for ln in lines if ln.strip().startswith("File ")][-4:]  # where in the code it stopped
    tail = frames + lines[-3:]
    print(f"exit {p.returncode}; wall {time.time() - t0:.0f} s; child peak RSS {peak:.1f} GB; layers {layers_t}, "
          f"latent {latent}; cap {cap_gb} GB")
    if p.returncode:
        print("stopped by: " + " | ".join(tail))
    print(f"after: load {loadavg()}")


if __name__ == "__main__":
    main()
