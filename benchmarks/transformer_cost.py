"""Issue 19, point 5: what MoDiff costs on diffusion transformers, in the demo's cost-table form.

    python benchmarks/transformer_cost.py [--models digits_dit,dit_s2,pixart] [--latent 16] [--steps 25]

Per model: where the MACs of one call are (Linear vs Conv2d layers; attention's activation x activation
matmuls are not layers and are not counted, as in the UNet tables), BOPs of a --steps trajectory relative to
FP32 (MACs x weight bits x activation bits; MoDiff's prime at full-precision activations) for PTQ W8A8 and
MoDiff at W8A8 / W8A4 / W4A4 with the recommended recipe's W8A8 layers, and the cache bytes per sample a
MoDiff runner keeps between calls (a_hat + o_hat of every layer, float32, from one real prime call).
Random weights for dit_s2 / pixart (harness/arch_models.py); nothing is downloaded.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from modiff_export import QuantConfig  # noqa: E402
from modiff_export.calibration.recipe import apply_recipe  # noqa: E402
from modiff_export.evaluation.cost import bops_per_trajectory, model_macs, placeholder_call  # noqa: E402
from modiff_export.models import (
    denoiser,  # noqa: E402
    load_model,  # noqa: E402
)
from modiff_export.quant.quantization import list_caches, quantize  # noqa: E402

CONFIGS = [("PTQ W8A8", QuantConfig(mode="ptq")), ("MoDiff W8A8", QuantConfig()),
           ("MoDiff W8A4", QuantConfig(act_bits=4)), ("MoDiff W4A4", QuantConfig(weight_bits=4, act_bits=4))]


def cache_bytes(model, config) -> int:
    q = quantize(copy.deepcopy(model.unet), config).eval()
    with torch.no_grad():
        x, t, cond = placeholder_call(model)
        denoiser.call(q, x, t.expand(1), cond)
    return sum(c.tensor.numel() * 4 for c in list_caches(q) if c.tensor is not None)


@click.command()
@click.option("--models", default="digits_dit,dit_s2,pixart", show_default=True)
@click.option("--latent", default=16, show_default=True, help="pixart latent height = width.")
@click.option("--steps", default=25, show_default=True)
@click.option("--work", default="/tmp/runtime_speed", show_default=True, type=click.Path(file_okay=False))
def main(models, latent, steps, work):
    from modiff_export.harness.arch_models import write_model

    names = " | ".join(n for n, _ in CONFIGS)
    print(f"| model | params | MACs / call | in Linear | {names} (BOPs x FP32) | cache / sample (MoDiff W8A4) |")
    print("|---|---:|---:|---:|" + "---:|" * len(CONFIGS) + "---:|")
    for name in models.split(","):
        spec = name
        if name in ("dit_s2", "pixart"):
            sub = name if name == "dit_s2" else f"pixart-{latent}"
            spec = str(write_model(name, Path(work) / "models" / sub, latent=latent))
        m = load_model(spec)
        macs = model_macs(m)
        total = sum(l.macs for l in macs)
        linear = sum(l.macs for l in macs if l.kind == "linear")
        fp = bops_per_trajectory(macs, QuantConfig(mode="fp"), steps)
        cells = [f"{bops_per_trajectory(macs, apply_recipe(c, m.unet), steps) / fp:.4f}" for _, c in CONFIGS]
        mib = cache_bytes(m, apply_recipe(QuantConfig(act_bits=4), m.unet)) / 2**20
        params = sum(p.numel() for p in m.unet.parameters()) / 1e6
        print(f"| {name} | {params:.1f}M | {total / 1e9:.2f} G | {100 * linear / total:.0f}% | {' | '.join(cells)} | "
              f"{mib:.1f} MiB |", flush=True)


if __name__ == "__main__":
    main()
