"""The peer baseline: ONNX Runtime's own static W8A8 quantization (quantize_static) of the FP graph,
configured as a user who reaches for it would, calibrated on UNet inputs recorded from FP trajectories."""
from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

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
PEER_DEFAULT_SETTINGS = {"quant_format": "QDQ", "per_channel": True, "activation_type": "QUInt8",
                         "weight_type": "QInt8",
                         "op_types_to_quantize": None, "calibrate_method": "MinMax", "extra_options": {}}


def peer_settings_text(settings: dict) -> str:
    ops = settings["op_types_to_quantize"]
    extra = ", ".join(f"{k}={v}" for k, v in settings["extra_options"].items())
    return (f"quant_format={settings['quant_format']}, per_channel={settings['per_channel']}, "
            f"activation_type={settings['activation_type']}, weight_type={settings['weight_type']}, "
            f"op_types_to_quantize={ops if ops else 'all'}, calibrate_method={settings['calibrate_method']}"
            + (f", extra_options: {extra}" if extra else ""))


def peer_quantize(fp_folder: Path, out: Path, inputs: list, progress: bool = True,
                  settings: dict | None = None) -> Path:
    """ONNX Runtime's own static W8A8 quantization (quantize_static, `settings`, default PEER_SETTINGS)
    of the FP graph, calibrated on UNet inputs recorded from FP trajectories (every timestep); written
    as prime.onnx in a copy of the fp folder (same manifest), so OrtRunner runs it."""
    import logging

    import numpy as np
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    s = settings or PEER_SETTINGS

    class Reader(CalibrationDataReader):
        def __init__(self):
            # Recorder.inputs: (sample, timestep, cond); the demo's model is unconditional (cond None)
            self.it = iter([{"sample": x.numpy(), "timestep": np.full((x.shape[0],), t, np.float32)} for x,
                            t, _ in inputs])

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
    from ..manifest import Manifest

    # the folder's graph is no longer the exported FP graph: record what it is, and its digest
    manifest = Manifest.load(fp_folder).replace(target="ort", variant={"method": "onnxruntime.quantize_static",
                                                                       "settings": peer_settings_text(s)})
    manifest.with_digests(out).write(out)
    return out
