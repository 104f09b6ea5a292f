"""modiff-export: MoDiff (modulated quantization) for diffusion UNets, from PyTorch to engines."""
from .config import ConfigError, QuantConfig
from .quant.quantization import MoDiffError, MoDiffLayer, list_caches, quantize, reset_caches

__all__ = ["QuantConfig", "ConfigError", "quantize", "reset_caches", "list_caches", "MoDiffLayer", "MoDiffError"]
__version__ = "0.1.0"
