"""The end-to-end demo job behind `cli.py demo`, as a sequence of named phases (docs/design.md section 6):

    calibrate -> export -> engines -> sample (PyTorch + ONNX Runtime, parity) -> peer -> quality -> cost
    -> speed (CIFAR-10 architecture) -> caching (digits_dit: block reuse beside diffusers' TaylorSeer) -> report

Every phase reads and writes attributes of one `Demo`; the report gets the per-phase wall times.
"""
from __future__ import annotations

import copy
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..backends.cpu import CpuPath, cpu_int8_flags
from ..config import QuantConfig
from .latency import cpu_name, loadavg
from .peer import PEER_DEFAULT_SETTINGS, PEER_SETTINGS, peer_quantize, peer_settings_text
from .recorder import Phases, Recorder

BITS = ((8, 8), (8, 4), (8, 3), (4, 4))
NNCF_ROW = "peer: NNCF int8 (OpenVINO)"


@dataclass(frozen=True)
class DemoSettings:
    out: str = "reports/demo"
    model: str = "digits"
    num_samples: int = 64  # PyTorch samples per config (quality)
    parity_samples: int = 16  # of those, also run on ONNX Runtime
    steps: int = 25  # DDIM steps
    seed: int = 0
    latency_batch: int = 16
    latency_rounds: int = 3
    calibration_samples: int = 16
    peer_default: bool = True  # also run quantize_static's defaults, for a one-line note
    threads: int = 1
    overwrite: bool = False  # replace an existing report folder
    speed: bool = True  # the CIFAR-10-architecture speed section (OpenVINO vs ONNX Runtime; random weights)
    caching: bool = True  # the diffusion-transformer caching section (harness/demo_caching.py)


class Demo:
    def __init__(self, settings: DemoSettings, work: Path):
        from ..evaluation.metrics import DigitsEvaluator
        from ..models import load_model

        self.s, self.work, self.phases, self.notes = settings, work, Phases(), []
        self.model, self.ev = load_model(settings.model), DigitsEvaluator()
        self.n_par = min(settings.parity_samples, settings.num_samples)
        configs = [QuantConfig(mode="fp")] + [QuantConfig(mode=m, weight_bits=w, act_bits=a)
                                              for w, a in BITS for m in ("ptq", "modiff")]
        self.configs = [(c.tag, c, None) for c in configs]  # (tag, config, calibration or None)
        self.folders, self.ort_folders, self.runners, self.images = {}, {}, {}, {}
        self.paths: dict[str, str] = {}  # quality row -> the runner path that computed its images

    def run(self) -> Path:
        t_start = time.time()
        torch.set_num_threads(self.s.threads)
        torch.manual_seed(self.s.seed)
        for name, phase in (("calibration", self.calibrate), ("export + --target ort variants", self.export),
                            ("engines", self.engines), ("sampling + parity", self.sample),
                            ("peers (ORT quantize_static, NNCF)", self.peer), ("metrics", self.quality),
                            ("cost + latency", self.cost), ("speed, CIFAR-10 architecture", self.speed_section),
                            ("caching, diffusion transformer", self.caching_section)):
            with self.phases(name):
                phase()
        return self.report(time.time() - t_start)

    def note(self, text: str) -> None:
        self.notes.append(text)
        tqdm.write(text)

    def scheduler(self):
        from ..sampling import make_scheduler

        return make_scheduler("ddim", self.model.scheduler_config)

    # -- phases ----------------------------------------------------------------------------------
    def calibrate(self) -> None:
        """Static scales for MoDiff W8A4 (seed 1000, not the evaluation noise) -> row modiff-w8a4-static; the
        recommended recipe's calibration (GPTQ weights) for W4A4 -> row modiff-w4a4-recommended."""
        from ..calibration.file import load_calibration, write_calibration
        from ..calibration.observe import calibrate
        from ..calibration.recipe import apply_recipe, calibrate_recipe
        from ..sampling import Trajectories

        cfg = QuantConfig(mode="modiff", weight_bits=8, act_bits=4, scale_mode="static")
        t0, n = time.time(), self.s.calibration_samples
        cal_traj = Trajectories("ddim", self.s.steps, n, n, seed=1000)  # not the evaluation noise
        path = write_calibration(self.work / "calibration.json",
                                 calibrate(self.model, cfg, cal_traj.replace(batch_size=16), progress=False))
        cal = load_calibration(path, self.model.content_hash, cfg)
        self.configs.append((cfg.tag + "-static", cfg, cal))
        self.note(f"calibration: `calibrate` (MSE scales, 1 bucket, weight clipping) for MoDiff W8A4 static on {n} "
                  f"DDIM trajectories (seed 1000, not the evaluation noise) in {time.time() - t0:.0f} s -> row "
                  f"modiff-w8a4-static")
        t0 = time.time()
        rec = apply_recipe(QuantConfig(mode="modiff", weight_bits=4, act_bits=4), self.model.unet)
        data, rounded = calibrate_recipe(self.model, rec, traj=cal_traj, progress=False)
        path = write_calibration(self.work / "calibration-w4a4.json", data, weights=rounded)
        self.configs.append((rec.tag + "-recommended", rec, load_calibration(path, self.model.content_hash, rec)))
        self.note(f"recommended recipe (`calibrate`/`export` defaults, docs/quality.md): MoDiff W4A4 with conv_in, "
                  f"conv_out and the time-embedding Linears at W8A8 and GPTQ-rounded weights ({len(rounded)} layers, "
                  f"Hessians from {n} full-precision DDIM trajectories, seed 1000), dynamic delta scales, in "
                  f"{time.time() - t0:.0f} s -> row modiff-w4a4-recommended")

    def export(self) -> None:
        """Q/DQ graphs of every config, and the `--target ort` variant of the quantized ones."""
        from ..export.ort_variant import write_variant
        from ..export.trace import export_model

        for tag, cfg, cal in tqdm(self.configs, desc="export", unit="config"):
            kw = {} if cal is None else cal.export_kwargs(cfg)
            self.folders[tag] = self.work / tag
            export_model(self.model.copy(), cfg, self.folders[tag], progress=False, **kw)
            if cfg.mode != "fp":
                self.ort_folders[tag] = self.work / f"{tag}-ort"
                write_variant(self.folders[tag], self.ort_folders[tag])

    def engines(self) -> None:
        from ..engine import EngineBuildOptions, TensorRTUnavailable, build_engines

        modiff = {t: f for t, f in self.folders.items() if t.startswith("modiff")}
        try:
            for tag, folder in modiff.items():
                build_engines(folder, EngineBuildOptions(precision="int8", max_batch=16, opt_batch=16),
                              folder.parent / f"{tag}-engine")
            self.note(f"TensorRT engines: built for {', '.join(modiff)}")
        except TensorRTUnavailable as e:
            self.note(f"TensorRT engines: skipped ({e})")
        except Exception as e:  # noqa: BLE001 - a report line, never a crash of the demo
            self.note(f"TensorRT engines: failed ({str(e).splitlines()[0][:200]})")

    def sample(self) -> None:
        """Same noise everywhere. PyTorch: the first n_par samples through a Recorder (the parity reference
        and, for fp, the peer's calibration data), the rest in one more batch; ONNX Runtime: the first
        n_par samples (parity). Runners are kept: their sessions are timed in `cost`."""
        from ..backends.ort_runner import OrtRunner
        from ..backends.torch_runner import TorchRunner
        from ..evaluation.metrics import psnr
        from ..quant.quantization import quantize
        from ..sampling import generate

        s, shape, n = self.s, self.model.sample_shape, self.n_par
        self.noise = torch.randn((s.num_samples, *shape), generator=torch.Generator().manual_seed(s.seed))
        self.parity = []
        for tag, cfg, cal in tqdm(self.configs, desc="sample torch+ort", unit="config"):
            unet = quantize(copy.deepcopy(self.model.unet), cfg)
            if cal is not None:
                cal.apply(unet)
            runner = TorchRunner(unet)
            rec_t = Recorder(runner)
            x_t = generate(rec_t, self.scheduler(), s.steps, n, s.seed, shape, progress=False, noise=self.noise[:n])
            rest = [] if s.num_samples == n else [generate(runner, self.scheduler(), s.steps, s.num_samples - n,
                                                           s.seed, shape, progress=False, noise=self.noise[n:])]
            self.images[tag] = torch.cat([x_t, *rest])
            self.paths[tag] = runner.describe_path()
            self.runners[tag] = OrtRunner(self.folders[tag], threads=s.threads)
            self.ort_path = self.runners[tag].describe_path()
            rec_o = Recorder(self.runners[tag])
            x_o = generate(rec_o, self.scheduler(), s.steps, n, s.seed, shape, progress=False, noise=self.noise[:n])
            self.parity.append({"config": tag, "psnr": psnr(x_o, x_t), "max_abs_image": float((x_o - x_t).abs().max()),
                                "max_abs_eps": max(float((a - b).abs().max())
                                                   for a, b in zip(rec_o.outputs, rec_t.outputs))})
            if cfg.mode == "fp":
                self.peer_inputs = rec_t.inputs

    def peer(self) -> None:
        """ORT quantize_static W8A8 of the FP graph, calibrated on the recorded FP trajectory inputs."""
        from ..backends.ort_runner import OrtRunner
        from ..evaluation.metrics import psnr
        from ..sampling import generate

        s, shape, inputs = self.s, self.model.sample_shape, self.peer_inputs
        peer = peer_quantize(self.folders["fp"], self.work / "peer-ort-static-w8a8", inputs)
        self.runners["peer"] = OrtRunner(peer, threads=s.threads)
        self.images["peer"] = generate(self.runners["peer"], self.scheduler(), s.steps, s.num_samples, s.seed, shape,
                                       progress=False, noise=self.noise)
        self.paths["peer"] = self.runners["peer"].describe_path()
        self.note(f"peer: onnxruntime.quantization.quantize_static of the FP graph "
                  f"({peer_settings_text(PEER_SETTINGS)}), "
                  f"calibrated on {len(inputs)} UNet calls recorded from FP trajectories ({self.n_par} samples x "
                  f"{s.steps} steps, every timestep); sampled on ONNX Runtime only (quality uses all {s.num_samples}).")
        self.nncf_peer(inputs)
        if s.peer_default:
            dflt = peer_quantize(self.folders["fp"], self.work / "peer-default", inputs, settings=PEER_DEFAULT_SETTINGS)
            x_d = generate(OrtRunner(dflt, threads=s.threads), self.scheduler(), s.steps, s.num_samples, s.seed, shape,
                           progress=False, noise=self.noise)
            p_d = psnr(x_d, self.images["fp"])
            self.note(f"untuned peer for reference (the earlier demo's call: "
                      f"{peer_settings_text(PEER_DEFAULT_SETTINGS)}; same calibration data): FD-digits "
                      f"{self.ev.frechet_distance(x_d):.1f}, PSNR to FP32 {p_d:.2f} dB, "
                      f"confidence {self.ev.confidence(x_d):.3f} ({s.num_samples} samples, same noise)"
                      + ("; its digits are noise-like." if p_d < 15 else "."))

    def nncf_peer(self, inputs) -> None:
        """OpenVINO's own int8 path: NNCF post-training quantization of the FP graph, calibrated on the same
        recorded FP trajectory inputs as the ORT peer, sampled on OpenVINO at its default precision."""
        from ..backends.openvino_runner import OpenVinoRunner
        from ..sampling import generate
        from .nncf_peer import nncf_quantize, nncf_settings_text

        s, shape = self.s, self.model.sample_shape
        folder = nncf_quantize(self.folders["fp"], self.work / "peer-nncf-int8", inputs)
        runner = OpenVinoRunner(folder, threads=s.threads, precision="default")
        self.images[NNCF_ROW] = generate(runner, self.scheduler(), s.steps, s.num_samples, s.seed, shape,
                                         progress=False, noise=self.noise)
        self.paths[NNCF_ROW] = runner.describe_path()
        self.note(f"OpenVINO peer: nncf.quantize of the FP graph ({nncf_settings_text()}), calibrated on the same "
                  f"{len(inputs)} recorded FP calls; sampled on OpenVINO at its default precision -> row {NNCF_ROW}.")

    def quality(self) -> None:
        from ..evaluation.metrics import psnr

        self.quality_rows = [{"config": tag, "fd": self.ev.frechet_distance(self.images[tag]),
                              "confidence": self.ev.confidence(self.images[tag]),
                              "psnr": psnr(self.images[tag], self.images["fp"]), "path": self.paths.get(tag, "")}
                             for tag in ["fp", "peer", NNCF_ROW] + [t for t, _, _ in self.configs[1:]]]

    def cost(self) -> None:
        """BOPs (per sample), bytes, latency (interleaved, batch latency_batch). The Q/DQ graphs and the
        peer are timed on the sessions the sampling runners hold; the `--target ort` variants get new ones."""
        from ..evaluation import cost
        from ..manifest import Manifest
        from .latency import make_session, measure_latency, session_feeds

        s, (C, H, W) = self.s, self.model.sample_shape
        macs = cost.count_macs(copy.deepcopy(self.model.unet), torch.zeros(1, C, H, W), torch.tensor([500.0]))
        sessions, feeds, keys = {}, {}, {}

        def add(tag, role, suffix, session):
            k = f"{tag}/{role}{suffix}"
            sessions[k], feeds[k], keys[k] = session, session_feeds(session, s.latency_batch), (tag, role + suffix)

        for tag in list(self.folders) + ["peer"]:
            self.runners[tag].activate()
            for role, sess in self.runners[tag].sessions.items():
                add(tag, role, "", sess)
        for tag, folder in self.ort_folders.items():
            for role in ("prime", "step"):
                if (folder / f"{role}.onnx").is_file():
                    add(tag, role, " (ort)", make_session(folder / f"{role}.onnx", s.threads))
        lat = {}
        for k, v in measure_latency(sessions, feeds, rounds=s.latency_rounds, warmup=1).items():
            lat.setdefault(keys[k][0], {})[keys[k][1]] = v
        self.cost_rows = []
        for tag, cfg, _ in self.configs:
            m = Manifest.load(self.folders[tag])
            self.cost_rows.append({"config": tag, "bops_prime": cost.bops_per_call(macs, cfg, "prime"),
                                   "bops_step": cost.bops_per_call(macs, cfg, "step") if cfg.mode == "modiff" else None,
                                   "bops_traj": cost.bops_per_trajectory(macs, cfg, s.steps),
                                   "weight_bytes": cost.weight_bytes(m), "cache_bytes": m.cache_bytes_per_sample,
                                   "latency": lat.get(tag, {})})
        for tag, cfg, _ in self.configs:  # block reuse (design section 1.1): counted, not exported
            if tag not in ("fp", "modiff-w8a4"):
                continue
            variants = [(d, "none") for d in range(1, min(2, len(self.model.unet.down_blocks)) + 1)]
            variants += [(1, "linear")] if tag == "modiff-w8a4" else []  # the forecast (design section 1.2)
            for depth, forecast in variants:
                for n in (2, 3, 4, 5):
                    reuse = cfg.replace(reuse_interval=n, reuse_depth=depth, reuse_forecast=forecast)
                    row = cost.reuse_cost_row(self.model.unet, macs, reuse, s.steps, self.model.sample_shape)
                    self.cost_rows.append({**row, "weight_bytes": cost.weight_bytes(Manifest.load(
                        self.folders[tag])), "latency": {}})
        w8a8 = QuantConfig(mode="ptq", weight_bits=8, act_bits=8)
        self.cost_rows.append({"config": "peer", "bops_prime": cost.bops_per_call(macs, w8a8), "bops_step": None,
                               "bops_traj": cost.bops_per_trajectory(macs, w8a8, s.steps),
                               # int8 weights, one byte each
                               "weight_bytes": sum(math.prod(x.weight_shape)
                                                   for x in Manifest.load(self.folders["fp"]).layers),
                               "cache_bytes": 0, "latency": lat.get("peer", {})})
        sp = [("FP32 graph", lat["fp"]["prime"]), ("ORT static W8A8 (peer)", lat["peer"]["prime"])]
        for b in ("w8a8", "w8a4"):
            sp += [(f"MoDiff {b.upper()} prime (Q/DQ)", lat[f"modiff-{b}"]["prime"]),
                   (f"MoDiff {b.upper()} step (Q/DQ)", lat[f"modiff-{b}"]["step"]),
                   (f"MoDiff {b.upper()} step (--target ort)", lat[f"modiff-{b}"]["step (ort)"]),
                   (f"PTQ {b.upper()} (Q/DQ)", lat[f"ptq-{b}"]["prime"]),
                   (f"PTQ {b.upper()} (--target ort)", lat[f"ptq-{b}"]["prime (ort)"])]
        self.speed = {"batch": s.latency_batch, "cpu": cpu_name(), "flags": cpu_int8_flags(), "rows": sp,
                      "ref": "FP32 graph",
                      "notes": [f"median of {s.latency_rounds} interleaved rounds, {s.threads} intra-op thread(s), "
                                f"on a "
                                f"shared 2-core machine; see benchmarks/ort_speed.py for a longer run"]}

    def speed_section(self) -> None:
        """Where MoDiff stands in speed: a UNet of the CIFAR-10 DDPM architecture (35.7M parameters, random weights:
        speed only), FP32 / bf16 / PTQ / MoDiff graphs on ONNX Runtime and OpenVINO, interleaved rounds."""
        self.cifar_speed = None
        if not self.s.speed:
            return
        from .speed import demo_speed_table

        self.cifar_speed = demo_speed_table(self.work / "speed", threads=self.s.threads, rounds=3, batch=4)
        self.note("speed: CIFAR-10 DDPM architecture (35.7M parameters, random weights: speed only, quality stays on "
                  "digits), batch 4, OpenVINO and ONNX Runtime, interleaved rounds; full tables: docs/speed.md")

    def caching_section(self) -> None:
        """Block reuse on the shipped DiT beside diffusers' TaylorSeerCache (harness/demo_caching.py)."""
        self.caching = None
        if not self.s.caching:
            return
        from .demo_caching import caching_rows, caching_table

        self.caching = caching_table(caching_rows(self.work / "caching", self.s.num_samples, self.s.steps, self.s.seed))
        self.note(f"caching: digits_dit (the shipped DiT), DDIM-{self.s.steps} from the same noise; the full study "
                  "(two DiTs, two guidance scales, diffusers' TaylorSeer/FirstBlockCache/MagCache): docs/quality.md "
                  "\"Caching for transformers\"")

    def report(self, wall: float) -> Path:
        from .report import build_report

        s = self.s
        settings = {"model": f"digits (embedded DDPM UNet2DModel, 16x16), {self.model.content_hash[:19]}",
                    "sampler": f"DDIM, {s.steps} steps, eta 0", "threads": f"{s.threads} (PyTorch and ONNX Runtime)",
                    "samples": f"{s.num_samples} per config (PyTorch), {self.n_par} per config on ONNX Runtime "
                               f"(parity), seed {s.seed}",
                    "quantization": "dynamic absmax scales, per-sample granularity, per-channel symmetric weights",
                    "CPU": f"{cpu_name()}; class {CpuPath.resolve().describe()} (backends/cpu.py; the parity rows "
                           f"ran on {self.ort_path})",
                    "demo wall time": f"{wall / 60:.1f} min (before writing the report; 1-min load average at the "
                                      f"end: {loadavg()})",
                    "time per phase": self.phases.summary()}
        results = {"title": "modiff-export demo: digits UNet, FP32 vs PTQ vs MoDiff", "settings": settings,
                   "notes": self.notes, "bits": [f"W{w}A{a}" for w, a in BITS],
                   "grids": {k: v[:16] for k, v in self.images.items()}, "quality": self.quality_rows,
                   "parity": self.parity, "cost": self.cost_rows, "speed": self.speed,
                   "cifar_speed": self.cifar_speed, "caching": self.caching}
        return build_report(s.out, results, s.overwrite)


def run_demo(settings: DemoSettings) -> tuple[Path, Phases]:
    """Run the demo in a scratch folder beside `settings.out` (removed at the end, whatever happens)."""
    import shutil

    out = Path(settings.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".demo-work-", dir=out.parent))
    try:
        demo = Demo(settings, work)
        return demo.run(), demo.phases
    finally:
        shutil.rmtree(work, ignore_errors=True)
