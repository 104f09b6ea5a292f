"""Issue 13, the bad-input matrix: one row per bad input or fault, each through the real CLI
(`cli.main`, in-process; tests/test_data_safety.py runs real subprocesses for signals and races).

Every row asserts the contract of docs/design.md section 7: exit code 1, stderr exactly one
`error: ...` line (no traceback, no usage dump) containing the row's key phrase, and, section 3,
nothing left or lost: the whole working folder (models, graphs, calibration file, outputs that
existed) is byte-for-byte the same after the run, with no temporary left behind.

The inputs are the tiny UNets of tests/conftest.py saved as local diffusers folders, exported and
calibrated once per module; each row works on its own copy.
"""
from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_unet
from reliability_util import diff_snapshots, error_line, read_only, run_cli, snapshot, temporaries

SAMPLE = ["sample", "--steps", "2", "--batch-size", "1", "--out", "s.png"]
SAMPLE_ORT = SAMPLE + ["--backend", "ort", "--graphs", "g88"]
EVALUATE_ORT = ["evaluate", "--backend", "ort", "--graphs", "g88", "--num-samples", "2", "--batch-size", "2",
                "--steps", "2"]
EXPORT = ["export", "--model", "m0", "--quiet"]
EXPORT_STATIC = EXPORT + ["--act-bits", "4", "--scale-mode", "static", "--calibration", "cal.json", "--out", "gs"]
CALIBRATE = ["calibrate", "--model", "m0", "--steps", "3", "--samples", "1", "--batch-size", "1", "--method", "absmax",
             "--quiet"]
W4A4 = ["--weight-bits", "4", "--act-bits", "4"]
EXPORT_GPTQ = EXPORT + W4A4 + ["--calibration", "cal4.json", "--out", "gw"]
SERVE = ["serve", "--graphs", "g88", "--port", "1"]  # never reached: the option is refused first
PACKAGE = ["package-triton", "g88", "--out", "mr", "--unet-backend", "python"]


# -- the shared inputs ---------------------------------------------------------------------------------
def _save_model(folder: Path, seed: int, scheduler: dict | None = None) -> None:
    build_tiny_unet(seed).save_pretrained(str(folder), safe_serialization=True)
    sched = scheduler or {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000}
    (folder / "scheduler_config.json").write_text(json.dumps(sched))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """m0, m1: two tiny UNets (seeds 0, 1); g88 / g84: m0 exported modiff W8A8 / W8A4; g88m1: m1 W8A8;
    g84r: m0 W8A4 with block reuse (interval 2, depth 1), e84r its engine folder without the shallow plan;
    cal.json: a W8A4 static calibration of m0 (1 bucket); cal4.json + cal4.weights.safetensors: a W4A4
    one with GPTQ-rounded weights (the recommended recipe)."""
    root = tmp_path_factory.mktemp("bad_inputs_base")
    _save_model(root / "m0", 0)
    _save_model(root / "m1", 1)
    for out, model, bits in (("g88", "m0", "8"), ("g84", "m0", "4"), ("g88m1", "m1", "8")):
        code, _, err = run_cli(["export", "--model", root / model, "--act-bits", bits, "--out", root / out, "--quiet"])
        assert code == 0, err
    code, _, err = run_cli(CALIBRATE[:1] + ["--model", root / "m0"] + CALIBRATE[3:]
                           + ["--act-bits", "4", "--out", root / "cal.json"])
    assert code == 0, err
    code, _, err = run_cli(CALIBRATE[:1] + ["--model", root / "m0"] + CALIBRATE[3:] + W4A4
                           + ["--out", root / "cal4.json"])
    assert code == 0 and (root / "cal4.weights.safetensors").is_file(), err
    fake_engines(root / "g88", root / "e88")
    code, _, err = run_cli(["export", "--model", root / "m0", "--act-bits", "4", "--reuse-interval", "2",
                            "--reuse-depth", "1", "--out", root / "g84r", "--quiet"])
    assert code == 0 and (root / "g84r" / "shallow.onnx").is_file(), err
    fake_engines(root / "g84r", root / "e84r")  # prime and step plans only: the shallow one is missing
    nncf_ir(root / "m0", root / "ir")
    return root


def nncf_ir(model: Path, out: Path) -> None:
    """An OpenVINO IR folder as the demo's NNCF peer writes it (harness/nncf_peer.py): nncf.quantize of m0's FP
    graph on four random calls. Only the OpenVINO backend runs it; every command that reads ONNX refuses it."""
    from modiff_export.harness.nncf_peer import nncf_quantize

    code, _, err = run_cli(["export", "--model", model, "--mode", "fp", "--out", out.with_name("gfp"), "--quiet"])
    assert code == 0, err
    g = torch.Generator().manual_seed(0)
    nncf_quantize(out.with_name("gfp"), out, [(torch.randn(1, 1, 16, 16, generator=g), 900.0 - 200 * i, None)
                                              for i in range(4)])
    assert (out / "prime.xml").is_file()


def fake_engines(graphs: Path, folder: Path) -> None:
    """An engine folder as build-engine writes it, with placeholder plans: everything a TrtRunner
    checks before it needs TensorRT (not installed here)."""
    from modiff_export.engine import BuildInfo
    from modiff_export.fsutil import sha256_file

    folder.mkdir()
    shutil.copyfile(graphs / "manifest.json", folder / "manifest.json")
    for role in ("prime", "step"):
        (folder / f"{role}.plan").write_bytes(f"placeholder {role} plan".encode())
    BuildInfo(tensorrt="none", options={"min_batch": 1, "opt_batch": 2, "max_batch": 4, "cuda_graph": False},
              settings={}, profiles={}, plans={r: f"{r}.plan" for r in ("prime", "step")},
              digests={r: sha256_file(folder / f"{r}.plan") for r in ("prime", "step")}).write(folder)


# -- setups: each edits the row's private copy of `base` ----------------------------------------------
def mutate(path: str, fn: Callable[[dict], None]) -> Callable[[Path], None]:
    """Setup: apply `fn` (in place) to the JSON object in `path`."""
    def setup(ws: Path) -> None:
        d = json.loads((ws / path).read_text())
        fn(d)
        (ws / path).write_text(json.dumps(d))
    return setup


def write(path: str, text: str | bytes) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        p = ws / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


def copy(src: str, dst: str) -> Callable[[Path], None]:
    return lambda ws: shutil.copyfile(ws / src, ws / dst)


def bad_codes(ws: Path) -> None:
    """Setup: cal4's first GPTQ layer gets codes outside the 4-bit range, with the digest updated (a
    consistent but wrong pair, as a buggy writer would leave it)."""
    from safetensors.torch import load_file, save_file

    from modiff_export.fsutil import sha256_file

    f = ws / "cal4.weights.safetensors"
    t = load_file(str(f))
    key = next(k for k in sorted(t) if k.endswith("conv1.codes"))  # a 4-bit layer (W8A8 ones span int8)
    t[key] = torch.full_like(t[key], 100)
    save_file(t, str(f))
    mutate("cal4.json", lambda d: d["weights"].update(sha256=sha256_file(f)))(ws)


def truncate(path: str) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        data = (ws / path).read_bytes()
        (ws / path).write_bytes(data[:len(data) // 2])
    return setup


def remove(path: str) -> Callable[[Path], None]:
    return lambda ws: (ws / path).unlink()


def symlink(path: str, target: str) -> Callable[[Path], None]:
    return lambda ws: (ws / path).symlink_to(ws / target)


def model_with_scheduler(sched: dict | str) -> Callable[[Path], None]:
    """Setup: folder `mt`, a copy of m0 whose scheduler_config.json is `sched`."""
    def setup(ws: Path) -> None:
        shutil.copytree(ws / "m0", ws / "mt")
        (ws / "mt" / "scheduler_config.json").write_text(sched if isinstance(sched, str) else json.dumps(sched))
    return setup


def huge_samples(ws: Path) -> None:
    """Folder `mh`: m0 declaring 4096x4096 samples (a batch of them cannot fit in memory)."""
    shutil.copytree(ws / "m0", ws / "mh")
    cfg = json.loads((ws / "mh" / "config.json").read_text())
    (ws / "mh" / "config.json").write_text(json.dumps({**cfg, "sample_size": 4096}))


def nan_weights(ws: Path) -> None:
    """Folder `mn`: m0 with one NaN weight."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(ws / "m0", ws / "mn")
    f = ws / "mn" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(f))
    name = next(k for k in state if k.endswith("weight") and state[k].dim() == 4)
    state[name][0].view(-1)[0] = math.nan
    save_file(state, str(f))


def first(d: dict) -> str:
    return next(iter(d))


def cache_shape(m: dict) -> None:
    m["caches"][0]["shape"] = ["batch", 3, 5, 7]


def cache_dtype(m: dict) -> None:
    m["cache_dtype"] = "float16"
    for c in m["caches"]:
        c["dtype"] = "float16"


def sample_size(m: dict) -> None:
    m["model"]["sample_size"] = [8, 8]
    m["inputs"][0]["shape"] = ["batch", 1, 8, 8]
    m["outputs"][0]["shape"] = ["batch", 1, 8, 8]


def appear_during_export(monkeypatch, ws: Path) -> None:
    """Another writer creates the output folder while this export traces its graphs."""
    import modiff_export.export.trace as trace

    real = trace._trace

    def traced(*args, **kwargs):
        if not (ws / "gnew").exists():
            (ws / "gnew").mkdir()
            (ws / "gnew" / "theirs.txt").write_text("another writer's result")
        return real(*args, **kwargs)

    monkeypatch.setattr(trace, "_trace", traced)


def appear_after(module: str, function: str, path: str):
    """During: another writer creates the output file `path` right after `module.function` did the work."""
    def during(monkeypatch, ws: Path) -> None:
        import importlib

        mod = importlib.import_module(module)
        real = getattr(mod, function)

        def wrapped(*args, **kwargs):
            result = real(*args, **kwargs)
            (ws / path).write_text("another writer's file")
            return result

        monkeypatch.setattr(mod, function, wrapped)
    return during


def no_training(monkeypatch, ws: Path) -> None:
    """train-demo must refuse before training (and before touching the shipped assets)."""
    import modiff_export.models.train as train

    def fail(*a, **k):
        raise AssertionError("train-demo started training although its output exists")

    monkeypatch.setattr(train, "train_unet", fail)
    monkeypatch.setattr(train, "train_classifier", fail)


# -- the matrix ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    args: list
    expect: str  # a phrase the error line contains (case-insensitive)
    setup: Callable[[Path], None] | None = None
    during: Callable | None = None  # (monkeypatch, ws): patches that simulate a concurrent event
    appears: tuple = ()  # paths the row's simulated other writer creates (theirs: must be left as they are)
    readonly: str | None = None  # folder made unwritable before the run


C = Case
CASES = [
    # 1. artifact identity: graphs, calibration and model must belong together (no silent wrong output)
    C("graphs-other-config-sample", SAMPLE_ORT, "does not belong", copy("g84/step.onnx", "g88/step.onnx")),
    C("graphs-other-config-check", ["check", "g88"], "does not belong", copy("g84/step.onnx", "g88/step.onnx")),
    C("graphs-other-config-evaluate", EVALUATE_ORT, "does not belong", copy("g84/step.onnx", "g88/step.onnx")),
    C("graphs-other-config-build", ["build-engine", "g88", "--out", "e"], "does not belong",
      copy("g84/step.onnx", "g88/step.onnx")),
    C("graphs-other-model-sample", SAMPLE_ORT, "does not belong", copy("g88m1/prime.onnx", "g88/prime.onnx")),
    C("graphs-other-model-check", ["check", "g88"], "does not belong", copy("g88m1/prime.onnx", "g88/prime.onnx")),
    C("graph-truncated", SAMPLE_ORT, "does not belong", truncate("g88/step.onnx")),
    C("graph-missing", SAMPLE_ORT, "missing", remove("g88/step.onnx")),
    C("graph-digest-missing", SAMPLE_ORT, "no recorded digest", mutate("g88/manifest.json",
                                                                        lambda m: m["files"].pop("step.onnx"))),
    C("graphs-with-other-model", SAMPLE_ORT + ["--model", "m1"], "exported from model"),
    C("evaluate-with-other-model", EVALUATE_ORT + ["--model", "m1"], "exported from model"),
    C("cal-other-model", EXPORT_STATIC + ["--model", "m1"], "made for model"),
    C("cal-other-config", EXPORT + ["--act-bits", "8", "--scale-mode", "static", "--calibration", "cal.json",
                                    "--out", "gs"], "calibrated for act_bits"),
    # 2. calibration files, field by field
    C("cal-missing-weight-clip", EXPORT_STATIC, "weight clip",
      mutate("cal.json", lambda d: d["weight_clips"].pop(first(d["weight_clips"])))),
    C("cal-bool-scales", EXPORT_STATIC, "positive finite",
      mutate("cal.json", lambda d: d["scales"].update({first(d["scales"]): [True]}))),
    C("cal-bool-clips", EXPORT_STATIC, "ratios in (0, 1]", mutate("cal.json", lambda d: d["weight_clips"].update(
        {k: [True] * len(v) for k, v in d["weight_clips"].items()}))),
    C("cal-clips-wrong-length", EXPORT_STATIC, "output channel", mutate("cal.json", lambda d: d["weight_clips"].update(
        {first(d["weight_clips"]): d["weight_clips"][first(d["weight_clips"])][:-1]}))),
    C("cal-clips-above-1", EXPORT_STATIC, "ratios in (0, 1]", mutate("cal.json", lambda d: d["weight_clips"].update(
        {first(d["weight_clips"]): [1.5] * len(d["weight_clips"][first(d["weight_clips"])])}))),
    C("cal-nan-scale", EXPORT_STATIC, "positive finite",
      mutate("cal.json", lambda d: d["scales"].update({first(d["scales"]): [math.nan]}))),
    C("cal-scales-missing-layer", EXPORT_STATIC, "no entry", mutate("cal.json", lambda d: (
        d["weight_clips"].pop(first(d["scales"])), d["scales"].pop(first(d["scales"]))))),
    C("cal-scales-unknown-layer", EXPORT_STATIC, "does not have",
      mutate("cal.json", lambda d: d["scales"].update({"down_blocks.9.nonexistent": [0.1]}))),
    C("cal-truncated", EXPORT_STATIC, "not valid json", truncate("cal.json")),
    C("cal-not-object", EXPORT_STATIC, "not a calibration file", write("cal.json", "[1, 2]")),
    C("cal-bad-quant-config", EXPORT_STATIC, "quant_config",
      mutate("cal.json", lambda d: d["provenance"]["quant_config"].update(skip_layers=None))),
    C("cal-quant-config-list", EXPORT_STATIC, "quant_config",
      mutate("cal.json", lambda d: d["provenance"].update(quant_config=["mode"]))),
    C("cal-buckets-zero", EXPORT_STATIC, "buckets", mutate("cal.json", lambda d: d["provenance"].update(buckets=0))),
    C("cal-no-provenance", EXPORT_STATIC, "provenance", mutate("cal.json", lambda d: d.pop("provenance"))),
    C("cal-missing-file", EXPORT_STATIC, "missing", remove("cal.json")),
    C("cal-weights-missing", EXPORT_GPTQ, "are missing", remove("cal4.weights.safetensors")),
    C("cal-weights-replaced", EXPORT_GPTQ, "differs from", write("cal4.weights.safetensors", b"not the same weights")),
    C("cal-weights-renamed-json", EXPORT_GPTQ[:-4] + ["--calibration", "renamed.json", "--out", "gw"],
      "rename both", copy("cal4.json", "renamed.json")),
    C("cal-weights-malformed", EXPORT_GPTQ, "malformed field",
      mutate("cal4.json", lambda d: d.update(weights={"f": 1}))),
    C("cal-weights-codes-out-of-range", EXPORT_GPTQ, "out of range", bad_codes),
    C("cal-weights-for-other-bits", EXPORT + ["--weight-bits", "8", "--act-bits", "4", "--calibration", "cal4.json",
                                              "--out", "gw"], "calibrated for weight_bits"),
    C("calibrate-weights-file-exists", CALIBRATE + W4A4 + ["--out", "c4.json"], "already exists",
      write("c4.weights.safetensors", "mine")),
    C("static-without-cal", EXPORT + ["--scale-mode", "static", "--out", "gs"], "calibration"),
    C("calibration-with-ort", SAMPLE_ORT + ["--calibration", "cal.json"], "--backend torch"),
    C("static-torch-without-cal", SAMPLE + ["--model", "m0", "--scale-mode", "static"], "needs --calibration"),
    C("torch-cal-other-bits", SAMPLE + ["--model", "m0", "--calibration", "cal4.json"], "calibrated for weight_bits"),
    # 3. layer patterns and quantization options
    C("skip-matches-nothing", EXPORT + ["--skip-layers", "nomatch*", "--out", "gx"], "match no"),
    C("int8-matches-nothing", EXPORT + ["--int8-layers", "conv_9", "--out", "gx"], "match no"),
    C("skip-everything", EXPORT + ["--skip-layers", "*", "--out", "gx"], "leave no layer quantized"),
    C("skip-nothing-sample-torch", SAMPLE + ["--model", "m0", "--skip-layers", "zzz"], "match no"),
    C("skip-nothing-calibrate", CALIBRATE + ["--skip-layers", "zzz", "--out", "c.json"], "match no"),
    C("block-size-needs-int4", EXPORT + ["--weight-block-size", "16", "--out", "gx"], "weight_bits <= 4"),
    C("block-size-odd", EXPORT + ["--weight-bits", "4", "--weight-block-size", "3", "--out", "gx"], "multiple of 2"),
    C("block-size-opset", EXPORT + ["--weight-bits", "4", "--weight-block-size", "16", "--out", "gx"], "opset"),
    C("act-bits-9", EXPORT + ["--act-bits", "9"], "--act-bits"),
    C("opset-too-old", EXPORT + ["--opset", "13", "--out", "gx"], "opset 13"),
    C("keyframe-0", EXPORT + ["--keyframe-interval", "0"], "--keyframe-interval"),
    C("reuse-interval-0", EXPORT + ["--reuse-interval", "0", "--reuse-depth", "1"], "--reuse-interval"),
    C("reuse-depth-alone", EXPORT + ["--reuse-depth", "1", "--out", "gx"], "needs both"),
    C("reuse-depth-beyond-blocks", EXPORT + ["--reuse-interval", "2", "--reuse-depth", "3", "--out", "gx"],
      "outside 1..2"),
    C("reuse-depth-beyond-blocks-torch", SAMPLE + ["--model", "m0", "--reuse-interval", "2", "--reuse-depth", "3"],
      "outside 1..2"),
    C("reuse-with-keyframes", EXPORT + ["--reuse-interval", "2", "--reuse-depth", "1", "--keyframe-interval", "4",
                                        "--out", "gx"], "cannot be combined"),
    C("reuse-with-static-scales", EXPORT_STATIC + ["--reuse-interval", "2", "--reuse-depth", "1"],
      "cannot be combined with block reuse"),
    C("no-reuse-compensation-without-reuse", EXPORT + ["--no-reuse-compensation", "--out", "gx"], "ablation"),
    C("reuse-forecast-without-reuse", EXPORT + ["--reuse-forecast", "linear", "--out", "gx"], "needs reuse_interval"),
    C("reuse-forecast-unknown", EXPORT + ["--reuse-forecast", "cubic", "--out", "gx"], "--reuse-forecast"),
    C("reuse-engines-without-shallow-plan", SAMPLE + ["--backend", "trt", "--engines", "e84r"],
      "shallow engine is missing"),
    C("package-reuse-folder", ["package-triton", "g84r", "--out", "mr", "--unet-backend", "python"], "block reuse"),
    C("calibrate-one-step", CALIBRATE[:3] + ["--steps", "1"] + CALIBRATE[5:] + ["--out", "c.json"], "second step"),
    C("calibrate-fp", CALIBRATE + ["--mode", "fp", "--out", "c.json"], "--mode"),
    # 4. outputs: nothing the user owns is replaced without --overwrite; problems found before the work
    C("export-onto-folder", EXPORT + ["--out", "g88"], "already exists"),
    C("export-onto-file", EXPORT + ["--out", "cal.json"], "is a file"),
    C("export-overwrite-file", EXPORT + ["--out", "cal.json", "--overwrite"], "is a file"),
    C("export-folder-appears", EXPORT + ["--out", "gnew"], "appeared", during=appear_during_export,
      appears=("gnew", "gnew/theirs.txt")),
    C("export-parent-is-file", EXPORT + ["--out", "cal.json/g"], "is a file"),
    C("export-dangling-link", EXPORT + ["--out", "dl"], "dangling", symlink("dl", "nowhere")),
    C("export-under-dangling-link", EXPORT + ["--out", "dl/g"], "dangling", symlink("dl", "nowhere")),
    C("export-read-only", EXPORT + ["--out", "ro/g"], "not writable", write("ro/keep.txt", "mine"), readonly="ro"),
    C("export-pseudo-file-system", EXPORT + ["--out", "/proc/g"], "not writable"),
    C("calibrate-pseudo-file-system", CALIBRATE + ["--out", "/proc/c.json"], "not writable"),
    C("export-name-too-long", EXPORT + ["--out", "x" * 300], "too long"),
    C("export-overwrite-read-only", EXPORT + ["--out", "ro", "--overwrite"], "not writable",
      write("ro/keep.txt", "mine"), readonly="ro"),
    C("sample-onto-file", SAMPLE_ORT[:-4] + ["--out", "cal.json", "--backend", "ort", "--graphs", "g88"],
      "already exists"),
    C("sample-parent-is-file", SAMPLE_ORT[:-4] + ["--out", "cal.json/s.png", "--backend", "ort", "--graphs", "g88"],
      "is a file"),
    C("sample-out-is-folder", SAMPLE_ORT[:-4] + ["--out", "g88", "--backend", "ort", "--graphs", "g88"], "directory"),
    C("sample-read-only", SAMPLE_ORT[:-4] + ["--out", "ro/s.png", "--backend", "ort", "--graphs", "g88"],
      "not writable", write("ro/keep.txt", "mine"), readonly="ro"),
    C("calibrate-onto-file", CALIBRATE + ["--out", "cal.json"], "already exists"),
    C("calibrate-file-appears", CALIBRATE + ["--out", "c.json"], "appeared",
      during=appear_after("modiff_export.calibration.recipe", "calibrate", "c.json"), appears=("c.json",)),
    C("sample-file-appears", SAMPLE_ORT, "appeared", during=appear_after("modiff_export.sampling", "sample_model",
                                                                         "s.png"), appears=("s.png",)),
    C("calibrate-dangling-link", CALIBRATE + ["--out", "dl"], "dangling", symlink("dl", "nowhere")),
    C("build-engine-onto-folder", ["build-engine", "g88", "--out", "g84"], "already exists"),
    C("demo-onto-folder", ["demo", "--out", "g88"], "already exists"),
    C("train-demo-default-out", ["train-demo"], "already exists",
      lambda ws: (ws / "trained" / "digits").mkdir(parents=True), during=no_training),
    C("train-demo-onto-folder", ["train-demo", "--out", "m0", "--steps", "1", "--epochs", "1"], "already exists",
      during=no_training),
    # 5. sampling options: absurd values refused up front
    C("batch-size-0", SAMPLE_ORT + ["--batch-size", "0"], "--batch-size"),
    C("batch-size-huge", SAMPLE_ORT + ["--batch-size", "10000000"], "--batch-size"),
    C("num-samples-huge", EVALUATE_ORT + ["--num-samples", "1000000000"], "--num-samples"),
    C("num-samples-1", EVALUATE_ORT + ["--num-samples", "1"], "--num-samples"),
    C("seed-negative", SAMPLE_ORT + ["--seed", "-1"], "--seed"),
    C("seed-huge", SAMPLE_ORT + ["--seed", str(2**70)], "--seed"),
    C("steps-0", SAMPLE_ORT + ["--steps", "0"], "--steps"),
    C("steps-huge", SAMPLE_ORT + ["--steps", "100000"], "--steps"),
    C("guidance-unconditional", SAMPLE_ORT + ["--guidance-scale", "3"], "conditional"),
    C("guidance-nan", SAMPLE_ORT + ["--guidance-scale", "nan"], "not a finite number"),
    C("guidance-inf", SAMPLE_ORT + ["--guidance-scale", "inf"], "--guidance-scale"),
    C("torch-with-graphs", SAMPLE + ["--graphs", "g88"], "--backend torch"),
    C("ort-without-graphs", SAMPLE + ["--backend", "ort"], "--graphs"),
    C("trt-on-graph-folder", SAMPLE + ["--backend", "trt", "--engines", "g88"], "build.json"),
    C("unknown-scheduler", SAMPLE_ORT + ["--scheduler", "lms"], "--scheduler"),
    C("samples-beyond-memory", SAMPLE + ["--model", "mh", "--batch-size", "4096"], "free memory", huge_samples),
    # 5b. engines (TensorRT is not installed here: everything checked before it is needed)
    C("trt-without-tensorrt", SAMPLE + ["--backend", "trt", "--engines", "e88"], "tensorrt is not installed"),
    C("engine-plan-replaced", SAMPLE + ["--backend", "trt", "--engines", "e88"], "does not belong to this build",
      write("e88/step.plan", "another build's plan")),
    C("engine-plan-missing", SAMPLE + ["--backend", "trt", "--engines", "e88"], "missing or empty",
      remove("e88/prime.plan")),
    C("engine-build-json-damaged", SAMPLE + ["--backend", "trt", "--engines", "e88"], "needs the fields",
      mutate("e88/build.json", lambda b: b.pop("digests"))),
    C("engine-min-batch-0", SAMPLE + ["--backend", "trt", "--engines", "e88"], "min_batch",
      mutate("e88/build.json", lambda b: b["options"].update(min_batch=0))),
    C("build-engine-min-batch-0", ["build-engine", "g88", "--min-batch", "0", "--out", "e"], "min_batch"),
    C("build-engine-batches-inverted", ["build-engine", "g88", "--min-batch", "8", "--max-batch", "2", "--out", "e"],
      "min <= opt <= max"),
    C("build-engine-workspace-negative", ["build-engine", "g88", "--workspace-gb", "-1", "--out", "e"],
      "workspace_gb"),
    C("build-engine-fp16-on-modiff", ["build-engine", "g88", "--precision", "fp16", "--out", "e"], "fp16"),
    # 6. model folders and scheduler configs
    C("model-missing", SAMPLE + ["--model", "nothere"], "not a folder"),
    C("model-is-file", SAMPLE + ["--model", "cal.json"], "not a folder"),
    C("model-not-a-unet", SAMPLE + ["--model", "g88"], "config.json"),
    C("model-truncated-weights", SAMPLE + ["--model", "m0"], "cannot load",
      truncate("m0/diffusion_pytorch_model.safetensors")),
    C("model-nan-weights", SAMPLE + ["--model", "mn"], "nan", nan_weights),
    C("scheduler-T-zero", SAMPLE + ["--model", "mt"], "num_train_timesteps",
      model_with_scheduler({"_class_name": "DDPMScheduler", "num_train_timesteps": 0})),
    C("scheduler-T-string", SAMPLE + ["--model", "mt"], "num_train_timesteps",
      model_with_scheduler({"_class_name": "DDPMScheduler", "num_train_timesteps": "1000"})),
    C("scheduler-T-float", SAMPLE + ["--model", "mt"], "num_train_timesteps",
      model_with_scheduler({"_class_name": "DDPMScheduler", "num_train_timesteps": 999.5})),
    C("scheduler-T-bool", SAMPLE + ["--model", "mt"], "num_train_timesteps",
      model_with_scheduler({"_class_name": "DDPMScheduler", "num_train_timesteps": True})),
    C("scheduler-T-huge", SAMPLE + ["--model", "mt"], "num_train_timesteps",
      model_with_scheduler({"_class_name": "DDPMScheduler", "num_train_timesteps": 10**12})),
    C("scheduler-steps-above-T", SAMPLE + ["--model", "mt", "--steps", "25"], "num_train_timesteps",
      model_with_scheduler({"_class_name": "DDPMScheduler", "num_train_timesteps": 10})),
    C("scheduler-bad-beta-schedule", SAMPLE + ["--model", "mt"], "scheduler",
      model_with_scheduler({"_class_name": "DDPMScheduler", "beta_schedule": "bogus"})),
    C("scheduler-bad-prediction-type", SAMPLE + ["--model", "mt"], "prediction_type",
      model_with_scheduler({"_class_name": "DDPMScheduler", "prediction_type": "bogus"})),
    C("scheduler-not-json", SAMPLE + ["--model", "mt"], "scheduler config", model_with_scheduler("{oops")),
    C("scheduler-json-list", SAMPLE + ["--model", "mt"], "scheduler config", model_with_scheduler("[1000]")),
    # 7. manifests, field by field, with types (and against the graphs beside them)
    C("manifest-cache-shape", SAMPLE_ORT, "manifest.json says", mutate("g88/manifest.json", cache_shape)),
    C("manifest-cache-shape-check", ["check", "g88"], "manifest.json says", mutate("g88/manifest.json", cache_shape)),
    C("manifest-cache-dtype", SAMPLE_ORT, "float16", mutate("g88/manifest.json", cache_dtype)),
    C("manifest-sample-size", SAMPLE_ORT, "manifest.json says", mutate("g88/manifest.json", sample_size)),
    C("manifest-cache-dtype-mismatch", SAMPLE_ORT, "cache_dtype",
      mutate("g88/manifest.json", lambda m: m["caches"][0].update(dtype="float16"))),
    C("manifest-missing-opset", SAMPLE_ORT, "opset is missing", mutate("g88/manifest.json", lambda m: m.pop("opset"))),
    C("manifest-missing-model", SAMPLE_ORT, "model is missing", mutate("g88/manifest.json", lambda m: m.pop("model"))),
    C("manifest-missing-inputs", SAMPLE_ORT, "inputs is missing",
      mutate("g88/manifest.json", lambda m: m.pop("inputs"))),
    C("manifest-missing-caches", SAMPLE_ORT, "caches",
      mutate("g88/manifest.json", lambda m: m.pop("caches"))),
    C("manifest-missing-cache-name", SAMPLE_ORT, "input is missing",
      mutate("g88/manifest.json", lambda m: m["caches"][3].pop("input"))),
    C("manifest-opset-string", SAMPLE_ORT, "opset must be",
      mutate("g88/manifest.json", lambda m: m.update(opset="17"))),
    C("manifest-sample-size-string", SAMPLE_ORT, "sample_size",
      mutate("g88/manifest.json", lambda m: m["model"].update(sample_size="16"))),
    C("manifest-caches-object", SAMPLE_ORT, "caches must be",
      mutate("g88/manifest.json", lambda m: m.update(caches={"a": 1}))),
    C("manifest-layer-string", SAMPLE_ORT, "layers[0]", mutate("g88/manifest.json", lambda m: m["layers"].__setitem__(
        0, "conv_in"))),
    C("manifest-weight-shape-strings", SAMPLE_ORT, "weight_shape",
      mutate("g88/manifest.json", lambda m: m["layers"][0].update(weight_shape=["16", "1"]))),
    C("manifest-shape-negative", SAMPLE_ORT, "dimension",
      mutate("g88/manifest.json", lambda m: m["caches"][0].update(shape=["batch", -1, 16, 16]))),
    C("manifest-null", SAMPLE_ORT, "json object", write("g88/manifest.json", "null")),
    C("manifest-truncated", SAMPLE_ORT, "not valid json", truncate("g88/manifest.json")),
    C("manifest-missing", SAMPLE_ORT, "manifest.json: missing", remove("g88/manifest.json")),
    C("manifest-old-schema", SAMPLE_ORT, "schema_version",
      mutate("g88/manifest.json", lambda m: m.update(schema_version=1))),
    C("manifest-quant-config-bad", SAMPLE_ORT, "quant_config",
      mutate("g88/manifest.json", lambda m: m["quant_config"].update(act_bits=99))),
    C("manifest-quant-config-none-patterns", SAMPLE_ORT, "quant_config",
      mutate("g88/manifest.json", lambda m: m["quant_config"].update(skip_layers=None))),
    C("manifest-extra-graph-role", SAMPLE_ORT, "graph role",
      mutate("g88/manifest.json", lambda m: m["graphs"].update(refine="step.onnx"))),
    C("manifest-files-not-digests", SAMPLE_ORT, "files", mutate("g88/manifest.json", lambda m: m["files"].update(
        {"step.onnx": 5}))),
    C("manifest-scheduler-T", SAMPLE_ORT, "num_train_timesteps", mutate("g88/manifest.json", lambda m: m["model"][
        "scheduler_config"].update(num_train_timesteps=-3))),
    C("manifest-scheduler-beta", SAMPLE_ORT, "scheduler", mutate("g88/manifest.json", lambda m: m["model"][
        "scheduler_config"].update(beta_schedule="bogus"))),
    C("manifest-graph-path-escapes", SAMPLE_ORT, "graphs.prime", mutate("g88/manifest.json", lambda m: m[
        "graphs"].update(prime="../g84/prime.onnx"))),
    C("graphs-folder-is-file", SAMPLE[:-2] + ["--out", "s.png", "--backend", "ort", "--graphs", "cal.json"],
      "is a file"),
    C("graphs-folder-missing", SAMPLE + ["--backend", "ort", "--graphs", "nothere"], "not a folder"),
    C("graph-not-onnx", SAMPLE_ORT, "cannot load", lambda ws: _replace_graph_with_junk(ws)),
    # 9. serving limits (issue 20): refused before any server starts or any repository is written
    C("serve-queue-size-negative", SERVE + ["--max-queue-size", "-1"], "--max-queue-size"),
    C("serve-queue-timeout-negative", SERVE + ["--queue-timeout-ms", "-5"], "--queue-timeout-ms"),
    C("serve-exit-timeout-negative", SERVE + ["--exit-timeout-s", "-1"], "--exit-timeout-s"),
    C("serve-queue-size-not-a-number", SERVE + ["--max-queue-size", "many"], "--max-queue-size"),
    C("package-queue-size-negative", PACKAGE + ["--max-queue-size", "-1"], "--max-queue-size"),
    # an OpenVINO IR folder (the NNCF peer's form) where exported ONNX graphs are expected: one line, no protobuf
    C("ir-folder-sample-ort", [("ir" if a == "g88" else a) for a in SAMPLE_ORT], "OpenVINO IR folder"),
    C("ir-folder-evaluate-ort", [("ir" if a == "g88" else a) for a in EVALUATE_ORT], "OpenVINO IR folder"),
    C("ir-folder-check", ["check", "ir"], "OpenVINO IR folder"),
    C("ir-folder-build", ["build-engine", "ir", "--out", "e"], "OpenVINO IR folder"),
    C("ir-folder-package", ["package-triton", "ir", "--out", "mr", "--unet-backend", "python"], "OpenVINO IR folder"),
    C("package-queue-timeout-negative", PACKAGE + ["--queue-timeout-ms", "-1"], "--queue-timeout-ms"),
    C("package-max-inflight-0", PACKAGE + ["--max-inflight", "0"], "--max-inflight"),
    C("package-sequence-idle-0", PACKAGE + ["--sequence-idle-s", "0"], "--sequence-idle-s"),
]


def _replace_graph_with_junk(ws: Path) -> None:
    """step.onnx replaced by junk and its digest updated: the file 'belongs', but is not a graph."""
    from modiff_export.fsutil import sha256_file

    (ws / "g88" / "step.onnx").write_bytes(b"not a graph" * 100)
    m = json.loads((ws / "g88" / "manifest.json").read_text())
    m["files"]["step.onnx"] = sha256_file(ws / "g88" / "step.onnx")
    (ws / "g88" / "manifest.json").write_text(json.dumps(m))


def test_matrix_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, base: Path, tmp_path: Path, monkeypatch):
    ws = tmp_path / "ws"
    shutil.copytree(base, ws, symlinks=True)
    if case.setup:
        case.setup(ws)
    monkeypatch.chdir(ws)
    torch.manual_seed(0)
    if case.during:
        case.during(monkeypatch, ws)
    before = snapshot(ws)
    if case.readonly:
        with read_only(ws / case.readonly) as works:
            if not works:
                pytest.skip("cannot make a folder read-only here")
            code, out, err = run_cli(case.args)
    else:
        code, out, err = run_cli(case.args)
    line = error_line(code, err)
    assert case.expect.lower() in line.lower(), line
    after = snapshot(ws)
    for p in case.appears:  # the simulated other writer's files: theirs, left exactly as they wrote them
        assert p in after, f"{p} (another writer's) was removed"
        after.pop(p)
    assert not diff_snapshots(before, after), f"{diff_snapshots(before, after)} after: {line}"
    assert not temporaries(ws)
