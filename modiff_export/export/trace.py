"""ONNX export: a prime graph and a step graph with explicit Q/DQ and the caches as graph I/O.

    prime.onnx: sample, timestep[, encoder_hidden_states]            -> noise_pred, caches...
    step.onnx:  sample, timestep[, encoder_hidden_states][, delta_scales], caches... -> same

Both are traced from the PyTorch reference (quantization.py) with `export_qdq` on, so the graph
computes exactly what the reference computes; graph_passes.py then turns the weight Q/DQ pairs
into int8 initializers with per-channel DequantizeLinear. fp and ptq configs have no caches and
export the prime graph only.
"""
from __future__ import annotations

import contextlib
import shutil
import warnings
from pathlib import Path

import onnx
import torch
import torch.nn as nn
from tqdm import tqdm

from ..config import QuantConfig
from ..errors import ModiffExportError
from ..fsutil import atomic_folder, check_writable
from ..manifest import BATCH, CacheSpec, LayerInfo, Manifest, ScaleTable, TensorSpec
from ..models.loading import LoadedModel
from ..quant.quantization import (
    WeightChoices,
    apply_weight_choices,
    list_caches,
    modiff_layers,
    quantize,
    reset_caches,
    set_static_scales,
)
from . import passes as graph_passes

DEFAULT_OPSET = 17
BLOCK_QUANT_OPSET = 21  # DequantizeLinear block_size and the INT4 type
PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2  # leave headroom under protobuf's 2 GiB


class ExportError(ModiffExportError):
    pass


def _cache_names(layer: str, kind: str) -> tuple[str, str]:
    return f"cache_in.{layer}.{kind}", f"cache_out.{layer}.{kind}"


class _GraphModule(nn.Module):
    """Wraps the quantized UNet as a function of explicit tensors (what torch.onnx traces).

    phase "prime": (sample, timestep[, ehs])                              -> (noise, *caches)
    phase "step":  (sample, timestep[, ehs][, delta_scales], *caches)     -> (noise, *caches)
    """

    def __init__(self, unet, phase: str, conditional: bool, scale_input: bool, cache_dtype: torch.dtype):
        super().__init__()
        self.unet, self.phase, self.conditional = unet, phase, conditional
        self.scale_input, self.cache_dtype = scale_input, cache_dtype
        self.layers = [l for l in modiff_layers(unet) if l.uses_cache]
        self.quantized = [l for l in modiff_layers(unet) if not l.skipped]

    def forward(self, sample, timestep, *rest):
        rest = list(rest)
        ehs = rest.pop(0) if self.conditional else None
        if self.phase == "step":
            if self.scale_input:
                scales = rest.pop(0)  # [L]: this step's static delta scale per quantized layer
                for i, layer in enumerate(self.quantized):
                    layer.scale_override = scales[i]
            for i, layer in enumerate(self.layers):  # caches come in as graph inputs
                layer.a_hat = _as(rest[2 * i], torch.float32)
                layer.o_hat = _as(rest[2 * i + 1], torch.float32)
        for layer in modiff_layers(self.unet):
            layer.phase = self.phase
        kwargs = {"encoder_hidden_states": ehs} if ehs is not None else {}
        noise = self.unet(sample, timestep, **kwargs, return_dict=False)[0]
        caches = [t for l in self.layers for t in (l.a_hat, l.o_hat)]
        return (noise, *[_as(c, self.cache_dtype) for c in caches])


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast only when needed: a same-dtype .to() would still be traced as a no-op Cast node."""
    return t if t.dtype == dtype else t.to(dtype)


@contextlib.contextmanager
def _export_state(unet):
    layers = list(modiff_layers(unet))
    for l in layers:
        l.export_qdq = True
        l.bake_weight()  # the parameter becomes Wq in place: the graph constant, no extra copy
    try:
        yield
    finally:
        for l in layers:
            l.export_qdq, l.phase, l.scale_override = False, None, None
        reset_caches(unet)


def _spec(name: str, shape, dtype: str) -> dict:
    return {"name": name, "shape": list(shape), "dtype": dtype}


def export_model(model: LoadedModel, config: QuantConfig, out: str | Path, *,
                 scales: ScaleTable | None = None, weights: WeightChoices | None = None,
                 cache_dtype: str = "float32", opset: int = DEFAULT_OPSET, target: str = "trt",
                 overwrite: bool = False, progress: bool = True) -> Manifest:
    """Quantize `model.unet` (in place: pass `model.copy()` to keep it) with `config` and write graphs
    + manifest.json into `out` (docs/design.md section 3).

    weights: from calibration (Calibration.weights): per-channel clip ratios and GPTQ-rounded weights,
            whose codes and scales become exactly these layers' int8 weight initializers.
    scales: for scale_mode="static", the calibrated ScaleTable (Calibration.scale_table); one bucket
            becomes constants, several become a `delta_scales` input.
    target: "trt" (explicit Q/DQ, as TensorRT wants) or "ort" (rewritten for ONNX Runtime CPU by
            ort_variant.py before the folder appears).
    Returns the manifest. The folder appears only when everything succeeded; an existing `out` is
    replaced only with `overwrite` (atomically: see fsutil.atomic_folder).
    """
    out = check_writable(out, overwrite)
    unet, info = model.unet, model
    if unet is None:
        raise ExportError(f"model {model.name!r} has no weights loaded; export needs the UNet itself")
    if cache_dtype not in ("float32", "float16"):
        raise ExportError(f"cache dtype {cache_dtype!r} not in ['float32', 'float16']")
    if config.weight_block_size is not None and opset < BLOCK_QUANT_OPSET:
        raise ExportError(f"weight_block_size={config.weight_block_size} (INT4 block-quantized weights) needs "
                          f"opset >= {BLOCK_QUANT_OPSET} (DequantizeLinear block_size), got opset {opset}; "
                          f"pass --opset 21")
    if config.scale_mode == "static" and scales is None:
        raise ExportError("scale_mode='static' needs a calibration file (--calibration)")
    unet = quantize(unet, config).eval()
    try:  # calibrated per-channel weight clipping (MSE search) and GPTQ-rounded weights
        apply_weight_choices(unet, weights or WeightChoices())
    except ModiffExportError as e:
        raise ExportError(f"calibration {e}; the calibration file does not fit this model and config") from None
    n_buckets = 1
    if scales is not None and config.mode != "fp":
        set_static_scales(unet, scales)
        n_buckets = scales.n_buckets
    if config.mode == "ptq" and n_buckets > 1:
        raise ExportError("ptq with several timestep buckets is not supported: calibrate with --buckets 1")

    # example inputs (any batch works at run time: the batch axis is symbolic)
    C, H, W = info.sample_shape
    B = 1  # the smallest trace: activations and caches of one sample (SD-sized models: ~1.8 GB)
    torch.manual_seed(0)
    sample = torch.randn(B, C, H, W)
    timestep = torch.full((B,), 500.0)
    inputs = [_spec("sample", (BATCH, C, H, W), "float32"), _spec("timestep", (BATCH,), "float32")]
    args = [sample, timestep]
    if info.conditional:
        S, D = info.encoder_seq_len or 77, info.cross_attention_dim
        inputs.append(_spec("encoder_hidden_states", (BATCH, S, D), "float32"))
        args.append(torch.randn(B, S, D))

    # one real prime call gives every cache's shape
    with torch.no_grad(), _export_state(unet):
        reset_caches(unet)
        prime = _GraphModule(unet, "prime", info.conditional, False, getattr(torch, cache_dtype))
        prime(*args)
        entries = list_caches(unet)
    quantized = [l for l in modiff_layers(unet) if not l.skipped]
    caches = []
    for e in entries:
        cin, cout = _cache_names(e.layer, e.kind)
        caches.append({"layer": e.layer, "kind": e.kind, "input": cin, "output": cout,
                       "shape": [BATCH, *e.shape[1:]], "dtype": cache_dtype})
    if target not in ("trt", "ort"):
        raise ExportError(f"target {target!r} not in ['trt', 'ort']")
    out_ch = int(getattr(unet.config, "out_channels", C))
    outputs = [_spec("noise_pred", (BATCH, out_ch, H, W), "float32")]
    step_extra = []
    if n_buckets > 1 and config.mode == "modiff":
        step_extra.append(_spec("delta_scales", (len(quantized),), "float32"))
    has_step = bool(caches)
    io_shapes = {s["name"]: s["shape"] for s in inputs + outputs + step_extra}
    io_shapes.update({c[k]: c["shape"] for c in caches for k in ("input", "output")})

    roles = ["prime", "step"] if has_step else ["prime"]
    manifest = Manifest(
        model=info.info, quant_config=config, opset=opset, cache_dtype=cache_dtype,
        graphs={"prime": "prime.onnx", "step": "step.onnx" if has_step else None},
        inputs=tuple(TensorSpec(s["name"], tuple(s["shape"]), s["dtype"]) for s in inputs),
        outputs=tuple(TensorSpec(s["name"], tuple(s["shape"]), s["dtype"]) for s in outputs),
        caches=tuple(CacheSpec(**{**c, "shape": tuple(c["shape"])}) for c in caches),
        step_extra_inputs=tuple(TensorSpec(s["name"], tuple(s["shape"]), s["dtype"]) for s in step_extra),
        layers=tuple(LayerInfo(**_layer_entry(layer)) for layer in modiff_layers(unet)),
        scales=None if scales is None else scales.for_layers(tuple(layer.name for layer in quantized)))
    with atomic_folder(out, overwrite) as tmp:
        bar = tqdm(roles, desc=f"export {config.tag}", disable=not progress, unit="graph")
        for role in bar:
            bar.set_postfix_str(role)
            _trace(unet, role, args, inputs, step_extra, caches, scales, cache_dtype, opset, tmp / f"{role}.onnx",
                   io_shapes, info.conditional)
        if target == "ort":
            from .ort_variant import apply_to_folder

            manifest = apply_to_folder(tmp, manifest)
        manifest = manifest.with_digests(tmp)
        manifest.write(tmp)
    return manifest


def _layer_entry(l) -> dict:
    w = l.inner.weight
    kind = "conv" if isinstance(l.inner, nn.Conv2d) else "linear"
    return {"name": l.name, "kind": kind, "weight_shape": tuple(w.shape), "skipped": l.skipped,
            "weight_bits": None if l.skipped else l.weight_bits, "act_bits": None if l.skipped else l.act_bits,
            "cached": l.uses_cache, "weight_format": None if l.skipped else l.weight_format,
            "weight_note": l.weight_note or None, "weight_rounding": l.weight_rounding}


def _trace(unet, role, args, inputs, step_extra, caches, scales, cache_dtype, opset, path: Path,
           io_shapes: dict[str, list], conditional: bool) -> None:
    module = _GraphModule(unet, role, conditional, bool(step_extra), getattr(torch, cache_dtype))
    in_names = [s["name"] for s in inputs]
    out_names = ["noise_pred"] + [c["output"] for c in caches]
    call_args = list(args)
    with torch.no_grad(), _export_state(unet):
        if role == "step":
            if step_extra:
                table = scales.table
                call_args.append(torch.tensor([table[l.name][0] for l in module.quantized]))
                in_names += [s["name"] for s in step_extra]
            module.phase = "prime"
            first = module(*args)  # real caches as example step inputs
            module.phase = "step"
            call_args += list(first[1:])
            in_names += [c["input"] for c in caches]
        dynamic = {n: {0: BATCH} for n in in_names + out_names if n != "delta_scales"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw_dir = path.parent / f".raw-{role}"  # torch may write external-data files here
            raw_dir.mkdir()
            raw = raw_dir / "model.onnx"
            try:
                torch.onnx.export(module, tuple(call_args), str(raw), dynamo=False, opset_version=opset,
                                  input_names=in_names, output_names=out_names, dynamic_axes=dynamic,
                                  do_constant_folding=True)
            except Exception as e:  # e.g. an operator this opset lacks (attention needs opset >= 14)
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                raise ExportError(f"torch.onnx.export cannot trace the {role} graph at opset {opset}: "
                                  f"{first}") from None
    model = onnx.load(str(raw))
    shutil.rmtree(raw_dir)
    graph_passes.quantize_weight_constants(model, (
        (l.name, l.inner.weight.detach().numpy(), l.w_scale.numpy(), l.block_size)  # baked: weight == Wq
        for l in modiff_layers(unet) if not l.skipped))
    graph_passes.remove_unused(model)
    graph_passes.set_io_shapes(model, io_shapes)
    _save(model, path)
    del model
    onnx.checker.check_model(str(path), full_check=True)  # full_check runs strict shape inference too


def _save(model: onnx.ModelProto, path: Path) -> None:
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if size > PROTOBUF_LIMIT:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
