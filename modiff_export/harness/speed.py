"""OpenVINO CPU speed of what a MoDiff user compares: FP (f32 and the runtime's default precision), NNCF
int8 (OpenVINO's own post-training quantizer), PTQ W8A8 and MoDiff (prime and step) through the runner.

Rows (`Variant`) are timed in interleaved rounds (round r calls every row once; medians), so they see the
same machine load. Baselines (FP, NNCF) run through OpenVINO's own API (`compile_model`, one thread,
LATENCY hint; `hint` None = the plugin's default precision); PTQ and MoDiff through
`OpenVinoRunner` with its defaults. A trajectory is prime + 24 steps for MoDiff, 25 calls otherwise.
Block reuse (`reuse_variants`): one folder per depth D (exported with interval 2; the graphs do not depend on
the interval), its prime / step / shallow calls timed as rows through the runner, and the trajectory of each
interval N the sum of its 25 calls by the runners' schedule (`quant.call_role`: prime, then shallow unless
i % N == 0), beside DeepCache (FP, the same D, OpenVINO's default precision through the runner).
`demo_speed_table` is the demo's speed section; benchmarks/runtime_speed.py is the command line.
"""
from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .latency import cpu_line, loadavg

CLI = [sys.executable, "-m", "modiff_export"]  # exports run in a child process: its memory is returned
STEPS = 25
CONFIGS = {"fp": ("fp", 8, 8), "ptq-w8a8": ("ptq", 8, 8), "modiff-w8a8": ("modiff", 8, 8),
           "modiff-w8a4": ("modiff", 8, 4)}
REUSE_INTERVALS = (2, 3, 4, 5)
REUSE_DEPTHS = (1, 2)
FORECAST_DEPTHS = (1,)  # MoDiff rows with the linear feature forecast (design section 1.2)


FORECAST_KEYS = {"lin": "linear", "tay": "taylor"}  # export-key suffix -> --reuse-forecast


def reuse_key(base: str, depth: int, forecast: str = "") -> str:
    """The export key of `base` (a CONFIGS key) with block reuse of depth D: '<base>-d<D>[-lin|-tay]'."""
    return f"{base}-d{depth}" + (f"-{forecast}" if forecast else "")


def config_args(key: str) -> list[str]:
    """`cli.py export` options of an export key (a CONFIGS key, or reuse_key(...) of one)."""
    base, _, depth = key.partition("-d")
    depth, _, fc = depth.partition("-")
    mode, w, a = CONFIGS[base]
    args = ["--mode", mode, "--weight-bits", str(w), "--act-bits", str(a)]
    args += ["--reuse-interval", "2", "--reuse-depth", depth] if depth else []
    return args + (["--reuse-forecast", FORECAST_KEYS[fc]] if fc else [])


def reuse_keys(bits: str = "w8a4", depths=REUSE_DEPTHS, forecast_depths=FORECAST_DEPTHS,
               forecast: str = "lin") -> tuple[str, ...]:
    """The export keys reuse_variants(bits, depths, forecast_depths, forecast) time."""
    return (*(reuse_key(k, d) for d in depths for k in (f"modiff-{bits}", "fp")),
            *(reuse_key(f"modiff-{bits}", d, forecast) for d in forecast_depths))


FP_DEFAULT, NNCF = "FP graph, OpenVINO default precision", "NNCF int8 (nncf.quantize of the FP graph)"


@dataclass(frozen=True)
class Variant:
    label: str
    graphs: str                      # key into the exported folders
    role: str = "prime"              # "prime", "step" or "shallow"
    plain: bool = False              # OpenVINO's own API (baselines) instead of OpenVinoRunner
    hint: str | None = None          # plain: INFERENCE_PRECISION_HINT (None: the plugin's default)
    runner: tuple = ()               # OpenVinoRunner keyword arguments beyond threads, as (key, value) pairs
    prime_of: str | None = None      # step rows: the label of the prime row of their trajectory
    per_call: bool = False           # block-reuse rows: their trajectories are reuse_table's, not table's


def main_variants(bits: str = "w8a4") -> list[Variant]:
    b = bits.upper()
    return [Variant("FP graph, f32", "fp", plain=True, hint="f32"), Variant(FP_DEFAULT, "fp", plain=True),
            Variant(NNCF, "nncf", plain=True), Variant("PTQ W8A8 (runner)", "ptq-w8a8"),
            Variant(f"MoDiff {b} prime (runner)", f"modiff-{bits}"),
            Variant(f"MoDiff {b} step (runner)", f"modiff-{bits}", "step", prime_of=f"MoDiff {b} prime (runner)")]


def reuse_variants(bits: str = "w8a4", depths=REUSE_DEPTHS, forecast_depths=FORECAST_DEPTHS,
                   forecast: str = "lin", nncf: bool = False) -> list[Variant]:
    """Per depth: MoDiff prime / step / shallow rows of the reuse folder, and DeepCache's full / shallow rows
    (FP, OpenVINO's default precision, through the runner), with `nncf` also the NNCF int8 peer of that FP
    reuse folder (export_nncf_reuse); per forecast depth the MoDiff rows of a folder with --reuse-forecast
    linear / taylor (its calls include the runner's forecast work)."""
    b, out = bits.upper(), []

    def modiff(name: str, key: str) -> list[Variant]:
        prime = f"{name} prime (runner)"
        return [Variant(prime, key, per_call=True),
                Variant(f"{name} step (runner)", key, "step", prime_of=prime, per_call=True),
                Variant(f"{name} shallow (runner)", key, "shallow", prime_of=prime, per_call=True)]

    for d in depths:
        out += modiff(f"MoDiff {b} reuse D={d}", reuse_key(f"modiff-{bits}", d))
        full, default, fp = f"DeepCache FP D={d} full (runner)", (("precision", "default"),), reuse_key("fp", d)
        out += [Variant(full, fp, runner=default, per_call=True),
                Variant(f"DeepCache FP D={d} shallow (runner)", fp, "shallow", runner=default, prime_of=full,
                        per_call=True)]
        if nncf:
            full = f"NNCF int8 reuse D={d} full (runner)"
            out += [Variant(full, f"nncf-d{d}", runner=default, per_call=True),
                    Variant(f"NNCF int8 reuse D={d} shallow (runner)", f"nncf-d{d}", "shallow", runner=default,
                            prime_of=full, per_call=True)]
    for d in forecast_depths:
        out += modiff(f"MoDiff {b} reuse+{FORECAST_KEYS[forecast]} D={d}", reuse_key(f"modiff-{bits}", d, forecast))
    return out


# -- graphs -------------------------------------------------------------------------------------
def exported(folder: Path) -> bool:
    from ..manifest import Manifest, ManifestError

    try:
        Manifest.load(folder)
    except ManifestError:
        return False
    return True


def export_graphs(spec: str, root: Path, keys=tuple(CONFIGS), quiet: bool = True) -> dict[str, Path]:
    """Export (once) the `keys` configs of model `spec` into root/<key>, each in a child `cli.py export`."""
    out = {}
    for key in keys:
        folder = root / key
        if not exported(folder):
            print(f"exporting {key} -> {folder}", file=sys.stderr, flush=True)
            subprocess.run([*CLI, "export", "--model", spec, *config_args(key), "--out", str(folder),
                            *(["--quiet"] if quiet else [])], check=True)
        out[key] = folder
    return out


def export_nncf(spec: str, fp_folder: Path, batch: int, seeds: int = 2, steps: int = 10) -> Path:
    """NNCF int8 of the FP graph, calibrated on `seeds` FP trajectories (DDIM `steps`, batch `batch`): class
    labels with the null class for class-conditional models, random encoder states [B, S, D] (seeded, zeros as
    the uncond half) for text-conditional ones, as the timed rows get (random weights: a speed row only)."""
    from ..backends.openvino_runner import OpenVinoRunner
    from .nncf_peer import nncf_quantize
    from .recorder import Recorder

    out = fp_folder.parent / "nncf"
    if exported(out):
        return out
    rec = Recorder(OpenVinoRunner(fp_folder, threads=1, precision="f32"))
    _fp_trajectories(spec, fp_folder, rec, batch, seeds, steps)
    return nncf_quantize(fp_folder, out, rec.inputs)


def _fp_trajectories(spec: str, folder: Path, rec, batch: int, seeds: int, steps: int) -> None:
    """Run `seeds` FP trajectories of model `spec` through `rec` (a recording runner over `folder`): the NNCF
    peers' calibration. Conditional models: cond and uncond (null class / zero content) in one CFG call
    (guidance 4)."""
    from ..manifest import Manifest
    from ..models import load_model
    from ..sampling import generate, make_scheduler

    m = load_model(spec)
    manifest = Manifest.load(folder)
    for seed in range(seeds):
        _, _, cond = inputs(manifest, batch, seed)
        if m.num_classes is not None:
            cond = {manifest.conditioning.labels.name: torch.arange(batch) % m.num_classes}
        generate(rec, make_scheduler("auto", m.scheduler_config), steps, batch, seed, m.sample_shape, cond, None,
                 guidance_scale=4.0 if manifest.conditioning.guided else 1.0, progress=False)


def export_nncf_reuse(spec: str, fp_reuse: Path, batch: int, seeds: int = 2, steps: int = 10) -> Path:
    """NNCF int8 of an FP reuse folder's full and shallow graphs (nncf_peer.nncf_quantize_reuse), calibrated on
    `seeds` FP reuse trajectories of the folder's own schedule (interval 2), as export_nncf."""
    from ..backends.openvino_runner import OpenVinoRunner
    from .nncf_peer import nncf_quantize_reuse

    out = fp_reuse.parent / f"nncf-{fp_reuse.name.rsplit('-', 1)[-1]}"  # fp-d0 -> nncf-d0
    if exported(out):
        return out
    rec = _RoleRecorder(OpenVinoRunner(fp_reuse, threads=1, precision="f32"))
    _fp_trajectories(spec, fp_reuse, rec, batch, seeds, steps)
    return nncf_quantize_reuse(fp_reuse, out, rec.full, rec.shallow)


class _RoleRecorder:
    """Wraps a reuse runner; keeps each full call's inputs and each shallow call's inputs with the feature read."""

    def __init__(self, runner):
        self.runner, self.full, self.shallow = runner, [], []
        self.conditioning, self.packed = runner.conditioning, runner.packed

    def reset(self):
        self.runner.reset()

    def __call__(self, sample, t, cond=None, mask=None):
        role = "prime" if self.runner.batch_size is None or self.runner.new_trajectory(sample, t) \
            else self.runner.schedule()
        c = self.conditioning.as_mapping(cond, "recorder") if cond is not None else {}
        item = (sample.clone(), float(torch.as_tensor(t).flatten()[0]), {k: v.clone() for k, v in c.items()})
        if role == "shallow":
            self.shallow.append((*item, self.runner.feature_impl().clone()))
        else:
            self.full.append(item)
        return self.runner(sample, t, cond, mask)


# -- timing -------------------------------------------------------------------------------------
def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def inputs(manifest, batch: int, seed: int = 0):
    """(sample, a sample close to it for the step call, the conditioning {name: tensor}): random content
    (encoder states, pooled vectors), random class labels [B] int64 (no null class), the other inputs' defaults
    (models/conditioning.py Conditioning.example)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *manifest.model.graph_sample_shape), generator=g)
    cond = manifest.conditioning.example(batch, manifest.model.sample_size, g)
    labels = manifest.conditioning.labels
    if labels is not None:
        cond[labels.name] = torch.randint(0, labels.num_classes, (batch,), generator=g)
    return x, 0.97 * x + 0.05 * torch.randn(x.shape, generator=g), cond


def compile_plain(folder: Path, threads: int, hint: str | None, extra: dict | None = None, batch: int | None = None):
    """The graph of a folder compiled as an OpenVINO user would (no runner); with `batch`, reshaped to that
    static batch first (`model.reshape`, as OpenVINO recommends when the shapes are known)."""
    import openvino as ov

    from ..manifest import Manifest

    cfg = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", **(extra or {})}
    if hint:
        cfg["INFERENCE_PRECISION_HINT"] = hint
    core = ov.Core()
    model = core.read_model(str(folder / Manifest.load(folder, onnx=False).graphs["prime"]))
    if batch is not None:
        from ..backends.openvino_runner import with_batch

        with_batch(model, batch)
    return core.compile_model(model, "CPU", cfg)


class Timed:
    """One row. `pool` shares a runner between rows of the same graphs and runner options."""

    def __init__(self, v: Variant, folder: Path, threads: int, batch: int, pool: dict, extra: dict | None = None,
                 static: bool = True):
        from ..backends.openvino_runner import OpenVinoRunner
        from ..manifest import Manifest

        self.v, self.times, self.cpu = v, [], []  # wall and process CPU seconds per call
        manifest = Manifest.load(folder, onnx=False)
        self.x, self.x2, self.ehs = inputs(manifest, batch)
        self.cache_bytes = manifest.cache_bytes_per_sample
        before = rss_mb()
        if v.plain:
            self.req = compile_plain(folder, threads, v.hint, extra, batch if static else None).create_infer_request()
            self.feed = {"sample": self.x.numpy(), "timestep": torch.full((batch,), 520.0).numpy(),
                         **{k: v.numpy() for k, v in self.ehs.items()}}
        else:
            key = (v.graphs, v.runner)
            if key not in pool:
                kw = {"static_shapes": static, **dict(v.runner)}
                if extra:
                    kw["properties"] = extra
                pool[key] = OpenVinoRunner(folder, threads=threads, **kw).activate()
            self.runner = pool[key]
        for _ in range(2):
            self.call()
        self.mem_mb = rss_mb() - before

    def call(self) -> tuple[float, float]:
        """(wall, process CPU) seconds of one call. CPU time counts only what this process ran (one
        inference thread), so it moves far less than wall time when other jobs share the cores."""
        if self.v.plain:
            t0, c0 = time.perf_counter(), time.process_time()
            self.req.infer(self.feed)
            return time.perf_counter() - t0, time.process_time() - c0
        r = self.runner
        if self.v.role == "prime":
            r.reset()
            t0, c0 = time.perf_counter(), time.process_time()
            r.prime(self.x, 520.0, self.ehs)
        else:
            if r.batch_size is None:
                r.prime(self.x, 520.0, self.ehs)
            t0, c0 = time.perf_counter(), time.process_time()
            getattr(r, self.v.role)(self.x2, 480.0, self.ehs)  # step or shallow
        return time.perf_counter() - t0, time.process_time() - c0

    def requests(self) -> list:
        """The infer requests this row's call runs (for per-node counters): one, or the parts of a reuse
        folder's cut step graph (backends/ov_split.py; a shallow call runs the outer two)."""
        if self.v.plain:
            return [self.req]
        from ..backends import ov_split

        r = self.runner
        if r.parts and self.v.role in ov_split.RUNS:
            return [p.request for p in r.parts if p.name in ov_split.RUNS[self.v.role]]
        return [r.requests[self.v.role]]


def time_rows(vs: list[Variant], graphs: dict, threads: int, rounds: int, batch: int,
              static: bool = True) -> list[dict]:
    """Interleaved medians of every row; returns one dict per row (Variant fields + ms and cpu_ms, their
    spreads, mem_mb, cache_bytes). static: every row compiled for the static batch (plain rows reshaped,
    runners with static_shapes), else with the graphs' dynamic batch axis."""
    torch.set_num_threads(threads)
    pool: dict = {}
    loaded = [Timed(v, graphs[v.graphs], threads, batch, pool, static=static) for v in vs]
    for _ in range(rounds):
        for t in loaded:
            wall, cpu = t.call()
            t.times.append(wall)
            t.cpu.append(cpu)
    ms = lambda xs: 1e3 * statistics.median(xs)  # noqa: E731
    return [{**t.v.__dict__, "ms": ms(t.times), "spread": (1e3 * min(t.times), 1e3 * max(t.times)),
             "cpu_ms": ms(t.cpu), "cpu_spread": (1e3 * min(t.cpu), 1e3 * max(t.cpu)), "mem_mb": t.mem_mb,
             "cache_bytes": t.cache_bytes, "static": static} for t in loaded]


def trajectory_ms(rows: list[dict], r: dict, key: str = "ms") -> float:
    """A 25-call trajectory of row r: prime + 24 steps (step rows) or 25 calls; key "ms" (wall) or "cpu_ms"."""
    if r["prime_of"] is None:
        return STEPS * r[key]
    prime = next(p for p in rows if p["label"] == r["prime_of"])
    return prime[key] + (STEPS - 1) * r[key]


def reuse_trajectory_ms(rows: list[dict], shallow: dict, interval: int, key: str = "ms",
                        warmup: int = 0) -> tuple[float, dict, dict]:
    """ms of a STEPS-call trajectory with block reuse at `interval`, from the per-call rows of the shallow row's
    folder (prime, step and shallow for MoDiff; full and shallow for FP DeepCache), each call's role by the
    runners' schedule; and {role: ms per call}, {role: calls}."""
    from ..quant.quantization import call_role

    by = {r["label"]: r for r in rows}
    prime = by[shallow["prime_of"]]
    step = next((r for r in rows if r["graphs"] == shallow["graphs"] and r["role"] == "step"), None)
    ms = {"prime": prime[key], "step": (step or prime)[key], "shallow": shallow[key]}
    roles = [call_role(i, None, interval, step is not None, warmup) for i in range(STEPS)]
    counts = {k: roles.count(k) for k in ms if roles.count(k)}
    return sum(ms[k] * n for k, n in counts.items()), {k: ms[k] for k in counts}, counts


def reuse_table(rows: list[dict], intervals=REUSE_INTERVALS, warmup: int = 0) -> list[str]:
    """Markdown: the trajectory of every (reuse config, depth, interval) against FP default and NNCF int8
    (`warmup`: the schedule's first full calls, QuantConfig.reuse_warmup)."""
    by = {r["label"]: r for r in rows}
    base = {(k, key): trajectory_ms(rows, by[k], key)
            for k in (FP_DEFAULT, NNCF) if k in by for key in ("ms", "cpu_ms")}
    head = ["reuse config (runner)", "depth", "interval", "ms / call", f"calls of {STEPS}", "trajectory ms",
            "traj. x FP default", "traj. x NNCF int8", "CPU: traj. x FP default", "CPU: traj. x NNCF int8",
            "cache / sample"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for sh in (r for r in rows if r["role"] == "shallow"):
        name, depth = sh["label"].replace(" shallow (runner)", "").rsplit(" D=", 1)
        for n in intervals:
            total, ms, counts = reuse_trajectory_ms(rows, sh, n, warmup=warmup)
            ratio = [f"{reuse_trajectory_ms(rows, sh, n, key, warmup)[0] / base[(k, key)]:.2f}" if (k, key) in base
                     else "-"
                     for key in ("ms", "cpu_ms") for k in (FP_DEFAULT, NNCF)]
            lines.append(f"| {name} | {depth} | {n} | " + ", ".join(f"{k} {v:.1f}" for k, v in ms.items()) + " | "
                         + ", ".join(f"{v} {k}" for k, v in counts.items()) + f" | {total:.0f} | "
                         + " | ".join(ratio) + f" | {sh['cache_bytes'] / 2**20:.1f} MiB |")
    return lines


def table(rows: list[dict], note: str) -> list[str]:
    """Markdown: wall and CPU ms per call, 25-call trajectory ratios to the FP-default and NNCF rows (wall,
    then CPU time: CPU time counts only this process's own work, so it holds when the machine is shared)."""
    by = {r["label"]: r for r in rows}
    base = {(k, key): trajectory_ms(rows, by[k], key)
            for k in (FP_DEFAULT, NNCF) if k in by for key in ("ms", "cpu_ms")}
    head = [f"graph ({note})", "how it runs", "ms / call", "CPU ms / call", "trajectory ms", "traj. x FP default",
            "traj. x NNCF int8", "CPU: traj. x FP default", "CPU: traj. x NNCF int8", "cache / sample"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    shapes = "static batch" if rows and rows[0].get("static", True) else "dynamic batch"
    for r in rows:
        how = (f"OpenVINO API, {r['hint'] or 'default'} precision" if r["plain"] else
               "OpenVinoRunner, defaults" if not r["runner"] else
               "OpenVinoRunner, " + ", ".join(f"{k}={v}" for k, v in r["runner"])) + f", {shapes}"
        cache = f"{r['cache_bytes'] / 2**20:.1f} MiB" if r["cache_bytes"] else "0"
        cells = [r["label"], how, f"{r['ms']:.1f}", f"{r['cpu_ms']:.1f}"]
        if not r["per_call"] and (r["role"] == "step" or not r["label"].endswith("prime (runner)")):
            cells.append(f"{trajectory_ms(rows, r):.0f}")
            cells += [f"{trajectory_ms(rows, r, key) / base[(k, key)]:.2f}" if (k, key) in base else "-"
                      for key in ("ms", "cpu_ms") for k in (FP_DEFAULT, NNCF)]
        else:
            cells += ["-"] * 5
        lines.append("| " + " | ".join([*cells, cache]) + " |")
    return lines


def verdict(rows: list[dict]) -> str:
    """One plain sentence on what the rows show (wall-time ratios, CPU-time ratios in brackets)."""
    by = {r["label"]: r for r in rows}
    step = next((r for r in rows if r["role"] == "step" and not r["per_call"]), None)
    if step is None or FP_DEFAULT not in by:
        return ""

    def both(f) -> str:
        return f"{f('ms'):.2f}x [CPU {f('cpu_ms'):.2f}x]"

    def traj_vs(label):
        return lambda k: trajectory_ms(rows, step, k) / trajectory_ms(rows, by[label], k)

    parts = [f"a MoDiff trajectory costs {both(traj_vs(FP_DEFAULT))} the FP model at OpenVINO's default precision"]
    if NNCF in by:
        parts.append(f"{both(traj_vs(NNCF))} NNCF's int8 model")
    ptq = by.get("PTQ W8A8 (runner)")
    if ptq:
        parts.append(f"its step {both(lambda k: step[k] / ptq[k])} the PTQ W8A8 graph")
    prime = by.get(step["prime_of"])
    if prime:
        parts.append(f"its prime {both(lambda k: prime[k] / by[FP_DEFAULT][k])} the FP-default call")
    return f"On this CPU ({cpu_line()}): " + ", ".join(parts) + "."


def demo_speed_table(work: Path | str = "/tmp/runtime_speed", threads: int = 1, rounds: int = 3,
                     batch: int = 4) -> str:
    """The demo's speed section: main_variants() on the CIFAR-10 DDPM architecture (random weights),
    markdown with the load average before/after and verdict(). First call exports fp / ptq-w8a8 /
    modiff-w8a4 and the NNCF int8 model (~1-2 min)."""
    from .arch_models import write_model

    work = Path(work)
    spec = str(write_model("cifar", work / "models" / "cifar"))
    with contextlib.redirect_stdout(sys.stderr):
        graphs = export_graphs(spec, work / "graphs" / "cifar", ("fp", "ptq-w8a8", "modiff-w8a4", *reuse_keys()))
        graphs["nncf"] = export_nncf(spec, graphs["fp"], batch)
        before = loadavg()
        rows = time_rows(main_variants() + reuse_variants(), graphs, threads, rounds, batch)
    lines = table(rows, f"batch {batch}, {threads} thread(s)")
    from ..backends.cpu import CpuPath

    path = (f"CPU path of the runner rows: {CpuPath.resolve().describe()} (backends/cpu.py); the OpenVINO API rows "
            f"compile their graph as it is.")
    return "\n".join([path, "", *lines, "", "Block reuse (docs/design.md section 1.1), 25-call trajectories from the "
                      "rows above:",
                      "", *reuse_table(rows), "", f"Median of {rounds} interleaved rounds; 1-min load average {before} "
                      f"before, {loadavg()} after. {verdict(rows)}"])
