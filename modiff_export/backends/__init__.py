"""Backends behind one runner contract: torch (reference), ort (ONNX Runtime), openvino (OpenVINO CPU), trt (TensorRT)."""
from .base import Runner, RunnerError

BACKENDS = ("torch", "ort", "openvino", "trt")


def make_runner(backend: str, unet=None, folder=None, **kwargs) -> Runner:
    """A runner for `backend`: torch takes the (quantized) UNet; ort a graph folder written by
    `cli.py export` (so does openvino); trt an engine folder written by `cli.py build-engine`."""
    if backend == "torch":
        from .torch_runner import TorchRunner

        if unet is None:
            raise RunnerError("backend 'torch' needs a UNet")
        return TorchRunner(unet)
    if backend in ("ort", "openvino", "trt") and folder is None:
        raise RunnerError(f"backend {backend!r} needs a folder: --graphs graphs/<name> (ort, openvino) or --engines engines/<name> (trt)")
    if backend == "ort":
        from .ort_runner import OrtRunner

        return OrtRunner(folder, **kwargs)
    if backend == "openvino":
        from .openvino_runner import OpenVinoRunner

        return OpenVinoRunner(folder, **kwargs)
    if backend == "trt":
        from .trt_runner import TrtRunner

        return TrtRunner.from_folder(folder, **kwargs)
    raise RunnerError(f"unknown backend {backend!r}; expected one of {list(BACKENDS)}")


__all__ = ["Runner", "RunnerError", "make_runner", "BACKENDS"]
