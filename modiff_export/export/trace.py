"""ONNX export: a prime graph and a step graph with explicit Q/DQ and the caches as graph I/O.

    prime.onnx: sample, timestep[, cond]                             -> noise_pred, caches...[, feature]
    step.onnx:  sample, timestep[, cond][, delta_scales], caches...  -> same
    shallow.onnx (block reuse, design section 1.1): sample, timestep[, cond], outer caches..., feature
                                                                      -> noise_pred, outer caches...

cond: the model's named conditioning inputs in their order (models/conditioning.py: encoder_hidden_states,
class_labels, encoder_attention_mask, text_embeds/time_ids, pooled_projections, guidance); the denoiser is
called through models/denoiser.py. FLUX graphs take packed latents [B, N, C*4] as `sample`.

Both are traced from the PyTorch reference (quant/quantization.py) with `export_qdq` on, so the graph
computes exactly what the reference computes; export/passes.py then stores each quantized weight as
int8 (or int4) codes read by a per-channel (or block) DequantizeLinear. fp and ptq configs have no
caches and export the prime graph only.

export_model builds the typed Manifest first (inputs, outputs, one CacheSpec per cache from one real
prime call, LayerInfo, ScaleTable); each graph is then traced with the names, batch axes and shapes
the Manifest lists, so the graphs and manifest.json cannot disagree.
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
from ..manifest import BATCH, CacheSpec, LayerInfo, Manifest, ReuseSpec, ScaleTable, TensorSpec
from ..models import denoiser
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
from ..quant.reuse import ReuseError
from . import passes

DEFAULT_OPSET = 17
BLOCK_QUANT_OPSET = 21  # DequantizeLinear block_size and the INT4 type
PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2  # leave headroom under protobuf's 2 GiB


class ExportError(ModiffExportError):
    pass


def _cache_names(layer: str, kind: str) -> tuple[str, str]:
    return f"cache_in.{layer}.{kind}", f"cache_out.{layer}.{kind}"


class _GraphModule(nn.Module):
    """Wraps the quantized denoiser as a function of explicit tensors (what torch.onnx traces).

    phase "prime":   (sample, timestep, *cond)                            -> (noise, *caches[, feature])
    phase "step":    (sample, timestep, *cond[, delta_scales], *caches)   -> (noise, *caches[, feature])
    phase "shallow": (sample, timestep, *cond, *outer caches, feature)    -> (noise, *outer caches)
    cond: one tensor per name of `cond_names` (the manifest's conditioning, in order).
    """

    def __init__(self, unet, phase: str, cond_names: tuple[str, ...], scale_input: bool, cache_dtype: torch.dtype):
        super().__init__()
        self.unet, self.phase, self.cond_names = unet, phase, tuple(cond_names)
        self.scale_input, self.cache_dtype = scale_input, cache_dtype
        self.layers = [l for l in modiff_layers(unet) if l.uses_cache]
        self.quantized = [l for l in modiff_layers(unet) if not l.skipped]
        self.reuse = getattr(unet, "modiff_reuse", None)
        self.outer = [l for l in self.layers if self.reuse is None or not self.reuse.is_deep(l.name)]

    def forward(self, sample, timestep, *rest):
        rest = list(rest)
        cond = {name: rest.pop(0) for name in self.cond_names}
        shallow = self.phase == "shallow"
        if self.phase == "step" and self.scale_input:
            scales = rest.pop(0)  # [L]: this step's static delta scale per quantized layer
            for i, layer in enumerate(self.quantized):
                layer.scale_override = scales[i]
        if self.phase != "prime":
            for i, layer in enumerate(self.outer if shallow else self.layers):  # caches come in as graph inputs
                layer.a_hat = _as(rest[2 * i], torch.float32)
                layer.o_hat = _as(rest[2 * i + 1], torch.float32)
        for layer in modiff_layers(self.unet):
            layer.phase = "step" if shallow else self.phase
        if self.reuse is not None:
            self.reuse.phase = "shallow" if shallow else "full"
            if shallow:
                self.reuse.feature = _as(rest[-1], torch.float32)
        noise = denoiser.call(self.unet, sample, timestep, cond)
        caches = [t for l in (self.outer if shallow else self.layers) for t in (l.a_hat, l.o_hat)]
        if self.reuse is not None and not shallow:
            caches.append(self.reuse.feature)
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
        if getattr(unet, "modiff_reuse", None) is not None:
            unet.modiff_reuse.phase = None
        reset_caches(unet)


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

    Steps: check the request; quantize the UNet; one prime call on example inputs gives the cache
    shapes; the Manifest is built from those; each graph is traced from the Manifest's I/O.
    """
    out = check_writable(out, overwrite)
    _check_request(model, config, scales, cache_dtype, opset)
    unet, n_buckets = _quantized_unet(model, config, scales, weights or WeightChoices())
    inputs = _input_specs(model)
    args = _example_args(model, inputs)
    caches, feature = _cache_specs(unet, args, model.conditioning.names, cache_dtype)
    if target not in ("trt", "ort"):
        raise ExportError(f"target {target!r} not in ['trt', 'ort']")
    manifest = _manifest(model, unet, config, inputs, caches, scales, n_buckets, cache_dtype, opset, feature)
    with atomic_folder(out, overwrite) as tmp:
        bar = tqdm(manifest.roles, desc=f"export {config.tag}", disable=not progress, unit="graph")
        for role in bar:
            bar.set_postfix_str(role)
            _trace(unet, manifest, role, args, tmp / manifest.graphs[role])
        if target == "ort":
            from .ort_variant import apply_to_folder

            manifest = apply_to_folder(tmp, manifest)
        manifest = manifest.with_digests(tmp)
        manifest.write(tmp)
    return manifest


# -- the steps of export_model ------------------------------------------------------------------------
def _check_request(model: LoadedModel, config: QuantConfig, scales: ScaleTable | None, cache_dtype: str,
                   opset: int) -> None:
    """Refuse, before any work, what cannot be exported."""
    if model.unet is None:
        raise ExportError(f"model {model.name!r} has no weights loaded; export needs the UNet itself")
    if cache_dtype not in ("float32", "float16"):
        raise ExportError(f"cache dtype {cache_dtype!r} not in ['float32', 'float16']")
    if config.weight_block_size is not None and opset < BLOCK_QUANT_OPSET:
        raise ExportError(f"weight_block_size={config.weight_block_size} (INT4 block-quantized weights) needs "
                          f"opset >= {BLOCK_QUANT_OPSET} (DequantizeLinear block_size), got opset {opset}; "
                          f"pass --opset 21")
    if config.scale_mode == "static" and scales is None:
        raise ExportError("scale_mode='static' needs a calibration file (--calibration)")


def _quantized_unet(model: LoadedModel, config: QuantConfig, scales: ScaleTable | None, weights: WeightChoices
                    ) -> tuple[nn.Module, int]:
    """model.unet quantized in place, with the calibration's weights and static scales; and the
    number of timestep buckets of those scales (1 without)."""
    try:
        unet = quantize(model.unet, config).eval()
    except ReuseError as e:
        raise ExportError(f"model {model.name!r}: {e}") from None
    try:  # calibrated per-channel weight clipping (MSE search) and GPTQ-rounded weights
        apply_weight_choices(unet, weights)
    except ModiffExportError as e:
        raise ExportError(f"calibration {e}; the calibration file does not fit this model and config") from None
    n_buckets = 1
    if scales is not None and config.mode != "fp":
        set_static_scales(unet, scales)
        n_buckets = scales.n_buckets
    if config.mode == "ptq" and n_buckets > 1:
        raise ExportError("ptq with several timestep buckets is not supported: calibrate with --buckets 1")
    return unet, n_buckets


def _input_specs(model: LoadedModel) -> tuple[TensorSpec, ...]:
    """sample [batch, C, H, W] (packed: [batch, N, C*4]), timestep [batch], then every conditioning input."""
    specs = [TensorSpec("sample", (BATCH, *model.graph_sample_shape), "float32"),
             TensorSpec("timestep", (BATCH,), "float32")]
    return tuple(specs + [TensorSpec(c.name, (BATCH, *c.shape), c.dtype) for c in model.conditioning])


def _example_args(model: LoadedModel, inputs: tuple[TensorSpec, ...]) -> list[torch.Tensor]:
    """One example tensor per input at batch 1 (the smallest trace: activations and caches of one sample,
    ~1.8 GB for SD-sized models; any batch works at run time, the batch axis is symbolic); seed 0. The
    conditioning's examples: Conditioning.example (a PixArt mask that masks the last token)."""
    g = torch.Generator().manual_seed(0)
    cond = model.conditioning.example(1, model.sample_shape[1:], g)
    sample = torch.randn((1, *model.graph_sample_shape), generator=g)
    return [sample, torch.full((1,), 500.0)] + [cond[s.name] for s in inputs[2:]]


def _cache_specs(unet: nn.Module, args: list[torch.Tensor], cond_names: tuple[str, ...], cache_dtype: str
                 ) -> tuple[tuple[CacheSpec, ...], CacheSpec | None]:
    """One real prime call gives every cache's shape: (a_hat, o_hat) [batch, ...] per cached layer, and
    that of the block-reuse feature (None without reuse)."""
    with torch.no_grad(), _export_state(unet):
        reset_caches(unet)
        _GraphModule(unet, "prime", cond_names, False, getattr(torch, cache_dtype))(*args)
        entries = list_caches(unet)
        reuse = getattr(unet, "modiff_reuse", None)
        feature = None if reuse is None else CacheSpec(reuse.source, "feature", *_cache_names(reuse.source, "feature"),
                                                       (BATCH, *reuse.feature.shape[1:]), cache_dtype)
    return tuple(CacheSpec(e.layer, e.kind, *_cache_names(e.layer, e.kind), (BATCH, *e.shape[1:]), cache_dtype)
                 for e in entries), feature


def _manifest(model: LoadedModel, unet: nn.Module, config: QuantConfig, inputs: tuple[TensorSpec, ...],
              caches: tuple[CacheSpec, ...], scales: ScaleTable | None, n_buckets: int, cache_dtype: str,
              opset: int, feature: CacheSpec | None = None) -> Manifest:
    """The typed contract of the graphs about to be traced (file digests are added after writing)."""
    quantized = [layer.name for layer in modiff_layers(unet) if not layer.skipped]
    step_extra = ()
    if n_buckets > 1 and config.mode == "modiff":  # delta_scales [L]: one scale per quantized layer per step
        step_extra = (TensorSpec("delta_scales", (len(quantized),), "float32"),)
    table = None if scales is None else scales.for_layers(tuple(quantized))
    reuse = None
    if feature is not None:
        state = unet.modiff_reuse
        reuse = ReuseSpec(config.reuse_interval, config.reuse_depth, feature,
                          tuple(layer.name for layer in modiff_layers(unet) if state.is_deep(layer.name)))
    return Manifest(
        model=model.info, quant_config=config, opset=opset, cache_dtype=cache_dtype, reuse=reuse,
        graphs={"prime": "prime.onnx", "step": "step.onnx" if caches else None,
                "shallow": "shallow.onnx" if reuse else None},
        # what the denoiser returns: the epsilon half of learned-sigma models; packed latents for FLUX
        inputs=inputs, outputs=(TensorSpec("noise_pred", (BATCH, *model.info.graph_output_shape), "float32"),),
        caches=caches, step_extra_inputs=step_extra,
        layers=tuple(LayerInfo(**_layer_entry(layer)) for layer in modiff_layers(unet)), scales=table)


def _layer_entry(l) -> dict:
    w = l.inner.weight
    kind = "conv" if isinstance(l.inner, nn.Conv2d) else "linear"
    return {"name": l.name, "kind": kind, "weight_shape": tuple(w.shape), "skipped": l.skipped,
            "weight_bits": None if l.skipped else l.weight_bits, "act_bits": None if l.skipped else l.act_bits,
            "cached": l.uses_cache, "weight_format": None if l.skipped else l.weight_format,
            "weight_note": l.weight_note or None, "weight_rounding": l.weight_rounding}


def _trace(unet: nn.Module, manifest: Manifest, role: str, args: list[torch.Tensor], path: Path) -> None:
    """Trace the `role` graph with the names, batch axes and shapes of `manifest`, turn its weights into
    int8/int4 initializers (passes.py) and write it to `path` (checked by onnx.checker)."""
    module = _GraphModule(unet, role, manifest.conditioning.names, bool(manifest.step_extra_inputs),
                          getattr(torch, manifest.cache_dtype))
    in_specs, out_specs = manifest.graph_inputs(role), manifest.graph_outputs(role)
    call_args = list(args)
    with torch.no_grad(), _export_state(unet):
        if role != "prime":
            if role == "step" and manifest.step_extra_inputs:  # delta_scales [L]: bucket 0's row as the example
                table = manifest.scales.table
                call_args.append(torch.tensor([table[name][0] for name in manifest.scales.layers]))
            module.phase = "prime"
            first = dict(zip([s.name for s in manifest.graph_outputs("prime")], module(*args)))
            module.phase = role
            call_args += [first[c.output] for c in manifest.cache_io(role)[0]]  # real caches as example inputs
        model = _torch_export(module, call_args, in_specs, out_specs, manifest.opset, role, path.parent)
    passes.quantize_weight_constants(model, (
        (l.name, l.inner.weight.detach().numpy(), l.w_scale.numpy(), l.block_size)  # baked: weight == Wq
        for l in modiff_layers(unet) if not l.skipped))
    passes.remove_unused(model)
    passes.set_io_shapes(model, {s.name: list(s.shape) for s in in_specs + out_specs})
    passes.fold_static_squeezes(model)
    passes.fold_constant_mods(model)
    passes.remove_unused(model)
    _save(model, path)
    del model
    onnx.checker.check_model(str(path), full_check=True)  # full_check runs strict shape inference too


def _torch_export(module: nn.Module, call_args: list, in_specs: list[TensorSpec], out_specs: list[TensorSpec],
                  opset: int, role: str, folder: Path) -> onnx.ModelProto:
    """The traced graph, loaded: torch.onnx.export writes into a scratch folder under `folder` (it may
    write external-data files there), removed after loading. Axis 0 is the symbolic batch of every
    tensor that has one."""
    names = [s.name for s in in_specs + out_specs]
    dynamic = {s.name: {0: BATCH} for s in in_specs + out_specs if s.shape[:1] == (BATCH,)}
    raw_dir = folder / f".raw-{role}"
    raw_dir.mkdir()
    raw = raw_dir / "model.onnx"
    with warnings.catch_warnings(), _traceable_rms_norm(), _traceable_rotary():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, tuple(call_args), str(raw), dynamo=False, opset_version=opset,
                              input_names=names[:len(in_specs)], output_names=names[len(in_specs):],
                              dynamic_axes=dynamic, do_constant_folding=True)
        except Exception as e:  # e.g. an operator this opset lacks (attention needs opset >= 14)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise ExportError(f"torch.onnx.export cannot trace the {role} graph at opset {opset}: "
                              f"{first}") from None
    model = onnx.load(str(raw))
    shutil.rmtree(raw_dir)
    return model


@contextlib.contextmanager
def _traceable_rms_norm():
    """torch.nn.RMSNorm (FLUX's and SD3.5's q/k norms) traces to aten::rms_norm, an ONNX op only from opset 23:
    while tracing, compute it from its definition instead, x * rsqrt(mean(x^2, last dims) + eps) * weight, which
    traces to ONNX ops of every opset with the batch axis left dynamic (eps None: the dtype's eps, as torch)."""
    def forward(self, x):
        dims = tuple(range(-len(self.normalized_shape), 0))
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
        return y * self.weight if self.weight is not None else y

    original = nn.RMSNorm.forward
    nn.RMSNorm.forward = forward
    try:
        yield
    finally:
        nn.RMSNorm.forward = original


@contextlib.contextmanager
def _traceable_rotary():
    """FLUX's rotary embedding (diffusers' apply_rotary_emb, use_real_unbind_dim=-1) reshapes with
    `x.reshape(*x.shape[:-1], -1, 2)`: the tracer records that slice of x.shape as constants, so the graph would
    run at the traced batch only. While tracing, the same arithmetic with unflatten (a dynamic Reshape)."""
    try:
        import diffusers.models.transformers.transformer_flux as flux
    except ImportError:  # diffusers without FLUX: nothing to patch
        yield
        return
    original = flux.apply_rotary_emb

    def apply_rotary_emb(x, freqs_cis, use_real=True, use_real_unbind_dim=-1, sequence_dim=2):
        if not use_real or use_real_unbind_dim != -1:
            return original(x, freqs_cis, use_real, use_real_unbind_dim, sequence_dim)
        cos, sin = freqs_cis  # [S, D] each
        index = (None, None, slice(None), slice(None)) if sequence_dim == 2 else (None, slice(None), None, slice(None))
        cos, sin = cos[index].to(x.device), sin[index].to(x.device)
        x_real, x_imag = x.unflatten(-1, (-1, 2)).unbind(-1)  # [B, S, H, D/2] each
        x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
        return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)

    flux.apply_rotary_emb = apply_rotary_emb
    try:
        yield
    finally:
        flux.apply_rotary_emb = original


def _save(model: onnx.ModelProto, path: Path) -> None:
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if size > PROTOBUF_LIMIT:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
