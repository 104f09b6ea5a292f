"""From a command's options to (model, config, runner): the one resolver `sample`, `evaluate` and `serve` use
(docs/design.md section 4). Every backend computes what the artifact it is given computes:

    torch, no folder        --model quantized with the quantization options (recipe applied), plus a
                            calibration file's weights and static scales when given
    torch, graphs folder    the PyTorch reference of that folder: its model (content hash checked), its
                            manifest's config and static scales, and the weights its graphs hold (GPTQ
                            codes, calibrated clips) read back from prime.onnx
    ort / openvino / trt    the folder's graphs or engines; --model, if given, must be the folder's model
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

from .backends import FOLDER_OPTION, Runner, RunnerError, make_runner
from .config import QuantConfig
from .models import LoadedModel, load_model


@dataclass(frozen=True)
class RunnerOptions:
    """What the options name: a backend, and the model / folder / calibration file it runs."""

    backend: str
    model: str | None = None
    folder: str | None = None         # graphs/<name> (ort, openvino, torch) or engines/<name> (trt)
    calibration: str | None = None    # torch without a folder only
    runner_kwargs: tuple = ()         # extra backend options, e.g. (("threads", 1),)


@dataclass(frozen=True, eq=False)
class Resolved:
    model: LoadedModel      # weights for torch; shapes and scheduler (LoadedModel.from_info) for folders
    config: QuantConfig
    runner: Runner


def resolve_runner(opts: RunnerOptions, config: QuantConfig | None = None,
                   loaded: LoadedModel | None = None) -> Resolved:
    """The runner `opts` name. `config` (torch without a folder: the quantization options, recipe applied
    to the model) is required there and ignored where a folder's manifest decides; `loaded`: opts.model,
    if the caller has loaded it already."""
    if opts.backend == "torch":
        if opts.folder is not None:
            if opts.calibration is not None:
                raise RunnerError("--calibration is for --backend torch without a folder; the folder already "
                                  "carries its calibration")
            return _reference_of_folder(opts)
        loaded = loaded or load_model(opts.model or "digits")
        if config is None:
            raise RunnerError("backend 'torch' needs quantization options or a graph folder")
        unet = copy.deepcopy(loaded.unet)
        from .quant.quantization import quantize

        unet = quantize(unet, config)
        if opts.calibration is None:
            if config.scale_mode == "static":
                raise RunnerError("--scale-mode static needs --calibration (the file with the static scales)")
        else:
            from .calibration.file import load_calibration

            load_calibration(opts.calibration, loaded.content_hash, config).apply(unet)
        return Resolved(loaded, config, make_runner("torch", unet))
    if opts.calibration is not None:
        raise RunnerError(f"--calibration is for --backend torch; the {opts.backend} backend runs a folder that "
                          f"already carries its calibration")
    if opts.folder is None:
        raise RunnerError(f"--backend {opts.backend} needs {FOLDER_OPTION[opts.backend]}")
    runner = make_runner(opts.backend, folder=opts.folder, **dict(opts.runner_kwargs))
    meta = LoadedModel.from_info(runner.manifest.model)
    loaded = _check_same_model(opts, meta) or _embedded_source(meta)
    if loaded is not None and loaded.label_encoder is not None:  # digits_flux: class labels through its encoder
        meta = dataclasses.replace(meta, label_encoder=loaded.label_encoder)
    return Resolved(meta, runner.manifest.quant_config, runner)


def _embedded_source(meta: LoadedModel) -> LoadedModel | None:
    """The embedded model a folder was exported from, when it is one (same name and weights), else None."""
    from .models import EMBEDDED

    if meta.name not in EMBEDDED:
        return None
    loaded = load_model(meta.name)
    return loaded if loaded.content_hash == meta.content_hash else None


def _check_same_model(opts: RunnerOptions, meta: LoadedModel) -> LoadedModel | None:
    """--model, when given, must be the model the folder was exported from; returns it loaded."""
    if opts.model is None:
        return None
    loaded = load_model(opts.model)
    if loaded.content_hash != meta.content_hash:
        raise RunnerError(f"{opts.folder} was exported from model {meta.name} ({meta.content_hash[:19]}...), "
                          f"not {opts.model} ({loaded.content_hash[:19]}...)")
    return loaded


def _reference_of_folder(opts: RunnerOptions) -> Resolved:
    """The quantized PyTorch model that computes what the graphs of `opts.folder` compute."""
    import torch

    from .export.weights import baked_weights
    from .manifest import Manifest
    from .quant.quantization import modiff_layers, quantize, set_static_scales

    manifest = Manifest.load(opts.folder)
    meta = LoadedModel.from_info(manifest.model)
    loaded = _check_same_model(opts, meta) or load_model("digits")
    if loaded.content_hash != meta.content_hash:
        raise RunnerError(f"{opts.folder} was exported from model {meta.name}, not the embedded digits model; pass "
                          f"its --model")
    config = manifest.quant_config
    unet = quantize(copy.deepcopy(loaded.unet), config)
    if manifest.scales is not None:
        set_static_scales(unet, manifest.scales)
    baked = baked_weights(opts.folder, manifest)
    rounding = {li.name: li.weight_rounding for li in manifest.layers}
    for layer in modiff_layers(unet):
        w = baked.get(layer.name)
        if layer.skipped or w is None:
            continue
        if w.codes is not None and layer.block_size is None:
            layer.set_rounded_weight(w.codes.to(torch.float32), w.scale, rounding.get(layer.name))
        elif not torch.equal(layer.quantized_weight(), w.wq):
            raise RunnerError(f"{opts.folder}: layer {layer.name}'s weights in the graphs (calibrated or GPTQ-rounded, "
                              f"folded to float by --target ort) cannot be reproduced on torch; serve the folder "
                              f"exported without --target ort")
    return Resolved(loaded, config, make_runner("torch", unet))
