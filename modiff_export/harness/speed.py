"""CPU speed of FP32 / peer / PTQ / MoDiff graphs on ONNX Runtime and OpenVINO, at three model sizes.

    python benchmarks/runtime_speed.py [--models digits,cifar,sd15] [--threads 1,2] [--rounds 5]
                                       [--batch 4] [--sd-latent 16] [--work /tmp/runtime_speed] [--doc docs/speed.md]

Models (random weights except digits; nothing downloaded): `digits` (the shipped 16x16 model, 0.7M params),
`cifar` (the CIFAR-10 DDPM UNet architecture, 35.7M params, 32x32), `sd15` (Stable Diffusion 1.5's
UNet2DConditionModel, 860M params, at a --sd-latent x --sd-latent latent, run with classifier-free guidance
batching: UNet batch 2 x --batch). Graphs are exported once into --work and reused.

Per model and thread count, every variant is loaded and all are timed in interleaved rounds (round r calls
each variant once; medians), so they see the same machine load. sd15 variants are too big to hold together
in 8 GB, so there each variant is loaded, timed and released in turn (not interleaved; said in the table).
Trajectory = prime + 24 steps for MoDiff, 25 calls otherwise. Memory = RSS added by loading the variant and
running it twice (MB). Cache bytes per sample come from the graph manifest.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import torch
from tqdm import tqdm

CLI = [sys.executable, "-m", "modiff_export"]  # exports run in a subprocess: an SD-size export peaks at ~13 GB

STEPS = 25
CONFIGS = {"fp": ("fp", 8, 8), "ptq-w8a8": ("ptq", 8, 8), "modiff-w8a8": ("modiff", 8, 8), "modiff-w8a4": ("modiff",
                                                                                                           8, 4)}


@dataclass(frozen=True)
class Variant:
    label: str          # row label
    runtime: str        # "ort" or "openvino"
    graphs: str         # key into the exported folders
    role: str           # "prime" or "step"
    precision: str = "f32"
    cache_mode: str = "stateful"


def variants(with_peer: bool, quick: bool = False, mixed: str = "modiff-w8a4") -> list[Variant]:
    """The main table's rows. Runners are shared between a config's prime and step rows; the mixed-precision
    rows are W8A4 only, so that every variant fits in memory at once (a MoDiff runner holds ~1 GB on the
    CIFAR-size model at batch 4: caches of 42 MiB per sample, in and out)."""
    v = [Variant("FP32 graph", "ort", "fp", "prime"), Variant("FP32 graph", "openvino", "fp", "prime"),
         Variant("FP graph, OpenVINO default precision (bf16)", "openvino", "fp", "prime", "bf16")]
    if with_peer:
        v += [Variant("peer: ORT quantize_static W8A8", "ort", "peer", "prime"),
              Variant("peer: ORT quantize_static W8A8", "openvino", "peer", "prime")]
    v += [Variant("PTQ W8A8", "ort", "ptq-w8a8", "prime"), Variant("PTQ W8A8", "openvino", "ptq-w8a8", "prime")]
    for cfg in ("modiff-w8a8", "modiff-w8a4"):
        b = cfg.split("-")[1].upper()
        v += [Variant(f"MoDiff {b} prime", "ort", cfg, "prime"), Variant(f"MoDiff {b} prime", "openvino", cfg, "prime"),
              Variant(f"MoDiff {b} step", "ort", cfg, "step"), Variant(f"MoDiff {b} step", "openvino", cfg, "step")]
    if not quick:
        b = mixed.split("-")[1].upper()
        v += [Variant(f"MoDiff {b} prime, mixed (bf16 hint, delta path f32)", "openvino", mixed, "prime", "mixed",
                      "pingpong"),
              Variant(f"MoDiff {b} step, mixed (bf16 hint, delta path f32)", "openvino", mixed, "step", "mixed",
                      "pingpong")]
    return v


def cache_variants() -> list[Variant]:
    """OpenVINO cache handling, W8A4 step (f32 hint): stateful vs ping-pong, float32 vs float16 caches."""
    return [Variant("MoDiff W8A4 step, stateful, float32 caches", "openvino", "modiff-w8a4", "step"),
            Variant("MoDiff W8A4 step, ping-pong, float32 caches", "openvino", "modiff-w8a4", "step", "f32",
                    "pingpong"),
            Variant("MoDiff W8A4 step, stateful, float16 caches", "openvino", "modiff-w8a4-f16cache", "step"),
            Variant("MoDiff W8A4 step, ping-pong, float16 caches", "openvino", "modiff-w8a4-f16cache", "step", "f32",
                    "pingpong")]


# -- models and graphs --------------------------------------------------------------------------
def model_folder(name: str, work: Path, sd_latent: int) -> str:
    from .arch_models import write_model

    if name == "digits":
        return "digits"
    if name == "cifar":
        return str(write_model("cifar", work / "models" / "cifar"))
    return str(write_model("sd15", work / "models" / f"sd15-{sd_latent}", latent=sd_latent))


def _exported(folder: Path) -> bool:
    """A complete graph folder from an earlier run (its manifest loads and its files match their digests)."""
    from modiff_export.manifest import Manifest, ManifestError

    try:
        Manifest.load(folder)
    except ManifestError:
        return False
    return True


def export_graphs(name: str, spec: str, work: Path, sd_latent: int, keys=tuple(CONFIGS)) -> dict[str, Path]:
    """Export (once) fp / ptq-w8a8 / modiff-w8a8 / modiff-w8a4 graphs of a model; each in a child
    `cli.py export` process so its memory is returned (the SD-size export peaks at ~13 GB)."""
    out = {}
    for key in keys:
        mode, w, a = CONFIGS[key]
        folder = work / "graphs" / (name if name != "sd15" else f"sd15-{sd_latent}") / key
        if not _exported(folder):
            size_note = " (SD-size: ~13 GB peak, minutes)" if name == "sd15" else ""
            print(f"exporting {name} {key} -> {folder}{size_note}", flush=True)
            subprocess.run([*CLI, "export", "--model", spec, "--mode", mode,
                            "--weight-bits", str(w), "--act-bits", str(a), "--out", str(folder), "--quiet"], check=True)
        out[key] = folder
    return out


def export_peer(spec: str, fp_folder: Path, batch: int) -> Path:
    """The demo's peer (ORT quantize_static W8A8) calibrated on 2 short FP trajectories (DDIM 10 steps)."""
    from modiff_export.backends.ort_runner import OrtRunner
    from modiff_export.models import load_model
    from modiff_export.sampling import generate, make_scheduler

    from .peer import peer_quantize
    from .recorder import Recorder

    out = fp_folder.parent / "peer"
    if (out / "prime.onnx").is_file():
        return out
    m = load_model(spec)
    rec = Recorder(OrtRunner(fp_folder, threads=1))
    for seed in range(2):
        generate(rec, make_scheduler("ddim", m.scheduler_config), 10, batch, seed, m.sample_shape, progress=False)
    return peer_quantize(fp_folder, out, rec.inputs, progress=False)


# -- timing -------------------------------------------------------------------------------------
def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def make(v: Variant, folder: Path, threads: int):
    if v.runtime == "ort":
        from modiff_export.backends.ort_runner import OrtRunner

        return OrtRunner(folder, threads=threads)
    from modiff_export.backends.openvino_runner import OpenVinoRunner

    return OpenVinoRunner(folder, threads=threads, precision=v.precision, cache_mode=v.cache_mode)


def inputs(manifest, batch: int, seed: int = 0):
    """(sample, perturbed sample, encoder_hidden_states or None) for a graph: the step call sees a sample
    close to the primed one, as in a trajectory."""
    g = torch.Generator().manual_seed(seed)
    shape = next(s.shape for s in manifest.inputs if s.name == "sample")
    x = torch.randn((batch, *shape[1:]), generator=g)
    ehs = None
    e = [s for s in manifest.inputs if s.name == "encoder_hidden_states"]
    if e:
        ehs = torch.randn((batch, *e[0].shape[1:]), generator=g)
    return x, 0.97 * x + 0.05 * torch.randn(x.shape, generator=g), ehs


class Timed:
    """One row: call() runs its graph once (primed before for step rows). `pool` shares one runner between
    the prime and step rows of the same graphs, runtime, precision and cache mode."""

    def __init__(self, v: Variant, folder: Path, threads: int, batch: int, pool: dict):
        key = (v.runtime, v.graphs, v.precision, v.cache_mode)
        if key not in pool:
            if not pool:
                _release(pool)
            before = rss_mb()
            runner = make(v, folder, threads)
            runner.activate()
            pool[key] = (runner, before)
        self.v, (self.runner, before) = v, pool[key]
        self.x, self.x2, self.ehs = inputs(self.runner.manifest, batch)
        self.cache_bytes = self.runner.manifest.cache_bytes_per_sample
        for _ in range(2):
            self.call()
        self.mem_mb = rss_mb() - before  # of the shared runner, up to this row's warm-up
        self.times: list[float] = []

    def call(self) -> float:
        r = self.runner
        if self.v.role == "prime":
            r.reset()
            t0 = time.perf_counter()
            r.prime(self.x, 520.0, self.ehs)
        else:
            if r.batch_size is None:
                r.prime(self.x, 520.0, self.ehs)
            t0 = time.perf_counter()
            r.step(self.x2, 480.0, self.ehs)
        return time.perf_counter() - t0


def run_model(graphs, vs, threads, rounds, batch, interleave) -> list[dict]:
    torch.set_num_threads(threads)
    results, pool = [], {}
    if interleave:
        loaded = [Timed(v, graphs[v.graphs], threads, batch, pool) for v in vs]
        for _ in tqdm(range(rounds), desc=f"rounds ({threads} thread(s))", leave=False):
            for t in loaded:
                t.times.append(t.call())
        results = [_row(t) for t in loaded]
    else:
        # SD size: one runner at a time. Each pass loads every runner in turn, times 2 calls per row and
        # releases it; medians over `rounds` passes, so slow drifts of the machine's load hit all rows alike.
        from modiff_export.manifest import Manifest

        def key(v):
            return (v.runtime, v.graphs, v.precision, v.cache_mode)

        order = sorted(vs, key=key)
        timed: dict[Variant, list[float]] = {v: [] for v in order}
        mem: dict[Variant, float] = {v: 0.0 for v in order}
        for _ in tqdm(range(rounds), desc=f"passes ({threads} thread(s))", leave=False):
            for v in order:
                if pool and key(v) not in pool:
                    _release(pool)
                t = Timed(v, graphs[v.graphs], threads, batch, pool)
                timed[v] += [t.call() for _ in range(2)]
                mem[v] = max(mem[v], t.mem_mb)
                tqdm.write(f"{v.label} [{v.runtime}, {v.precision}]: {1e3 * statistics.median(timed[v]):.1f} ms")
            _release(pool)
        for v in order:
            t = Timed.__new__(Timed)
            t.v, t.times, t.mem_mb = v, timed[v], mem[v]
            t.cache_bytes = Manifest.load(graphs[v.graphs], verify=False).cache_bytes_per_sample
            results.append(_row(t))
    pool.clear()
    gc.collect()
    return results


def _release(pool: dict) -> None:
    """Drop the pooled runners and hand freed memory back to the OS (so the next RSS baseline is honest)."""
    import ctypes

    pool.clear()
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _row(t: Timed) -> dict:
    return {**t.v.__dict__, "ms": 1e3 * statistics.median(t.times), "mem_mb": t.mem_mb, "cache_bytes": t.cache_bytes}


# -- table --------------------------------------------------------------------------------------
def trajectory_ms(rows: list[dict], r: dict) -> float:
    """prime + 24 steps for a MoDiff step row (prime of the same runtime/precision), else 25 calls."""
    if r["role"] != "step":
        return STEPS * r["ms"]
    prime = next(p for p in rows if p["graphs"] == r["graphs"] and p["role"] == "prime" and p["runtime"] == r["runtime"]
                 and p["precision"] == r["precision"])
    return prime["ms"] + (STEPS - 1) * r["ms"]


def table(rows: list[dict], batch_note: str) -> list[str]:
    labels = list(dict.fromkeys(r["label"] for r in rows))
    get = {(r["label"], r["runtime"]): r for r in rows}
    fp = {rt: get.get(("FP32 graph", rt)) for rt in ("ort", "openvino")}
    bf = get.get(("FP graph, OpenVINO default precision (bf16)", "openvino"))
    head = ["graph (" + batch_note + ")", "ORT ms", "ORT x FP32", "ORT traj. x FP32", "ORT MB", "OV ms", "OV x FP32",
            "OV traj. x FP32", "OV traj. x FP-bf16", "OV MB", "cache bytes / sample"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in labels:
        cells, cache = [label], 0
        for rt in ("ort", "openvino"):
            r = get.get((label, rt))
            if r is None:
                cells += ["-"] * (5 if rt == "openvino" else 4)
                continue
            cache = r["cache_bytes"] if r["role"] == "step" or "prime" in label else 0
            base = fp[rt]
            cells += [f"{r['ms']:.1f}", f"{r['ms'] / base['ms']:.2f}",
                      f"{trajectory_ms(rows, r) / trajectory_ms(rows, base):.2f}"]
            if rt == "openvino":
                cells.append(f"{trajectory_ms(rows, r) / trajectory_ms(rows, bf):.2f}" if bf else "-")
            cells.append(f"{r['mem_mb']:.0f}")
        cells.append(f"{cache / 2**20:.2f} MiB" if cache else "0")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_line() -> str:
    info = Path("/proc/cpuinfo").read_text()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
                platform.processor())
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    have = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in
                     ("avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni"))
    return f"{name}, {os.cpu_count()} cores ({have})"


def versions() -> str:
    import onnxruntime
    import openvino

    ov_version = openvino.__version__.split("-")[0]
    return f"onnxruntime {onnxruntime.__version__}, openvino {ov_version}, torch {torch.__version__}"


@click.command()
@click.option("--models", default="digits,cifar,sd15", show_default=True, help="Comma list of digits, cifar, sd15.")
@click.option("--threads", "threads_list", default="1,2", show_default=True,
              help="Comma list of intra-op thread counts.")
@click.option("--rounds", default=5, show_default=True, type=click.IntRange(1),
              help="Timed calls per variant (medians).")
@click.option("--batch", default=4, show_default=True, type=click.IntRange(1),
              help="Images per call (sd15: UNet batch 2x this, CFG).")
@click.option("--sd-batch", default=1, show_default=True, type=click.IntRange(1),
              help="sd15 images per call (UNet batch 2x, CFG).")
@click.option("--sd-configs", default="fp,ptq-w8a8,modiff-w8a8", show_default=True,
              help="sd15 graphs to export and time (each SD-size export takes ~5-15 min and ~11-13 GB).")
@click.option("--sd-latent", default=16, show_default=True, type=click.IntRange(8), help="sd15 latent height = width.")
@click.option("--quick", is_flag=True, help="Fewer rows (no ping-pong step rows).")
@click.option("--work", default="/tmp/runtime_speed", show_default=True, type=click.Path(file_okay=False),
              help="Folder for models and exported graphs (kept and reused).")
@click.option("--doc", default=None, type=click.Path(dir_okay=False), help="Write the tables to this markdown file.")
def main(models, threads_list, rounds, batch, sd_batch, sd_configs, sd_latent, quick, work, doc):
    """Interleaved CPU speed table, ONNX Runtime vs OpenVINO, FP32 vs peer vs PTQ vs MoDiff."""
    work = Path(work)
    cmd = "python benchmarks/runtime_speed.py " + " ".join(sys.argv[1:])
    out = [f"Command: `{cmd}`", "", f"CPU: {cpu_line()}; {versions()}.",
           f"Load average before: {loadavg()}.", ""]
    print("\n".join(out), flush=True)
    for name in models.split(","):
        spec = model_folder(name, work, sd_latent)
        cond = name == "sd15"
        graphs = export_graphs(name, spec, work, sd_latent, sd_configs.split(",") if cond else list(CONFIGS))
        if not cond:
            graphs["peer"] = export_peer(spec, graphs["fp"], batch)
        b = 2 * sd_batch if cond else batch
        note = f"batch {b}" + (f" = CFG 2 x {sd_batch}, latent {sd_latent}x{sd_latent}" if cond else "")
        for threads in [int(t) for t in threads_list.split(",")]:
            t0 = time.time()
            mixed = "modiff-w8a4" if "modiff-w8a4" in graphs else "modiff-w8a8"
            vs = [v for v in variants(not cond, quick, mixed) if v.graphs in graphs]
            rows = run_model(graphs, vs, threads, rounds, b, interleave=not cond)
            how = ("interleaved rounds" if not cond else
                   "passes; in each pass every variant is loaded, timed twice and released in turn (too big to "
                   "hold together), so the median is over 2 x passes calls")
            block = [f"### {name}, {threads} thread(s), {note}", "",
                     f"Median of {rounds} {how}; {time.time() - t0:.0f} s; load average after: {loadavg()}.", ""]
            block += table(rows, note) + [""]
            print("\n".join(block), flush=True)
            print("RAW " + json.dumps(rows), flush=True)
            out += block
            if name == "cifar" and threads == 1 and not quick:
                out += cache_block(spec, work, graphs, rounds, batch)
    out.append(f"Peak RSS of the benchmark process: "
               f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GB.")
    if doc:
        from modiff_export.fsutil import atomic_write_text

        atomic_write_text(doc, "\n".join(out) + "\n")
        print(f"wrote {doc}")


def cache_block(spec: str, work: Path, graphs: dict, rounds: int, batch: int) -> list[str]:
    """Stateful vs ping-pong caches, float32 vs float16 caches (W8A4 step, OpenVINO f32 hint, 1 thread)."""
    folder = work / "graphs" / "cifar" / "modiff-w8a4-f16cache"
    if not _exported(folder):
        subprocess.run([*CLI, "export", "--model", spec, "--act-bits", "4",
                        "--cache-dtype", "float16", "--out", str(folder), "--quiet"], check=True)
    graphs = {**graphs, "modiff-w8a4-f16cache": folder}
    rows = run_model(graphs, cache_variants(), 1, rounds, batch, interleave=True)
    base = rows[0]["ms"]
    lines = ["### cifar: OpenVINO cache handling (W8A4 step, f32 hint, 1 thread, batch " + f"{batch})", "",
             f"Median of {rounds} interleaved rounds; load average after: {loadavg()}.", "",
             "| step graph | ms / call | x stateful float32 | cache bytes / sample | MB (runner) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['ms']:.1f} | {r['ms'] / base:.2f} | {r['cache_bytes'] / 2**20:.1f} MiB | "
              f"{r['mem_mb']:.0f} |" for r in rows]
    print("\n".join(lines), flush=True)
    return lines + [""]


def demo_speed_table(work: Path | str = "/tmp/runtime_speed", threads: int = 1, rounds: int = 3, batch: int = 4) -> str:
    """A short CIFAR-architecture speed table for `cli.py demo` (markdown; random weights: speed only). Costs the
    exports the first time (fp, ptq-w8a8, modiff-w8a4: 10-30 s, 15-50 s, 90-470 s on this shared machine depending
    on load) plus ~80 s of timing and ~3.9 GB peak RSS."""
    work = Path(work)
    spec = model_folder("cifar", work, 16)
    graphs = export_graphs("cifar", spec, work, 16, ("fp", "ptq-w8a8", "modiff-w8a4"))
    vs = [v for v in variants(False, quick=True) if v.graphs in graphs]
    with contextlib.redirect_stdout(sys.stderr):
        rows = run_model(graphs, vs, threads, rounds, batch, interleave=True)
    return "\n".join(table(rows, f"batch {batch}"))



    main()
