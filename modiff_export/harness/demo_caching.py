"""The demo's caching section (issue 33): block reuse on the shipped diffusion transformer, beside diffusers'
TaylorSeerCache on the same FP model, from the same noise.

Rows: FP; diffusers TaylorSeerCache (interval 3, first order, the FP model in PyTorch); our FP reuse (depth 0,
interval 3, linear forecast, the module form); MoDiff W8A4 without and with reuse (depth 0, interval 3, Taylor
forecast), exported and sampled by ONNX Runtime. W8A4 here is the recommended recipe with dynamic scales and
round-to-nearest weights (the demo does not calibrate this model; docs/quality.md's rows use GPTQ weights).
FD and PSNR are against the FP row; MACs computed are over steps x one full call (harness/cache_peers.py,
evaluation/cost.py).
"""
from __future__ import annotations

import copy
from pathlib import Path

from ..config import QuantConfig

MODEL = "digits_dit"
REUSE = dict(reuse_interval=3, reuse_depth=0)


def caching_rows(work: Path, num_samples: int, steps: int, seed: int) -> list[dict]:
    from ..backends import make_runner
    from ..backends.torch_runner import TorchRunner
    from ..calibration.recipe import apply_recipe
    from ..evaluation.cost import macs_fraction, model_macs
    from ..evaluation.metrics import DigitsEvaluator, psnr
    from ..export.trace import export_model
    from ..models import load_model
    from ..quant.quantization import quantize
    from ..sampling import Trajectories, sample_model
    from .cache_peers import sample_hook

    model, ev = load_model(MODEL), DigitsEvaluator()
    traj = Trajectories("ddim", steps, num_samples, num_samples, seed)
    macs = model_macs(model)

    images = {"FP": sample_model(model, QuantConfig(mode="fp"), traj, progress=False)}
    fracs = {"FP": 1.0}
    images["diffusers TaylorSeerCache (N=3, order 1)"], fracs["diffusers TaylorSeerCache (N=3, order 1)"] = \
        sample_hook(model, "taylorseer:3:1", traj)
    fp_reuse = QuantConfig(mode="fp", reuse_forecast="linear", **REUSE)
    q = quantize(copy.deepcopy(model.unet), fp_reuse)
    label = "ours: FP reuse (D=0, N=3, linear)"
    images[label] = sample_model(model, fp_reuse, traj, progress=False, runner=TorchRunner(q))
    deep = frozenset(m.name for m in macs if q.modiff_reuse.is_deep(m.name))
    fracs[label] = macs_fraction(macs, fp_reuse, steps, deep)
    for label, cfg in (("ours: MoDiff W8A4, no reuse (ORT)", QuantConfig(act_bits=4)),
                       ("ours: MoDiff W8A4 + reuse (D=0, N=3, taylor; ORT)",
                        QuantConfig(act_bits=4, reuse_forecast="taylor", **REUSE))):
        cfg = apply_recipe(cfg, model.unet)
        folder = work / cfg.tag
        manifest = export_model(model.copy(), cfg, folder, progress=False, target="ort")
        runner = make_runner("ort", folder=folder, threads=1)
        images[label] = sample_model(model, cfg, traj, backend="ort", progress=False, runner=runner)
        runner.deactivate()
        fracs[label] = macs_fraction(macs, cfg, steps, frozenset(manifest.reuse.deep_layers)) if cfg.reuses else 1.0
    fd_fp = ev.frechet_distance(images["FP"])
    return [{"row": k, "macs_frac": fracs[k], "fd_rel": 100 * (ev.frechet_distance(x) - fd_fp) / fd_fp,
             "psnr": psnr(x, images["FP"])} for k, x in images.items()]


def caching_table(rows: list[dict]) -> list[str]:
    lines = ["| row | MACs computed | FD vs FP | PSNR to FP |", "|---|---:|---:|---:|"]
    for r in rows:
        p = "-" if r["psnr"] == float("inf") else f"{r['psnr']:.1f} dB"
        lines.append(f"| {r['row']} | {r['macs_frac']:.2f} | {r['fd_rel']:+.1f}% | {p} |")
    return lines
