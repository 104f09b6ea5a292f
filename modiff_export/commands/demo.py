"""`cli.py demo`: the end-to-end job (export, calibration, engines, sampling on PyTorch and ONNX
Runtime, parity, quality, cost, speed) with a Markdown report in reports/demo/."""
from __future__ import annotations

import contextlib
import copy
import io
import math
import shutil
import tempfile
import time
from pathlib import Path

import click

BITS = ((8, 8), (8, 4), (8, 3), (4, 4))


class Recorder:
    """Wraps a runner; keeps every call's inputs (for calibration data) and outputs (for parity)."""

    def __init__(self, runner):
        self.runner, self.inputs, self.outputs = runner, [], []

    def reset(self):
        self.runner.reset()

    def __call__(self, sample, t, ehs=None):
        out = self.runner(sample, t, ehs)
        self.inputs.append((sample.clone(), float(t)))
        self.outputs.append(out.clone())
        return out


# The peer: ONNX Runtime's own static quantizer, configured as a user who reaches for it would
# (picked on the demo's own data, see docs/demo.md): W8A8 in QDQ format, per-channel symmetric int8
# weights, int8 activations with symmetric ranges from the 99.99th percentile of |x| (histogram
# calibration), and only the compute ops MoDiff quantizes (Conv, Gemm and MatMul with a constant
# weight; attention's activation x activation MatMuls, norms and elementwise ops stay float).
# Chosen by PSNR-to-FP on 16 samples among 12 variants (docs/demo.md lists them).
PEER_SETTINGS = {"quant_format": "QDQ", "per_channel": True, "activation_type": "QInt8", "weight_type": "QInt8",
                 "op_types_to_quantize": ["Conv", "MatMul", "Gemm"], "calibrate_method": "Percentile",
                 "extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True, "MatMulConstBOnly": True,
                                   "CalibPercentile": 99.99}}
# What a bare call gives (the demo's first peer): every op quantized, asymmetric uint8 activations.
PEER_DEFAULT_SETTINGS = {"quant_format": "QDQ", "per_channel": True, "activation_type": "QUInt8", "weight_type": "QInt8",
                         "op_types_to_quantize": None, "calibrate_method": "MinMax", "extra_options": {}}


def peer_settings_text(settings: dict) -> str:
    ops = settings["op_types_to_quantize"]
    extra = ", ".join(f"{k}={v}" for k, v in settings["extra_options"].items())
    return (f"quant_format={settings['quant_format']}, per_channel={settings['per_channel']}, "
            f"activation_type={settings['activation_type']}, weight_type={settings['weight_type']}, "
            f"op_types_to_quantize={ops if ops else 'all'}, calibrate_method={settings['calibrate_method']}"
            + (f", extra_options: {extra}" if extra else ""))


def peer_quantize(fp_folder: Path, out: Path, inputs: list, progress: bool = True, settings: dict | None = None) -> Path:
    """ONNX Runtime's own static W8A8 quantization (quantize_static, `settings`, default PEER_SETTINGS)
    of the FP graph, calibrated on UNet inputs recorded from FP trajectories (every timestep); written
    as prime.onnx in a copy of the fp folder (same manifest), so OrtRunner runs it."""
    import logging

    import numpy as np
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    s = settings or PEER_SETTINGS

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"sample": x.numpy(), "timestep": np.full((x.shape[0],), t, np.float32)} for x, t in inputs])

        def get_next(self):
            return next(self.it, None)

    shutil.copytree(fp_folder, out)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_static warns about pre-processing and norm biases on every call
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print progress
            quantize_static(str(fp_folder / "prime.onnx"), str(out / "prime.onnx"), Reader(),
                            quant_format=getattr(QuantFormat, s["quant_format"]), per_channel=s["per_channel"],
                            activation_type=getattr(QuantType, s["activation_type"]),
                            weight_type=getattr(QuantType, s["weight_type"]),
                            op_types_to_quantize=s["op_types_to_quantize"],
                            calibrate_method=getattr(CalibrationMethod, s["calibrate_method"]),
                            extra_options=dict(s["extra_options"]))
    finally:
        root.setLevel(level)
    return out


def _calibrate(model, work: Path, steps: int, samples: int):
    """Static scales for MoDiff W8A4 from `calibrate` (another module; optional): (note, config, calibration)."""
    from ..config import QuantConfig

    try:
        from ..calibration import calibrate, load_calibration, write_calibration
    except ImportError:
        return "calibration: skipped, modiff_export.calibration is not in this checkout (dynamic scales only)", None, None
    cfg = QuantConfig(mode="modiff", weight_bits=8, act_bits=4, scale_mode="static")
    try:
        t0 = time.time()
        path = write_calibration(work / "calibration.json", calibrate(model, cfg, steps=steps, samples=samples, progress=False))
        cal = load_calibration(path, model.content_hash, cfg)
    except Exception as e:  # noqa: BLE001 - reported, the demo goes on with dynamic scales
        return f"calibration: failed ({str(e).splitlines()[0][:200]}); dynamic scales only", None, None
    return (f"calibration: `calibrate` (MSE scales, 1 bucket, weight clipping) for MoDiff W8A4 static on {samples} "
            f"DDIM trajectories (seed 1000, not the evaluation noise) in {time.time() - t0:.0f} s -> row "
            f"modiff-w8a4-static"), cfg, cal


def _engine_line(folders: dict) -> str:
    from ..engine import EngineBuildOptions, TensorRTUnavailable, build_engines

    try:
        for tag, folder in folders.items():
            build_engines(folder, EngineBuildOptions(precision="int8", max_batch=16, opt_batch=16), folder.parent / f"{tag}-engine")
    except TensorRTUnavailable as e:
        return f"TensorRT engines: skipped ({e})"
    except Exception as e:  # noqa: BLE001 - a report line, never a crash of the demo
        return f"TensorRT engines: failed ({str(e).splitlines()[0][:200]})"
    return f"TensorRT engines: built for {', '.join(folders)}"


@click.command("demo")
@click.option("--out", type=click.Path(file_okay=False), default="reports/demo", show_default=True, help="Report folder.")
@click.option("--model", default="digits", show_default=True, help="'digits' or a folder holding a digits UNet (FD-digits needs 16x16 digits).")
@click.option("--num-samples", type=click.IntRange(2), default=64, show_default=True, help="PyTorch samples per config (quality).")
@click.option("--parity-samples", type=click.IntRange(1), default=16, show_default=True, help="Samples per config run on ONNX Runtime too.")
@click.option("--steps", type=click.IntRange(2), default=25, show_default=True, help="DDIM steps.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--latency-batch", type=click.IntRange(1), default=16, show_default=True)
@click.option("--latency-rounds", type=click.IntRange(1), default=3, show_default=True)
@click.option("--calibration-samples", type=click.IntRange(1), default=16, show_default=True,
              help="Calibration trajectories for the modiff-w8a4-static row (seed 1000, not the evaluation noise).")
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True,
              help="PyTorch and ONNX Runtime intra-op threads. 1 by default: this model's ops are tiny, and on a "
                   "shared 2-core machine a second thread that loses its core stalls every op (measured: PyTorch "
                   "UNet call 35 ms with 1 thread vs 1.8 s with 2 at load average 4).")
@click.option("--peer-default/--no-peer-default", default=True, show_default=True,
              help="Also run quantize_static with its default choices (all ops, uint8 asymmetric) for a one-line note.")
def demo(out, model, num_samples, parity_samples, steps, seed, latency_batch, latency_rounds, calibration_samples,
         peer_default, threads):
    """Export fp / ptq / MoDiff graphs at W8A8, W8A4, W8A3, W4A4 for the digits model, sample them on
    PyTorch and ONNX Runtime from the same noise, compare with ONNX Runtime's own static W8A8
    quantization, and write OUT/report.md with figures (quality, parity, BOPs, bytes, latency)."""
    import torch
    from tqdm import tqdm

    from .. import cost
    from ..backends.ort_runner import OrtRunner
    from ..backends.torch_runner import TorchRunner
    from ..config import QuantConfig
    from ..export import ModelInfo, export_model
    from ..manifest import cache_bytes_per_sample
    from ..metrics import DigitsEvaluator, psnr
    from ..models import load_model
    from ..ort_variant import apply_to_folder
    from ..quantization import quantize
    from ..report import build_report
    from ..sampling import generate, make_scheduler

    t_start = time.time()
    phases: dict[str, float] = {}

    class phase:  # wall seconds per phase, reported with the settings
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            self.t0 = time.time()

        def __exit__(self, *exc):
            phases[self.name] = phases.get(self.name, 0.0) + time.time() - self.t0

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model, ev = load_model(model), DigitsEvaluator()
    info = ModelInfo(model.name, model.content_hash, model.sample_shape)
    configs = [QuantConfig(mode="fp")] + [QuantConfig(mode=m, weight_bits=w, act_bits=a) for w, a in BITS for m in ("ptq", "modiff")]
    configs = [(c.tag, c, None) for c in configs]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".demo-work-", dir=Path(out).parent))
    notes = []
    n_par = min(parity_samples, num_samples)
    try:
        with phase("calibration"):
            note, cal_cfg, cal = _calibrate(model, work, steps, calibration_samples)
        notes.append(note)
        tqdm.write(note)
        if cal is not None:
            configs.append((cal_cfg.tag + "-static", cal_cfg, cal))
        # 1. export (Q/DQ graphs) and the ORT variant of each
        folders, ort_folders = {}, {}
        with phase("export + --target ort variants"):
            for tag, cfg, cal in tqdm(configs, desc="export", unit="config"):
                folders[tag] = work / tag
                export_model(copy.deepcopy(model.unet), info, cfg, folders[tag], progress=False,
                             scales=cal.export_scales() if cal else None, weight_clips=cal.weight_clips if cal else None)
                if cfg.mode != "fp":
                    ort_folders[tag] = work / f"{tag}-ort"
                    shutil.copytree(folders[tag], ort_folders[tag])
                    apply_to_folder(ort_folders[tag])
        notes.append(_engine_line({t: f for t, f in folders.items() if t.startswith("modiff")}))
        tqdm.write(notes[-2] + "\n" + notes[-1])

        # 2. sampling, same noise everywhere. PyTorch: the first n_par samples through a Recorder (the
        # parity reference and, for fp, the peer's calibration data), the rest in one more batch; ONNX
        # Runtime: the first n_par samples (parity). Runners are kept: their sessions are timed in 5.
        C, H, W = model.sample_shape
        noise = torch.randn((num_samples, C, H, W), generator=torch.Generator().manual_seed(seed))
        sched = lambda: make_scheduler("ddim", model.scheduler_config)  # noqa: E731
        images, parity, peer_inputs, runners = {}, [], [], {}

        def torch_unet(cfg, cal):
            unet = quantize(copy.deepcopy(model.unet), cfg)
            if cal is not None:
                cal.apply(unet)
            return unet

        for tag, cfg, cal in tqdm(configs, desc="sample torch+ort", unit="config"):
            with phase("sampling, PyTorch"):
                runner = TorchRunner(torch_unet(cfg, cal))
                rec_t = Recorder(runner)
                x_t = generate(rec_t, sched(), steps, n_par, seed, model.sample_shape, progress=False, noise=noise[:n_par])
                rest = [] if num_samples == n_par else [generate(runner, sched(), steps, num_samples - n_par, seed,
                                                                 model.sample_shape, progress=False, noise=noise[n_par:])]
                images[tag] = torch.cat([x_t, *rest])
            with phase("sampling, ONNX Runtime (parity)"):
                runners[tag] = OrtRunner(folders[tag], threads=threads)
                rec_o = Recorder(runners[tag])
                x_o = generate(rec_o, sched(), steps, n_par, seed, model.sample_shape, progress=False, noise=noise[:n_par])
            parity.append({"config": tag, "psnr": psnr(x_o, x_t), "max_abs_image": float((x_o - x_t).abs().max()),
                           "max_abs_eps": max(float((a - b).abs().max()) for a, b in zip(rec_o.outputs, rec_t.outputs))})
            if cfg.mode == "fp":
                peer_inputs = rec_t.inputs
        # 3. peer: ORT quantize_static W8A8 of the FP graph, calibrated on recorded FP trajectory inputs
        with phase("peer (quantize_static + ONNX Runtime sampling)"):
            peer = peer_quantize(folders["fp"], work / "peer-ort-static-w8a8", peer_inputs)
            runners["peer"] = OrtRunner(peer, threads=threads)
            images["peer"] = generate(runners["peer"], sched(), steps, num_samples, seed, model.sample_shape,
                                      progress=False, noise=noise)
            notes.append(f"peer: onnxruntime.quantization.quantize_static of the FP graph ({peer_settings_text(PEER_SETTINGS)}), "
                         f"calibrated on {len(peer_inputs)} UNet calls recorded from FP trajectories ({n_par} samples x "
                         f"{steps} steps, every timestep); sampled on ONNX Runtime only (quality uses all {num_samples}).")
            if peer_default:
                dflt = peer_quantize(folders["fp"], work / "peer-default", peer_inputs, settings=PEER_DEFAULT_SETTINGS)
                x_d = generate(OrtRunner(dflt, threads=threads), sched(), steps, num_samples, seed, model.sample_shape, progress=False, noise=noise)
                p_d = psnr(x_d, images["fp"])
                notes.append(f"untuned peer for reference (the earlier demo's call: {peer_settings_text(PEER_DEFAULT_SETTINGS)}; "
                             f"same calibration data): FD-digits {ev.frechet_distance(x_d):.1f}, PSNR to FP32 {p_d:.2f} dB, "
                             f"confidence {ev.confidence(x_d):.3f} ({num_samples} samples, same noise)"
                             + ("; its digits are noise-like." if p_d < 15 else "."))

        # 4. quality
        with phase("metrics"):
            quality = []
            for tag in ["fp", "peer"] + [t for t, _, _ in configs[1:]]:
                x = images[tag]
                quality.append({"config": tag, "fd": ev.frechet_distance(x), "confidence": ev.confidence(x),
                                "psnr": psnr(x, images["fp"])})

        # 5. cost: BOPs (per sample), bytes, latency (interleaved, batch latency_batch). The Q/DQ graphs and
        # the peer are timed on the sessions the sampling runners already hold (same session options as
        # cost.make_session); only the `--target ort` variants need new sessions.
        with phase("cost + latency"):
            macs = cost.count_macs(copy.deepcopy(model.unet), torch.zeros(1, C, H, W), torch.tensor([500.0]))
            sessions, feeds, keys = {}, {}, {}

            def add(tag, role, suffix, session):
                k = f"{tag}/{role}{suffix}"
                sessions[k], feeds[k], keys[k] = session, cost.session_feeds(session, latency_batch), (tag, role + suffix)

            for tag in list(folders) + ["peer"]:
                runners[tag].activate()
                for role, sess in runners[tag].sessions.items():
                    add(tag, role, "", sess)
            for tag, folder in ort_folders.items():
                for role in ("prime", "step"):
                    if (folder / f"{role}.onnx").is_file():
                        add(tag, role, " (ort)", cost.make_session(folder / f"{role}.onnx", threads))
            lat = {}
            for k, v in cost.measure_latency(sessions, feeds, rounds=latency_rounds, warmup=1).items():
                lat.setdefault(keys[k][0], {})[keys[k][1]] = v
            from ..manifest import load_manifest

            rows = []
            for tag, cfg, _ in configs:
                m = load_manifest(folders[tag])
                rows.append({"config": tag, "bops_prime": cost.bops_per_call(macs, cfg, "prime"),
                             "bops_step": cost.bops_per_call(macs, cfg, "step") if cfg.mode == "modiff" else None,
                             "bops_traj": cost.bops_per_trajectory(macs, cfg, steps), "weight_bytes": cost.weight_bytes(m),
                             "cache_bytes": cache_bytes_per_sample(m), "latency": lat.get(tag, {})})
            w8a8 = QuantConfig(mode="ptq", weight_bits=8, act_bits=8)
            fp_m = load_manifest(folders["fp"])
            rows.append({"config": "peer", "bops_prime": cost.bops_per_call(macs, w8a8), "bops_step": None,
                         "bops_traj": cost.bops_per_trajectory(macs, w8a8, steps),
                         "weight_bytes": sum(math.prod(l["weight_shape"]) for l in fp_m["layers"]), "cache_bytes": 0,
                         "latency": lat.get("peer", {})})
        sp = [("FP32 graph", lat["fp"]["prime"]), ("ORT static W8A8 (peer)", lat["peer"]["prime"])]
        for b in ("w8a8", "w8a4"):
            sp += [(f"MoDiff {b.upper()} prime (Q/DQ)", lat[f"modiff-{b}"]["prime"]),
                   (f"MoDiff {b.upper()} step (Q/DQ)", lat[f"modiff-{b}"]["step"]),
                   (f"MoDiff {b.upper()} step (--target ort)", lat[f"modiff-{b}"]["step (ort)"]),
                   (f"PTQ {b.upper()} (Q/DQ)", lat[f"ptq-{b}"]["prime"]),
                   (f"PTQ {b.upper()} (--target ort)", lat[f"ptq-{b}"]["prime (ort)"])]
        speed = {"batch": latency_batch, "cpu": cost.cpu_name(), "flags": cost.cpu_int8_flags(), "rows": sp,
                 "ref": "FP32 graph", "notes": [f"median of {latency_rounds} interleaved rounds, {threads} intra-op thread(s), on a shared 2-core machine; "
                                                 f"see benchmarks/ort_speed.py for a longer run"]}
        wall = time.time() - t_start
        load = _loadavg()
        settings = {"model": f"digits (embedded DDPM UNet2DModel, 16x16), {model.content_hash[:19]}",
                    "sampler": f"DDIM, {steps} steps, eta 0", "threads": f"{threads} (PyTorch and ONNX Runtime)", "samples": f"{num_samples} per config (PyTorch), "
                    f"{n_par} per config on ONNX Runtime (parity), seed {seed}",
                    "quantization": "dynamic absmax scales, per-sample granularity, per-channel symmetric weights",
                    "demo wall time": f"{wall / 60:.1f} min (before writing the report; 1-min load average at the end: {load})",
                    "time per phase": ", ".join(f"{k} {v:.0f} s" for k, v in phases.items())}
        results = {"title": "modiff-export demo: digits UNet, FP32 vs PTQ vs MoDiff", "settings": settings, "notes": notes,
                   "bits": [f"W{w}A{a}" for w, a in BITS], "grids": {k: v[:16] for k, v in images.items()},
                   "quality": quality, "parity": parity, "cost": rows, "speed": speed}
        path = build_report(out, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    click.echo(f"wrote {path} in {(time.time() - t_start) / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in phases.items())})")


def _loadavg() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "unknown"


COMMANDS = [demo]
