"""The weights an exported folder computes with, read back from its prime graph (docs/design.md section 3),
so the PyTorch reference of a folder computes what its graphs compute, calibrated clips and GPTQ codes
included (the manifest records which rounding a layer has, not its codes).

    baked = baked_weights("graphs/x", manifest)   # {layer: BakedWeight}, every quantized Conv/Linear
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..errors import ModiffExportError
from ..manifest import Manifest


class BakedWeightError(ModiffExportError):
    pass


@dataclass(frozen=True)
class BakedWeight:
    """One layer's weight as its graph holds it, in the PyTorch layout [Cout, Cin, ...]: the dequantized
    value Wq, and for int8 per-channel initializers (target trt) its codes and scale [Cout]."""

    wq: torch.Tensor
    codes: torch.Tensor | None = None
    scale: torch.Tensor | None = None


def _dequantize_axes(model: onnx.ModelProto) -> dict[str, int]:
    return {n.input[0]: next((a.i for a in n.attribute if a.name == "axis"), 1)
            for n in model.graph.node if n.op_type == "DequantizeLinear"}


def baked_weights(folder: str | Path, manifest: Manifest) -> dict[str, BakedWeight]:
    """{layer: BakedWeight} for every quantized layer of `manifest` whose weight prime.onnx stores as
    `<layer>.weight.int8` + `.scale` (per output channel; exact codes) or, in an ONNX Runtime variant,
    as the folded float `<layer>.weight.dequantized.folded` (value only). Int4 block layers are left out."""
    model = onnx.load(str(Path(folder) / manifest.graphs["prime"]))
    inits = {t.name: t for t in model.graph.initializer}
    axes = _dequantize_axes(model)
    out = {}
    for layer in manifest.layers:
        if layer.skipped:
            continue
        shape = tuple(layer.weight_shape)
        codes_name, folded = f"{layer.name}.weight.int8", f"{layer.name}.weight.dequantized.folded"
        if codes_name in inits:
            codes = numpy_helper.to_array(inits[codes_name]).copy()
            scale = numpy_helper.to_array(inits[f"{layer.name}.weight.scale"]).astype(np.float32).reshape(-1)
            if axes.get(codes_name, 0) != 0:  # a Linear traced as MatMul: [Cin, Cout]
                codes = codes.T
            bshape = [-1] + [1] * (codes.ndim - 1)
            wq = codes.astype(np.float32) * scale.reshape(bshape)
            out[layer.name] = BakedWeight(torch.from_numpy(np.ascontiguousarray(wq)).reshape(shape),
                                          torch.from_numpy(np.ascontiguousarray(codes)).reshape(shape),
                                          torch.from_numpy(scale.copy()))
        elif folded in inits:
            w = numpy_helper.to_array(inits[folded]).astype(np.float32)
            if w.shape != shape and w.ndim == 2 and w.shape[::-1] == shape:
                w = w.T
            out[layer.name] = BakedWeight(torch.from_numpy(np.ascontiguousarray(w)).reshape(shape))
    return out
