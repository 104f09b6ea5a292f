"""The OpenVINO peer: NNCF's post-training int8 quantization of the FP graph, as OpenVINO users run it.

`nncf.quantize` on the OpenVINO model of the exported FP graph, calibrated on UNet inputs recorded from
full-precision trajectories of the same model (every timestep), with the settings of OpenVINO's own
diffusion-UNet examples (NNCF_SETTINGS): transformer model type (attention's activation x activation
MatMuls stay float, SmoothQuant off), the default symmetric "performance" preset, bias correction off
(it gains little on diffusion UNets and costs time), every recorded call used. The result is written as
an OpenVINO IR (`prime.xml` + `prime.bin`) with the FP folder's manifest (target "openvino"), so
`OpenVinoRunner` runs it like any exported folder; run it at precision "default", as OpenVINO does.

With block reuse (`nncf_quantize_reuse`, issue 33's peer): both graphs of an FP reuse folder (the full graph,
which also writes the reused feature, and the shallow graph, which reads it), each calibrated on the calls of
its kind recorded from FP reuse trajectories, so NNCF runs the same schedule MoDiff does.
"""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

NNCF_SETTINGS = {"model_type": "TRANSFORMER", "preset": "PERFORMANCE", "subset_size": "all recorded calls",
                 "disable_bias_correction": True}


def nncf_settings_text(settings: dict | None = None) -> str:
    s = settings or NNCF_SETTINGS
    return ", ".join(f"{k}={v}" for k, v in s.items())


def nncf_quantize(fp_folder: Path, out: Path, inputs: list, settings: dict | None = None) -> Path:
    """NNCF int8 of `fp_folder`'s prime.onnx, calibrated on `inputs` ([(sample, timestep, cond {name: tensor})]
    from FP trajectories, harness/recorder.py; inputs the recording left out take their defaults, e.g. a PixArt
    mask of all ones: Conditioning.check), written to `out` (prime.xml/.bin + manifest.json)."""
    return nncf_quantize_reuse(fp_folder, out, inputs, None, settings)


def nncf_quantize_reuse(fp_folder: Path, out: Path, inputs: list, shallow_inputs: list | None,
                        settings: dict | None = None) -> Path:
    """nncf_quantize of prime.onnx and, for a reuse folder, of shallow.onnx, calibrated on `shallow_inputs`
    [(sample, timestep, cond, feature)] (the feature: what that shallow call read)."""
    import nncf
    import openvino as ov

    from ..fsutil import atomic_folder
    from ..manifest import Manifest

    s = settings or NNCF_SETTINGS
    fp_folder, out = Path(fp_folder), Path(out)
    fp = Manifest.load(fp_folder)
    q = {"prime": _quantize(fp_folder / "prime.onnx", [_item(fp, *call) for call in inputs], s)}
    if shallow_inputs is not None:
        feature = fp.reuse.feature.input
        q["shallow"] = _quantize(fp_folder / "shallow.onnx",
                                 [{**_item(fp, x, t, c), feature: f.numpy()} for x, t, c, f in shallow_inputs], s)
    n = len(inputs) + len(shallow_inputs or ())
    manifest = fp.replace(
        graphs={"prime": "prime.xml", "step": None, "shallow": "shallow.xml" if shallow_inputs is not None else None},
        target="openvino", variant={"method": f"nncf.quantize (nncf {nncf.__version__})",
                                    "settings": nncf_settings_text(s), "calibration_calls": n})
    with atomic_folder(out, overwrite=True) as tmp:
        for role, model in q.items():
            ov.save_model(model, str(tmp / f"{role}.xml"), compress_to_fp16=False)
        manifest.with_digests(tmp).write(tmp)
    return out


def _item(fp, x, t, cond) -> dict:
    """One calibration feed of the FP folder's graphs: sample, timestep, the checked conditioning."""
    import numpy as np

    feeds = fp.conditioning.check(cond, x.shape[0], "nncf calibration", fp.model.sample_size)
    return {"sample": x.numpy(), "timestep": np.full((x.shape[0],), float(t), np.float32),
            **{k: v.numpy() for k, v in feeds.items()}}


def _quantize(path: Path, items: list[dict], s: dict):
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(path))
    level = logging.getLogger("nncf").level
    logging.getLogger("nncf").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # progress bars
            q = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items),
                              model_type=getattr(nncf.ModelType, s["model_type"]),
                              preset=getattr(nncf.QuantizationPreset, s["preset"]),
                              advanced_parameters=nncf.AdvancedQuantizationParameters(
                                  disable_bias_correction=s["disable_bias_correction"]))
    finally:
        logging.getLogger("nncf").setLevel(level)
    return q
