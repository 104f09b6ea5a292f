"""`cli.py demo`: the end-to-end job (export, calibration, engines, sampling on PyTorch and ONNX
Runtime, parity, quality, cost, speed) with a Markdown report in reports/demo/."""
from __future__ import annotations

import copy
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


def peer_quantize(fp_folder: Path, out: Path, inputs: list, progress: bool = True) -> Path:
    """ONNX Runtime's own static W8A8 quantization (QDQ, per-channel weights, MinMax) of the FP graph,
    calibrated on UNet inputs recorded from FP trajectories; written as prime.onnx in a copy of the
    fp folder (same manifest), so OrtRunner runs it."""
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"sample": s.numpy(), "timestep": np.full((s.shape[0],), t, np.float32)} for s, t in inputs])

        def get_next(self):
            return next(self.it, None)

    shutil.copytree(fp_folder, out)
    quantize_static(str(fp_folder / "prime.onnx"), str(out / "prime.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
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
def demo(out, model, num_samples, parity_samples, steps, seed, latency_batch, latency_rounds):
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
    torch.manual_seed(seed)
    model, ev = load_model(model), DigitsEvaluator()
    info = ModelInfo(model.name, model.content_hash, model.sample_shape)
    configs = [QuantConfig(mode="fp")] + [QuantConfig(mode=m, weight_bits=w, act_bits=a) for w, a in BITS for m in ("ptq", "modiff")]
    configs = [(c.tag, c, None) for c in configs]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".demo-work-", dir=Path(out).parent))
    notes = []
    try:
        note, cal_cfg, cal = _calibrate(model, work, steps, parity_samples)
        notes.append(note)
        tqdm.write(note)
        if cal is not None:
            configs.append((cal_cfg.tag + "-static", cal_cfg, cal))
        # 1. export (Q/DQ graphs) and the ORT variant of each
        folders, ort_folders = {}, {}
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

        # 2. sampling: PyTorch (quality, num_samples) and ORT (parity, parity_samples), same noise
        C, H, W = model.sample_shape
        noise = torch.randn((num_samples, C, H, W), generator=torch.Generator().manual_seed(seed))
        sched = lambda: make_scheduler("ddim", model.scheduler_config)  # noqa: E731
        images, parity, peer_inputs = {}, [], []
        def torch_unet(cfg, cal):
            unet = quantize(copy.deepcopy(model.unet), cfg)
            if cal is not None:
                cal.apply(unet)
            return unet

        for tag, cfg, cal in tqdm(configs, desc="sample torch+ort", unit="config"):
            images[tag] = generate(TorchRunner(torch_unet(cfg, cal)), sched(), steps, num_samples, seed, model.sample_shape,
                                   progress=False, noise=noise)
            n = min(parity_samples, num_samples)
            rec_t = Recorder(TorchRunner(torch_unet(cfg, cal)))
            x_t = generate(rec_t, sched(), steps, n, seed, model.sample_shape, progress=False, noise=noise[:n])
            rec_o = Recorder(OrtRunner(folders[tag]))
            x_o = generate(rec_o, sched(), steps, n, seed, model.sample_shape, progress=False, noise=noise[:n])
            parity.append({"config": tag, "psnr": psnr(x_o, x_t), "max_abs_image": float((x_o - x_t).abs().max()),
                           "max_abs_eps": max(float((a - b).abs().max()) for a, b in zip(rec_o.outputs, rec_t.outputs))})
            if cfg.mode == "fp":
                peer_inputs = rec_t.inputs
        # 3. peer: ORT quantize_static W8A8 of the FP graph, calibrated on recorded FP trajectory inputs
        peer = peer_quantize(folders["fp"], work / "peer-ort-static-w8a8", peer_inputs)
        images["peer"] = generate(OrtRunner(peer), sched(), steps, num_samples, seed, model.sample_shape,
                                  progress=True, noise=noise)
        notes.append(f"peer: onnxruntime.quantization.quantize_static (QDQ, per-channel int8 weights, uint8 activations, "
                     f"MinMax) of the FP graph, calibrated on {len(peer_inputs)} UNet calls recorded from FP trajectories "
                     f"({min(parity_samples, num_samples)} samples x {steps} steps); sampled on ONNX Runtime only.")

        # 4. quality
        quality = []
        for tag in ["fp", "peer"] + [t for t, _, _ in configs[1:]]:
            x = images[tag]
            quality.append({"config": tag, "fd": ev.frechet_distance(x), "confidence": ev.confidence(x),
                            "psnr": psnr(x, images["fp"])})

        # 5. cost: BOPs (per sample), bytes, latency (interleaved, batch latency_batch)
        macs = cost.count_macs(copy.deepcopy(model.unet), torch.zeros(1, C, H, W), torch.tensor([500.0]))
        sessions, feeds, keys = {}, {}, {}
        graph_sets = [(t, folders[t], "") for t in folders] + [(t, f, " (ort)") for t, f in ort_folders.items()] + [("peer", peer, "")]
        for tag, folder, suffix in graph_sets:
            for role in ("prime", "step"):
                p = folder / f"{role}.onnx"
                if p.is_file():
                    k = f"{tag}/{role}{suffix}"
                    sessions[k] = cost.make_session(p)
                    feeds[k] = cost.session_feeds(sessions[k], latency_batch)
                    keys[k] = (tag, role + suffix)
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
                 "ref": "FP32 graph", "notes": [f"median of {latency_rounds} interleaved rounds on a shared 2-core machine; "
                                                 f"see benchmarks/ort_speed.py for a longer run"]}
        wall = time.time() - t_start
        settings = {"model": f"digits (embedded DDPM UNet2DModel, 16x16), {model.content_hash[:19]}",
                    "sampler": f"DDIM, {steps} steps, eta 0", "samples": f"{num_samples} per config (PyTorch), "
                    f"{min(parity_samples, num_samples)} per config on ONNX Runtime (parity), seed {seed}",
                    "quantization": "dynamic absmax scales, per-sample granularity, per-channel symmetric weights",
                    "demo wall time": f"{wall / 60:.1f} min (before writing the report)"}
        results = {"title": "modiff-export demo: digits UNet, FP32 vs PTQ vs MoDiff", "settings": settings, "notes": notes,
                   "bits": [f"W{w}A{a}" for w, a in BITS], "grids": {k: v[:16] for k, v in images.items()},
                   "quality": quality, "parity": parity, "cost": rows, "speed": speed}
        path = build_report(out, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    click.echo(f"wrote {path} in {(time.time() - t_start) / 60:.1f} min")


COMMANDS = [demo]
