"""The demo report: labelled figures (matplotlib) and a Markdown file a person can read.

build_report(folder, results) writes folder/report.md, grid.png and quality.png from a results dict
(commands/demo.py fills it; tests fill it by hand):

    results = {
      "title", "settings": {...}, "notes": [str], "bits": ["W8A8", ...],
      "grids": {"fp": imgs, "peer": imgs | None, "ptq-w8a8": imgs, "modiff-w8a8": imgs, ...},  # [N,1,H,W] in [-1,1]
      "quality": [{"config", "fd", "confidence", "psnr"}],
      "parity":  [{"config", "psnr", "max_abs_image", "max_abs_eps"}],
      "cost":    [{"config", "bops_prime", "bops_step"[, "bops_shallow"], "bops_traj", "weight_bytes", "cache_bytes",
                   "latency": {graph: seconds} , ...}],
      "speed":   {"batch", "cpu", "flags": {flag: bool}, "rows": [(graph, seconds)], "ref": graph},
    }
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ..fsutil import atomic_folder


def tile(images, nrow: int = 4, pad: int = 1) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] (torch or numpy) -> one grey/RGB array in [0, 1] (first nrow^2 images)."""
    x = np.asarray(images.detach().cpu() if hasattr(images, "detach") else images, dtype=np.float32)
    x = (np.clip(x[: nrow * nrow], -1, 1) + 1) / 2
    n, c, h, w = x.shape
    rows = math.ceil(n / nrow)
    grid = np.ones((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), np.float32)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = x[i]
    return grid[0] if c == 1 else grid[:3].transpose(1, 2, 0)


def grid_figure(results: dict, path: Path) -> Path:
    """Rows: one per bit width (FP | ptq | modiff from the same noise), plus FP | ORT peer on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g, bits = results["grids"], results["bits"]
    q = {r["config"]: r for r in results["quality"]}
    rows = [("FP32", "fp", "ORT static W8A8 (peer)", "peer", None, None)] if g.get("peer") is not None else []
    rows += [("FP32", "fp", f"PTQ {b}", f"ptq-{b.lower()}", f"MoDiff {b}", f"modiff-{b.lower()}") for b in bits]
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.7 * len(rows)), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(3):
            ax = axes[i][j]
            ax.axis("off")
            label, key = row[2 * j], row[2 * j + 1]
            if key is None or g.get(key) is None:
                continue
            ax.imshow(tile(g[key]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            extra = ""
            if key in q and key != "fp":
                extra = f"\nPSNR {q[key]['psnr']:.1f} dB, FD {q[key]['fd']:.2f}"
            elif key == "fp" and key in q:
                extra = f"\nFD {q[key]['fd']:.2f}"
            ax.set_title(label + extra, fontsize=9)
    fig.suptitle(results.get("title", "same noise, same scheduler"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def quality_figure(results: dict, path: Path) -> Path:
    """FD-digits and PSNR-to-FP vs bit width for ptq and modiff (FP and the peer as references)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = {r["config"]: r for r in results["quality"]}
    bits = results["bits"]
    x = np.arange(len(bits))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((axes[0], "fd", "FD-digits (lower is better)"), (axes[1], "psnr",
                                                                            "PSNR to FP32, dB (higher is better)")):
        for mode, style in (("ptq", "o--"), ("modiff", "s-")):
            ys = [q.get(f"{mode}-{b.lower()}", {}).get(key, np.nan) for b in bits]
            ax.plot(x, ys, style, label="PTQ" if mode == "ptq" else "MoDiff")
        if key == "fd" and "fp" in q:
            ax.axhline(q["fp"]["fd"], color="gray", ls=":", label="FP32")
        if "peer" in q and "W8A8" in bits:
            ax.plot([bits.index("W8A8")], [q["peer"][key]], "r^", label="ORT static W8A8 (peer)")
        for tag in (t for t in q if t.endswith("-recommended")):  # e.g. modiff-w4a4-recommended
            b = tag.split("-")[1].upper()
            if b in bits:
                ax.plot([bits.index(b)], [q[tag][key]], "g*", markersize=11, label=f"MoDiff {b}, recommended recipe")
        ax.set_xticks(x, bits)
        ax.set_xlabel("weight / activation bits")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        if key == "fd":
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v, spec=".2f") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec)


def _si(n: float) -> str:
    for unit, k in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n:.0f}"


def table(head: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(head) + " |",
            "|" + "---|" * len(head)] + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def quality_table(results: dict) -> list[str]:
    return table(["config", "FD-digits", "classifier confidence", "PSNR to FP32 (dB)", "computed by (runner path)"],
                 [[r["config"], _fmt(r["fd"]), _fmt(r["confidence"], ".3f"),
                   _fmt(r["psnr"]), r.get("path", "")] for r in results["quality"]])


def parity_table(results: dict) -> list[str]:
    return table(["config", "ORT vs PyTorch image PSNR (dB)", "max abs diff, final images",
                  "max abs diff, noise_pred over all steps"],
                 [[r["config"], _fmt(r["psnr"]), _fmt(r["max_abs_image"], ".2e"), _fmt(r["max_abs_eps"], ".2e")]
                  for r in results["parity"]])


def cost_table(results: dict) -> list[str]:
    rows = results["cost"]
    fp = next((r for r in rows if r["config"] == "fp"), rows[0])
    order = ["prime", "step", "prime (ort)", "step (ort)"]
    graphs = sorted({g for r in rows for g in r.get("latency", {})}, key=lambda g: order.index(g) if g in order else 9)
    fp_lat = fp.get("latency", {}).get("prime")
    head = ["config", "GBOPs / call (prime, step[, shallow])", "GBOPs / trajectory", "vs FP32", "weight bytes",
            "cache bytes / sample"]
    head += [f"ORT ms / call, {g} (x FP32)" for g in graphs]
    out = []
    for r in rows:
        calls = ", ".join(_si(r[k]) for k in ("bops_prime", "bops_step", "bops_shallow") if r.get(k) is not None)
        line = [r["config"], calls, _si(r["bops_traj"]), f"{r['bops_traj'] / fp['bops_traj']:.3f}",
                _si(r["weight_bytes"]) + "B", _si(r["cache_bytes"]) + "B" if r["cache_bytes"] else "0"]
        for g in graphs:
            t = r.get("latency", {}).get(g)
            line.append("" if t is None else f"{t * 1e3:.1f} ({t / fp_lat:.2f})" if fp_lat else f"{t * 1e3:.1f}")
        out.append(line)
    return table(head, out)


def speed_table(results: dict) -> list[str]:
    s = results["speed"]
    ref = dict(s["rows"])[s["ref"]]
    return table([f"graph (ONNX Runtime CPU, batch {s['batch']})", "ms / call", "x FP32"],
                 [[g, f"{t * 1e3:.1f}", f"{t / ref:.2f}"] for g, t in s["rows"]])


def build_report(folder: str | os.PathLike, results: dict, overwrite: bool = False) -> Path:
    """Write report.md + grid.png + quality.png into `folder` (built in a temp folder, then renamed;
    an existing folder is replaced only with `overwrite`)."""
    folder = Path(folder)
    with atomic_folder(folder, overwrite) as tmp:
        grid_figure(results, tmp / "grid.png")
        quality_figure(results, tmp / "quality.png")
        st = results.get("settings", {})
        md = [f"# {results.get('title', 'modiff-export demo')}", ""]
        md += [f"- {k}: {v}" for k, v in st.items()] + [""]
        md += [f"- {n}" for n in results.get("notes", [])] + [""]
        md += ["## Samples from the same noise", "", "![grid](grid.png)", "",
               "## Quality", "", *quality_table(results), "", "![quality](quality.png)", "",
               "## Parity: ONNX Runtime vs PyTorch (same noise, same scheduler)", "", *parity_table(results), "",
               "## Cost", "",
               "Bit operations (BOPs) = MACs x weight bits x activation bits over every Conv2d/Linear, as in the "
               "quantized-network literature the MoDiff paper belongs to; full precision counts 32 x 32. MACs come "
               "from the real input shapes (forward hooks, one sample). MoDiff's prime call runs full-precision "
               "activations (W bits x 32), its step calls W x A; a trajectory is prime + (steps - 1) x step. Weight "
               "bytes: Conv/Linear weights as stored (int8 containers, also for 4-bit weights). Cache bytes: "
               "MoDiff's a_hat + o_hat per sample (manifest). Latency: ONNX Runtime CPU, measured interleaved in "
               "one run; `(ort)` columns are the `--target ort` variant of the same graphs.", "",
               *cost_table(results), ""]
        if results.get("speed"):
            s = results["speed"]
            flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in s["flags"].items())
            md += ["## Speed on ONNX Runtime CPU", "", f"CPU: {s['cpu']} ({flags}).", "", *speed_table(results), ""]
            md += [f"- {n}" for n in s.get("notes", [])] + [""]
        if results.get("cifar_speed"):
            md += ["## Speed on OpenVINO CPU: where MoDiff stands", "",
                   "A UNet of the CIFAR-10 DDPM architecture (35.7M parameters, 32x32, channels 128/256/256/256, "
                   "random weights: speed only), batch 4, one thread, OpenVINO CPU, every row compiled for the static "
                   "batch, "
                   "interleaved rounds (CPU ms = this process's CPU time, steadier than wall time on a shared "
                   "machine): the FP graph "
                   "at f32 and at OpenVINO's default precision and NNCF's int8 model through OpenVINO's own API, PTQ "
                   "and MoDiff through the runner with its defaults. Trajectory = prime + 24 steps for MoDiff, 25 "
                   "calls otherwise. Full tables and per-node counters: docs/speed.md.", "", results["cifar_speed"], ""]
        if results.get("caching"):
            md += ["## Caching on a diffusion transformer", "",
                   "The shipped DiT (digits_dit), block reuse at depth 0 (every transformer block reused on 2 of 3 "
                   "steps, the residual forecast by the runner) beside diffusers' own TaylorSeerCache on the FP model, "
                   "from the same noise. MACs computed: Conv/Linear MACs of the trajectory over steps x a full call. "
                   "W8A4 here is uncalibrated (round-to-nearest weights).", "", *results["caching"], ""]
        (tmp / "report.md").write_text("\n".join(md) + "\n")
    return folder / "report.md"
