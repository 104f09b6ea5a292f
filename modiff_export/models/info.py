"""What a model is, without its weights: identity and shapes (docs/design.md section 3). The manifest
stores it; sampling drives a runner with it when only an exported folder is at hand."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import Fields
from .conditioning import CondInput, Conditioning
from .denoiser import graph_shape

DEFAULT_SCHEDULER_CONFIG = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000}


@dataclass(frozen=True)
class ModelInfo:
    """Identity and shapes of the exported denoiser (UNet or transformer, models/denoiser.py): what
    sampling needs to drive a runner without weights. cross_attention_dim is D of encoder_hidden_states
    (text-conditional models; PixArt: its caption_channels); num_classes: class-conditional models
    (labels 0..num_classes-1, label num_classes is the null class of classifier-free guidance)."""

    name: str
    class_name: str
    content_hash: str
    in_channels: int
    out_channels: int
    sample_size: tuple[int, int]  # (H, W)
    cross_attention_dim: int | None = None
    encoder_seq_len: int | None = None
    scheduler_config: dict = field(default_factory=lambda: dict(DEFAULT_SCHEDULER_CONFIG))
    num_classes: int | None = None
    conditioning: Conditioning | None = None  # None: from the fields above (manifests before named conditioning)
    packed: bool = False  # FLUX: the graphs take packed latents [B, (H/2)(W/2), C*4] (models/denoiser.py)
    model_config: dict | None = None  # the diffusers config it was exported from (what pipelines read of it)

    def __post_init__(self):
        if self.conditioning is None:
            object.__setattr__(self, "conditioning", legacy_conditioning(
                self.cross_attention_dim, self.encoder_seq_len, self.num_classes, self.class_name))

    @property
    def conditional(self) -> bool:
        """Takes encoder_hidden_states (text-conditional)."""
        return self.cross_attention_dim is not None

    @property
    def graph_sample_shape(self) -> tuple[int, ...]:
        """The graphs' per-sample `sample` shape: (C, H, W), or (N, C*4) packed."""
        return graph_shape(self.in_channels, self.sample_size, self.packed)

    @property
    def graph_output_shape(self) -> tuple[int, ...]:
        return graph_shape(self.out_channels, self.sample_size, self.packed)

    @property
    def class_conditional(self) -> bool:
        return self.num_classes is not None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, *self.sample_size)

    @classmethod
    def parse(cls, f: Fields) -> "ModelInfo":
        size = f.get("sample_size", list)
        if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
            f.fail("sample_size", f"must be [H, W] with positive integers, got {size!r}")
        chans = {k: f.get(k, int) for k in ("in_channels", "out_channels")}
        for k, v in chans.items():
            if v < 1:
                f.fail(k, f"must be >= 1, got {v}")
        sched = f.get("scheduler_config", dict, optional=True) or dict(DEFAULT_SCHEDULER_CONFIG)
        T = sched.get("num_train_timesteps", 1000)
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            f.fail("scheduler_config.num_train_timesteps", f"must be a positive integer, got {T!r}")
        n_cls = f.get("num_classes", int, optional=True)
        if n_cls is not None and n_cls < 1:
            f.fail("num_classes", f"must be >= 1 (or null: not class-conditional), got {n_cls}")
        cad = f.get("cross_attention_dim", int, optional=True)
        if n_cls is not None and cad is not None:
            f.fail("num_classes", "a model is class- or text-conditional, not both (cross_attention_dim is set)")
        named = Conditioning.parse(f) if "conditioning" in f.d else None
        packed = bool(f.get("packed", bool, optional=True))
        if packed and any(s % 2 for s in size):
            f.fail("sample_size", f"must be even in both dimensions for packed latents, got {size!r}")
        return cls(f.get("name", str), f.get("class", str), f.get("content_hash", str), chans["in_channels"],
                   chans["out_channels"], tuple(size), cad, f.get("encoder_seq_len", int, optional=True), sched, n_cls,
                   named, packed, f.get("config", dict, optional=True))

    def to_dict(self) -> dict:
        return {"name": self.name, "class": self.class_name, "content_hash": self.content_hash,
                "in_channels": self.in_channels, "out_channels": self.out_channels,
                "sample_size": list(self.sample_size), "cross_attention_dim": self.cross_attention_dim,
                "encoder_seq_len": self.encoder_seq_len, "scheduler_config": self.scheduler_config,
                "num_classes": self.num_classes, "conditioning": self.conditioning.to_list(),
                "derived": list(self.conditioning.derived), "packed": self.packed, "config": self.model_config}


def legacy_conditioning(cross_attention_dim, encoder_seq_len, num_classes, class_name: str = "") -> Conditioning:
    """The named inputs that the one-conditioning-input fields of earlier manifests describe (their graphs
    took encoder_hidden_states [B, S, D] or class_labels [B]; PixArt's mask is added where the graphs have it)."""
    if num_classes is not None:
        return Conditioning((CondInput("class_labels", (), "int64", "labels", num_classes),))
    if cross_attention_dim is not None:
        return Conditioning((CondInput("encoder_hidden_states", (encoder_seq_len or 77, cross_attention_dim)),))
    return Conditioning()
