"""Backends behind one runner contract: torch (reference), ort (ONNX Runtime), trt (TensorRT)."""
from .base import Runner, RunnerError

BACKENDS = ("torch",)  # later: "ort", "trt"


def make_runner(backend: str, unet=None, **kwargs) -> Runner:
    """A runner for `backend`. torch: the (quantized) UNet itself. Other backends take their
    artifacts (graph folder, engine folder) through kwargs once they exist."""
    if backend == "torch":
        from .torch_runner import TorchRunner

        if unet is None:
            raise RunnerError("backend 'torch' needs a UNet")
        return TorchRunner(unet)
    raise RunnerError(f"unknown or not yet supported backend {backend!r}; expected one of {list(BACKENDS)}")


__all__ = ["Runner", "RunnerError", "make_runner", "BACKENDS"]
