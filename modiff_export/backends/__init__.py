"""Backends behind one runner contract: torch (reference), ort (ONNX Runtime), trt (TensorRT)."""
from .base import Runner, RunnerError

__all__ = ["Runner", "RunnerError"]
