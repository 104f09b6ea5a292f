"""OpenVINO CPU speed: FP f32 / FP default precision / NNCF int8 / PTQ W8A8 / MoDiff, interleaved rounds.

    python benchmarks/runtime_speed.py [--models cifar,digits,sd15,dit_s2,pixart] [--threads 1] [--rounds 7] [--batch 4]
        [--profile] [--memory] [--levers none,minmax,update,share,...] [--sd-latent 16] [--doc FILE]
        [--reuse-depths 1,2 | --reuse-depths none] [--forecast-depths 1 | --forecast-depths none]

Models (random weights except digits; nothing downloaded): `cifar` (the CIFAR-10 DDPM UNet architecture,
35.7M params, 32x32), `digits` (the shipped 16x16 model), `sd15` (Stable Diffusion 1.5's UNet at a
--sd-latent latent, classifier-free guidance: UNet batch 2 x --batch; NNCF calibrated on FP trajectories with
random encoder states, as the rows are timed: a speed row, not a quality one),
`dit_s2` (DiT-S/2: hidden 384, depth 12, 6 heads, patch 2, 32x32x4 latent,
1000 classes; CFG: batch 2 x --batch, cond + null class; NNCF calibrated on class-conditional FP trajectories)
`pixart` (PixArt-alpha's transformer at a --sd-latent latent, 120 caption tokens of 4096 channels, CFG,
NNCF as for sd15), `flux` (FLUX.1-dev's architecture at reduced depth, FLUX_DEPTH double,single blocks: hidden
3072, 24 heads, guidance embedding, packed latents; --sd-latent 64 gives its 1024 image tokens beside 512 text
tokens; guidance embedded, so one pass per step, batch --batch) and `sd3m` (SD3-medium's MMDiT at SD3_DEPTH
joint blocks: hidden 1536, 24 heads, 333 text tokens of 4096, pooled 2048; CFG). Block reuse on transformers
reuses the blocks between the first D and the last D (D = 0: all of them; docs/design.md section 1.1).
Rows and how each runs: modiff_export/harness/speed.py. `--profile` prints
OpenVINO's per-node counters (PERF_COUNT) summed by node type for every row; `--memory` the peak RSS of a
process that loads one runner and runs a trajectory's first calls; `--levers` adds MoDiff step rows with
other step-graph forms (export/ov_variant.py; `none` = the exported graph as it is). `--reuse-depths` adds
block reuse (docs/design.md section 1.1): MoDiff prime/step/shallow and FP DeepCache full/shallow rows per depth,
`--forecast-depths` MoDiff rows of folders exported with `--reuse-forecast linear` (`--forecast taylor`: the
second order; section 1.2: the calls include the runner's forecast work), the NNCF int8 peer with the same
reuse (nncf.quantize of the FP reuse folder's full and shallow graphs, harness/speed.export_nncf_reuse), and a
table of 25-call trajectories at intervals 2-5 (`--reuse-warmup W`: the first W calls full) against FP default
and NNCF int8 (harness/speed.py).
The CPU flags and the 1-minute load average are printed before and after; above 1.0 the figures are noise.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from modiff_export.harness import speed  # noqa: E402
from modiff_export.harness.latency import cpu_line, loadavg  # noqa: E402


def load_note() -> str:
    load = loadavg()
    warn = float(load) > 1.0 if load.replace(".", "", 1).isdigit() else False
    return f"1-min load average {load}" + (" (WARNING: above 1.0, absolute figures are noise)" if warn else "")


def versions() -> str:
    import nncf
    import openvino
    import torch

    return f"openvino {openvino.__version__.split('-')[0]}, nncf {nncf.__version__}, torch {torch.__version__}"


def model_spec(name: str, work: Path, sd_latent: int) -> str:
    from modiff_export.harness.arch_models import write_model

    if name in ("digits", "digits_b", "digits_dit", "digits_dit_b", "digits_flux", "digits_sd3"):
        return name
    if name in ("cifar", "dit_s2"):
        return str(write_model(name, work / "models" / name))
    depth = tuple(int(d) for d in FLUX_DEPTH.split(",")) if name == "flux" else (SD3_DEPTH, 0)
    tag = f"{name}-{sd_latent}" + (f"-d{FLUX_DEPTH.replace(',', '-')}" if name == "flux" else
                                   f"-d{SD3_DEPTH}" if name == "sd3m" else "")
    return str(write_model(name, work / "models" / tag, latent=sd_latent, depth=depth))  # sd15, pixart, flux, sd3m


TEXT_CONDITIONED = ("sd15", "pixart", "flux", "sd3m")  # random encoder states (and pooled projections)
CFG_MODELS = ("sd15", "pixart", "dit_s2", "sd3m")      # batch = 2 x --batch; flux: guidance embedded, one pass
FLUX_DEPTH, SD3_DEPTH = "1,1", 2  # double,single blocks of the flux row; joint blocks of the sd3m row


def lever_rows(spec: str, bits: str) -> list[speed.Variant]:
    """Extra MoDiff step rows, one per lever set ("none" = the exported graph; "a+b" = levers a and b)."""
    out, b = [], bits.upper()
    for s in spec.split(","):
        levers = () if s == "none" else tuple(s.split("+"))
        out.append(speed.Variant(f"MoDiff {b} step, levers {s}", f"modiff-{bits}", "step",
                                 runner=(("levers", levers),), prime_of=f"MoDiff {b} prime (runner)"))
    return out


def profile(vs, graphs, threads, batch, static: bool, calls: int = 3) -> list[str]:
    """Per-node-type counters (min over `calls` per node, summed by node and exec type), one column per row."""
    cols, keys = {}, defaultdict(float)
    for v in vs:
        t = speed.Timed(v, graphs[v.graphs], threads, batch, {}, extra={"PERF_COUNT": True}, static=static)
        best: dict[str, tuple] = {}
        for _ in range(calls):
            t.call()
            for i, req in enumerate(t.requests()):
                for p in req.profiling_info:
                    if p.status.name != "EXECUTED":
                        continue
                    ms, node = p.real_time.total_seconds() * 1e3, (i, p.node_name)
                    if node not in best or ms < best[node][1]:
                        best[node] = ((p.node_type, p.exec_type), ms)
        agg = defaultdict(lambda: [0, 0.0])
        for k, ms in best.values():
            agg[k][0] += 1
            agg[k][1] += ms
            keys[k] += ms
        cols[v.label] = agg
        del t
    top = sorted(keys, key=lambda k: -keys[k])[:18]
    head = ["node type (exec type)"] + [f"{lab}: nodes / ms" for lab in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in top:
        lines.append(f"| {k[0]} ({k[1]}) | " + " | ".join(
            f"{a[k][0]} / {a[k][1]:.1f}" if k in a else "-" for a in cols.values()) + " |")
    rest = [sum(ms for kk, (_, ms) in a.items() if kk not in top) for a in cols.values()]
    lines.append("| other | " + " | ".join(f"{r:.1f}" for r in rest) + " |")
    lines.append("| **total** | " + " | ".join(f"**{sum(ms for _, ms in a.values()):.1f}**" for a in cols.values())
                 + " |")
    return lines


CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
import torch
from pathlib import Path
from modiff_export.harness import speed
d = json.loads({variant!r})
d["runner"] = tuple((k, tuple(x) if isinstance(x, list) else x) for k, x in d["runner"])
v = speed.Variant(**d)
def hwm():  # VmHWM: peak RSS of this process image (ru_maxrss would include the parent's, kept across exec)
    line = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM"))
    return int(line.split()[1]) / 1024
base = hwm()
t = speed.Timed(v, Path({folder!r}), {threads}, {batch}, {{}}, static={static})
for _ in range(3):
    t.call()
print(json.dumps({{"peak_mb": hwm(), "added_mb": hwm() - base}}))
"""


def peak_rss(v: speed.Variant, folder: Path, threads: int, batch: int, static: bool) -> dict:
    """Peak RSS of a fresh process that loads one row's runner / compiled model and runs it (MB)."""
    d = {k: (list(x) if isinstance(x, tuple) else x) for k, x in v.__dict__.items()}
    code = CHILD.format(root=str(Path(__file__).resolve().parent.parent), variant=json.dumps(d), folder=str(folder),
                        threads=threads, batch=batch, static=static)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def memory_block(vs, graphs, threads, batch, static) -> list[str]:
    from modiff_export.manifest import Manifest

    lines = ["| row | peak RSS of the process (MB) | added by loading + running (MB) | 2 x cache bytes of the "
             "batch (MB) |", "|---|---|---|---|"]
    stepped = {v.graphs for v in vs if v.role == "step"}
    for v in vs:
        if v.role == "prime" and v.graphs in stepped:  # the step row's process loads the same runner and primes
            continue
        m = peak_rss(v, graphs[v.graphs], threads, batch, static)
        cache = 2 * batch * Manifest.load(graphs[v.graphs], onnx=False).cache_bytes_per_sample / 2**20
        label = v.label.replace(" step (", " prime + step (") if v.role == "step" else v.label
        lines.append(f"| {label} | {m['peak_mb']:.0f} | {m['added_mb']:.0f} | {cache:.0f} |")
    return lines


@click.command()
@click.option("--models", default="cifar", show_default=True,
              help="Comma list of cifar, digits, sd15, dit_s2, pixart, flux, sd3m, digits_dit, digits_dit_b, "
                   "digits_flux.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1), help="Intra-op threads.")
@click.option("--rounds", default=7, show_default=True, type=click.IntRange(1), help="Interleaved rounds (medians).")
@click.option("--batch", default=4, show_default=True, type=click.IntRange(1),
              help="Images per call (sd15, pixart, dit_s2: model batch 2x this, CFG).")
@click.option("--bits", default="w8a4", show_default=True, type=click.Choice(["w8a4", "w8a8"]), help="MoDiff rows.")
@click.option("--profile", "do_profile", is_flag=True, help="Print the per-node-type counters of every row.")
@click.option("--memory", is_flag=True, help="Peak RSS of each runner in its own process.")
@click.option("--levers", default=None, help="Extra MoDiff step rows: comma list of lever sets (none, a+b, ...).")
@click.option("--sd-latent", default=16, show_default=True, type=click.IntRange(8),
              help="sd15 / pixart latent height = width.")
@click.option("--work", default="/tmp/runtime_speed", show_default=True, type=click.Path(file_okay=False),
              help="Folder for models and exported graphs (kept and reused).")
@click.option("--shapes", default="static", show_default=True, type=click.Choice(["static", "dynamic"]),
              help="Compile every row for the static batch (OpenVINO's advice when shapes are known; the runner's "
                   "default) or keep the graphs' dynamic batch axis.")
@click.option("--doc", default=None, type=click.Path(dir_okay=False), help="Also write the output to this file.")
@click.option("--reuse-depths", default="1,2", show_default=True,
              help="Block-reuse rows for these depths (comma list; 'none': no reuse rows).")
@click.option("--forecast-depths", default="1", show_default=True,
              help="MoDiff block-reuse rows with --reuse-forecast linear for these depths ('none': none).")
@click.option("--forecast", type=click.Choice(sorted(speed.FORECAST_KEYS)), default="lin", show_default=True,
              help="The forecast of the --forecast-depths rows: lin (linear) or tay (taylor, second order).")
@click.option("--reuse-warmup", type=click.IntRange(0), default=0, show_default=True,
              help="Reuse trajectories: the first W calls are full (QuantConfig.reuse_warmup).")
def main(models, threads, rounds, batch, bits, do_profile, memory, levers, sd_latent, work, shapes, doc, reuse_depths,
         forecast_depths, forecast, reuse_warmup):
    """Interleaved OpenVINO CPU speed table: FP f32 / FP default / NNCF int8 / PTQ W8A8 / MoDiff."""
    work = Path(work)
    out = [f"Command: `python benchmarks/runtime_speed.py {' '.join(sys.argv[1:])}`", "",
           f"CPU: {cpu_line()}; {versions()}.", f"Before: {load_note()}.", ""]
    print("\n".join(out), flush=True)
    for name in models.split(","):
        spec = model_spec(name, work, sd_latent)
        cond = name in CFG_MODELS
        root = work / "graphs" / (Path(spec).name if name in TEXT_CONDITIONED else name)
        no_reuse = reuse_depths == "none"
        depths = () if no_reuse else tuple(int(d) for d in reuse_depths.split(","))
        fdepths = () if no_reuse or forecast_depths == "none" else tuple(int(d) for d in forecast_depths.split(","))
        reuse_keys = speed.reuse_keys(bits, depths, fdepths, forecast)
        graphs = speed.export_graphs(spec, root, ("fp", "ptq-w8a8", f"modiff-{bits}", *reuse_keys))
        vs = speed.main_variants(bits) + speed.reuse_variants(bits, depths, fdepths, forecast, nncf=True)
        graphs["nncf"] = speed.export_nncf(spec, graphs["fp"], batch)
        for d in depths:  # the peer with the same reuse: NNCF int8 of the FP reuse folder's two graphs
            graphs[f"nncf-d{d}"] = speed.export_nncf_reuse(spec, graphs[f"fp-d{d}"], batch)
        if levers:
            vs += lever_rows(levers, bits)
        b = 2 * batch if cond else batch
        latent = f", latent {sd_latent}x{sd_latent}" if name in TEXT_CONDITIONED else ""
        note = f"batch {b}" + (f" = CFG 2 x {batch}{latent}" if cond else "") + f", {threads} thread(s)"
        t0, before = time.time(), load_note()
        static = shapes == "static"
        rows = speed.time_rows(vs, graphs, threads, rounds, b, static)
        block = [f"### {name}, {note}", "", f"Median of {rounds} interleaved rounds; {time.time() - t0:.0f} s; before: "
                 f"{before}; after: {load_note()}.", "", *speed.table(rows, note), "",
                 "Spread (min-max ms over the rounds): " + "; ".join(
                     f"{r['label']} {r['spread'][0]:.1f}-{r['spread'][1]:.1f}" for r in rows) + ".", "",
                 "Spread of CPU ms: " + "; ".join(
                     f"{r['label']} {r['cpu_spread'][0]:.1f}-{r['cpu_spread'][1]:.1f}" for r in rows) + ".", "",
                 speed.verdict(rows), ""]
        if depths or fdepths:
            warm = f", the first {reuse_warmup} calls full" if reuse_warmup else ""
            block += [f"Block reuse, trajectories of 25 calls from the rows above{warm}:", "",
                      *speed.reuse_table(rows, warmup=reuse_warmup), ""]
        from modiff_export.harness.nncf_peer import nncf_settings_text

        states = ", random encoder states" if name in TEXT_CONDITIONED else ""
        block += [f"NNCF settings: {nncf_settings_text()}; calibrated on 2 FP trajectories (the model's own sampler, "
                  f"10 steps, batch "
                  f"{batch}{states}) of the same model.", ""]
        print("\n".join(block), flush=True)
        print("RAW " + json.dumps(rows), flush=True)
        out += block
        if do_profile:
            prof = [f"#### {name}: OpenVINO per-node counters (PERF_COUNT, ms of one call, min over 3 calls per node)",
                    "", *profile(vs, graphs, threads, b, static), "", f"After profiling: {load_note()}.", ""]
            print("\n".join(prof), flush=True)
            out += prof
        if memory:
            mem = [f"#### {name}: peak RSS, one process per row", "", *memory_block(vs, graphs, threads, b, static), ""]
            print("\n".join(mem), flush=True)
            out += mem
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out.append(f"Peak RSS of the benchmark process: {peak:.1f} GB; after: {load_note()}.")
    print(out[-1])
    if doc:
        from modiff_export.fsutil import atomic_write_text

        atomic_write_text(doc, "\n".join(out) + "\n")
        print(f"wrote {doc}")


if __name__ == "__main__":
    main()
