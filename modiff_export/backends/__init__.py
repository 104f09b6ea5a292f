"""Step 5 of the pipeline: runners. One contract (base.py), one class per backend: torch (the PyTorch
reference), ort (ONNX Runtime), openvino (OpenVINO CPU), trt (TensorRT)."""
from .base import Runner, RunnerError

BACKENDS = ("torch", "ort", "openvino", "trt")
FOLDER_OPTION = {"ort": "--graphs graphs/<name>", "openvino": "--graphs graphs/<name>",
                 "trt": "--engines engines/<name>"}


def make_runner(backend: str, unet=None, folder=None, **kwargs) -> Runner:
    """A runner for `backend`: torch takes the (quantized) UNet; ort and openvino a graph folder written
    by `cli.py export`; trt an engine folder written by `cli.py build-engine`."""
    if backend not in BACKENDS:
        raise RunnerError(f"unknown backend {backend!r}; expected one of {list(BACKENDS)}")
    if backend == "torch":
        from .torch_runner import TorchRunner

        if unet is None:
            raise RunnerError("backend 'torch' needs a UNet")
        return TorchRunner(unet)
    if folder is None:
        raise RunnerError(f"backend {backend!r} needs a folder: {FOLDER_OPTION[backend]}")
    if backend == "ort":
        from .ort_runner import OrtRunner

        return OrtRunner(folder, **kwargs)
    if backend == "openvino":
        from .openvino_runner import OpenVinoRunner

        return OpenVinoRunner(folder, **kwargs)
    from .trt_runner import TrtRunner

    return TrtRunner.from_folder(folder, **kwargs)


__all__ = ["BACKENDS", "Runner", "RunnerError", "make_runner"]
