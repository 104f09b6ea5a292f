"""Loading denoisers (diffusers UNets and diffusion transformers, models/denoiser.py): the embedded
models or a local diffusers folder (no downloads).

    spec = "digits"             -> modiff_export/assets/digits (trained by `cli.py train-demo`)
    spec = "digits_b"           -> modiff_export/assets/digits_b (second validation model, docs/quality.md)
    spec = "digits_dit"         -> modiff_export/assets/digits_dit (class-conditional DiT on digits)
    spec = "digits_dit_b"       -> modiff_export/assets/digits_dit_b (second DiT: deeper, narrower, linear betas)
    spec = "digits_flux"        -> modiff_export/assets/digits_flux (FLUX architecture, flow matching, with a
                                   label encoder: label_encoder.safetensors, models/label_encoder.py)
    spec = "digits_sd3"         -> modiff_export/assets/digits_sd3 (SD3 architecture, flow matching, a label encoder)
    spec = <model folder>       -> config.json + diffusion_pytorch_model.safetensors [+ scheduler_config.json]
                                   (UNet2DModel, UNet2DConditionModel incl. SDXL, DiTTransformer2DModel,
                                   PixArtTransformer2DModel, SD3Transformer2DModel, FluxTransformer2DModel)
    spec = <pipeline folder>    -> unet/ or transformer/ (as above) + scheduler/scheduler_config.json
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModiffExportError
from . import denoiser
from .conditioning import Conditioning, ConditioningError
from .info import DEFAULT_SCHEDULER_CONFIG, ModelInfo, legacy_conditioning

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "digits"  # the shipped digits model (the only definition)
EMBEDDED = {"digits": ASSETS, "digits_b": ASSETS.parent / "digits_b",  # names --model accepts besides folders
            "digits_dit": ASSETS.parent / "digits_dit", "digits_dit_b": ASSETS.parent / "digits_dit_b",
            "digits_flux": ASSETS.parent / "digits_flux", "digits_sd3": ASSETS.parent / "digits_sd3"}
UNET_CLASSES = denoiser.SUPPORTED  # every class --model loads (the name is older than the transformers)
WEIGHTS = "diffusion_pytorch_model.safetensors"
DEFAULT_SEQ_LEN = 77  # CLIP text length; conditional UNets get random encoder states of [B, 77, D]
PIXART_SEQ_LEN = 120  # PixArt-alpha's T5 caption length: PixArt models get [B, 120, caption_channels]
EXPECTED = (f"a diffusers model folder ({'/'.join(UNET_CLASSES)}: config.json + {WEIGHTS}) "
            f"or a pipeline folder with unet/ or transformer/")


class ModelError(ModiffExportError):
    """A model spec that does not name a loadable diffusers UNet."""


@dataclass
class LoadedModel:
    """A denoiser with what the pipeline needs to know about it (unet is None when only the metadata of
    an exported model is known, e.g. read from a manifest). `unet` is the denoiser of any supported class
    (called through models/denoiser.py); num_classes: class-conditional models (models/info.py)."""

    unet: torch.nn.Module | None    # eval mode, float32
    name: str
    scheduler_config: dict
    content_hash: str               # "sha256:<hex>"
    conditional: bool
    sample_shape: tuple[int, int, int]  # (C, H, W)
    cross_attention_dim: int | None
    encoder_seq_len: int | None
    out_channels: int | None = None
    num_classes: int | None = None
    conditioning: Conditioning | None = None  # None: from the fields above (models/info.legacy_conditioning)
    packed: bool = False                      # FLUX: the graphs take packed latents (models/denoiser.py)
    label_encoder: torch.nn.Module | None = None  # digits_flux: labels -> its text-like conditioning
    model_config: dict | None = None  # the diffusers config (from_info: as the manifest recorded it)

    def __post_init__(self):
        if self.conditioning is None:
            self.conditioning = legacy_conditioning(self.cross_attention_dim, self.encoder_seq_len, self.num_classes)

    @property
    def class_conditional(self) -> bool:
        return self.num_classes is not None

    @property
    def graph_sample_shape(self) -> tuple[int, ...]:
        """What the runner's `sample` is per sample: (C, H, W), or packed (N, C*4)."""
        return denoiser.graph_shape(self.sample_shape[0], self.sample_shape[1:], self.packed)

    @classmethod
    def from_unet(cls, unet: torch.nn.Module, name: str, scheduler_config: dict | None = None,
                  seq_len: int | None = None, label_encoder=None) -> "LoadedModel":
        """Describe an in-memory diffusers denoiser (shapes from its config, identity from its weights)."""
        h, w = denoiser.sample_hw(unet)
        try:
            cond = denoiser.conditioning_of(unet, seq_len)
        except ConditioningError as e:
            raise ModelError(f"{name}: {e}") from None
        ehs, labels = cond.get(denoiser.ENCODER_STATES), cond.labels
        packed = denoiser.packed(unet)
        out = denoiser.eps_channels(unet)
        return cls(unet=unet, name=name, scheduler_config=dict(scheduler_config or DEFAULT_SCHEDULER_CONFIG),
                   content_hash=content_hash(unet), conditional=ehs is not None,
                   sample_shape=(denoiser.latent_channels(unet), h, w),
                   cross_attention_dim=ehs.shape[1] if ehs else None, encoder_seq_len=ehs.shape[0] if ehs else None,
                   out_channels=out // 4 if packed else out, num_classes=labels.num_classes if labels else None,
                   conditioning=cond, packed=packed, label_encoder=label_encoder)

    @classmethod
    def from_info(cls, info: ModelInfo) -> "LoadedModel":
        """Shapes, scheduler and identity of an exported model (no weights): what sampling needs to
        drive an ONNX Runtime / OpenVINO / TensorRT runner."""
        return cls(unet=None, name=info.name, scheduler_config=dict(info.scheduler_config),
                   content_hash=info.content_hash, conditional=info.conditional, sample_shape=info.sample_shape,
                   cross_attention_dim=info.cross_attention_dim, encoder_seq_len=info.encoder_seq_len,
                   out_channels=info.out_channels, num_classes=info.num_classes, conditioning=info.conditioning,
                   packed=info.packed, model_config=info.model_config)

    @property
    def info(self) -> ModelInfo:
        """The manifest's description of this model."""
        C, H, W = self.sample_shape
        return ModelInfo(self.name, type(self.unet).__name__ if self.unet is not None else "UNet", self.content_hash,
                         C, self.out_channels or C, (H, W), self.cross_attention_dim, self.encoder_seq_len,
                         dict(self.scheduler_config), self.num_classes, self.conditioning, self.packed,
                         json_config(self.unet) if self.unet is not None else self.model_config)

    def copy(self) -> "LoadedModel":
        """The same model with its own copy of the weights (export and quantize consume the UNet)."""
        return dataclasses.replace(self, unet=copy.deepcopy(self.unet))


def json_config(model) -> dict | None:
    """A diffusers model's config as plain JSON values (tuples as lists), None when it has none."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    cfg = {k: v for k, v in dict(cfg).items() if k not in ("_name_or_path", "_use_default_values")}  # no local paths
    return json.loads(json.dumps(cfg, default=lambda v: list(v) if isinstance(v, (tuple, set)) else str(v)))


def content_hash(unet: torch.nn.Module) -> str:
    """sha256 over the sorted state dict: name, dtype, shape and raw bytes of every tensor."""
    h = hashlib.sha256()
    for name, t in sorted(unet.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"sha256:{h.hexdigest()}"


def _read_json(path: Path, what: str) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: unreadable {what} ({type(e).__name__}); expected {EXPECTED}") from None
    if not isinstance(d, dict):
        raise ModelError(f"{path}: {what} is not a JSON object; expected {EXPECTED}")
    return d


class _DropSampleSizeNote(logging.Filter):
    def filter(self, record) -> bool:
        return "{'sample_size'" not in record.getMessage()


@contextlib.contextmanager
def _quiet_sample_size():
    """A FLUX config names its latent size as `sample_size` (models/denoiser.sample_hw), a key diffusers keeps in
    model.config but warns about on every load; that one note is dropped, every other warning stays."""
    log = logging.getLogger("diffusers.configuration_utils")
    note = _DropSampleSizeNote()
    log.addFilter(note)
    try:
        yield
    finally:
        log.removeFilter(note)


def load_model(spec: str) -> LoadedModel:
    """Load an embedded model or a local diffusers folder; any problem raises ModelError naming the path."""
    import diffusers

    folder = EMBEDDED.get(spec, Path(spec))
    name = spec if spec in EMBEDDED else folder.resolve().name
    if not folder.is_dir():
        raise ModelError(f"{folder}: not a folder; expected one of {sorted(EMBEDDED)} or {EXPECTED}")
    unet_dir, sched_path = folder, folder / "scheduler_config.json"
    for sub in ("unet", "transformer"):  # pipeline layout
        if (folder / sub).is_dir():
            unet_dir, sched_path = folder / sub, folder / "scheduler" / "scheduler_config.json"
            break
    config_path = unet_dir / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{config_path}: missing; expected {EXPECTED}")
    cls_name = _read_json(config_path, "config").get("_class_name")
    if cls_name not in UNET_CLASSES:
        raise ModelError(f"{config_path}: _class_name is {cls_name!r}; expected one of {list(UNET_CLASSES)}")
    if not (unet_dir / WEIGHTS).is_file():
        raise ModelError(f"{unet_dir / WEIGHTS}: missing; expected {EXPECTED}")
    cls = getattr(diffusers, cls_name)
    try:
        with _quiet_sample_size():
            unet = cls.from_pretrained(str(unet_dir), local_files_only=True, use_safetensors=True,
                                       low_cpu_mem_usage=False)
    except Exception as e:  # truncated/corrupt weights, shape mismatches, bad config values
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ModelError(f"{unet_dir / WEIGHTS}: cannot load {cls_name} ({msg})") from None
    unet = unet.float().eval().requires_grad_(False)
    bad = [n for n, t in unet.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:  # every output would be NaN: refuse here instead of sampling garbage
        raise ModelError(f"{unet_dir / WEIGHTS}: {len(bad)} weight tensor(s) contain NaN or Inf (first: {bad[0]})")
    sched = _read_json(sched_path, "scheduler config") if sched_path.is_file() else dict(DEFAULT_SCHEDULER_CONFIG)
    T = sched.get("num_train_timesteps", 1000)
    if isinstance(T, bool) or not isinstance(T, int) or not 1 <= T <= 100_000:
        raise ModelError(f"{sched_path}: num_train_timesteps is {T!r}; expected an integer in 1..100000")
    from .label_encoder import load_label_encoder

    try:
        encoder = load_label_encoder(unet_dir)
    except Exception as e:  # truncated file, missing keys
        raise ModelError(f"{unet_dir}: cannot load its label encoder ({type(e).__name__}: {str(e)[:150]})") from None
    return LoadedModel.from_unet(unet, name, sched, seq_len=encoder.seq_len if encoder else None,
                                 label_encoder=encoder)


