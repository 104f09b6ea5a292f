"""The conditioning contract: a denoiser's conditioning is a set of named inputs (docs/design.md section 3).

Every name is the diffusers forward argument it feeds and the graph input that carries it; the manifest
stores the set (ModelInfo.conditioning), and every runner, the sampling loop, serving and the Triton
repository read it from there. By model class (models/denoiser.py conditioning_of):

    UNet2DModel                 -                                         (unconditional)
    UNet2DConditionModel        encoder_hidden_states [B, S, D]
      SDXL ("text_time")        + text_embeds [B, P], time_ids [B, 6]      (added_cond_kwargs)
    DiTTransformer2DModel       class_labels [B] int64                    (label n: the null class)
    PixArtTransformer2DModel    encoder_hidden_states [B, S, D], encoder_attention_mask [B, S]
    SD3Transformer2DModel       encoder_hidden_states [B, S, D], pooled_projections [B, P]
    FluxTransformer2DModel      encoder_hidden_states [B, S, D], pooled_projections [B, P][, guidance [B]]
                                (img_ids / txt_ids depend only on the shapes: `derived`, built into the graph)

An input's kind says how it is checked, what it defaults to, and what classifier-free guidance's
uncond half holds when nobody supplies one:
    embedding   float, the content (text states, pooled vectors): required; uncond = zeros
    labels      int64 class labels 0..num_classes (num_classes: the null class): required; uncond = null class
    mask        float 0/1 (1: attend): defaults to all ones; uncond = the cond mask
    time_ids    SDXL's micro-conditioning (original H, W, crop top, left, target H, W in pixels): defaults to the
                image size without crop (what StableDiffusionXLPipeline passes); uncond = the same
    guidance    FLUX's embedded guidance scale [B]: required (sampling passes its guidance scale; no CFG pass)
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import Fields, ModiffExportError

KINDS = ("embedding", "labels", "mask", "time_ids", "guidance")
DTYPES = {"float32": torch.float32, "int64": torch.int64}
VAE_SCALE = 8  # pixels per latent pixel of SD/SDXL VAEs: time_ids' default image size


class ConditioningError(ModiffExportError, ValueError):
    """A conditioning input that is missing, not expected, or misshapen (one line, naming it)."""


@dataclass(frozen=True)
class CondInput:
    """One named conditioning input. shape: per sample (after the batch axis); None: any size there (a
    PyTorch model takes any text length S; exported graphs fix every dimension)."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str = "float32"
    kind: str = "embedding"
    num_classes: int | None = None  # kind "labels"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConditioningError(f"conditioning input {self.name!r}: kind {self.kind!r} is not one of {list(KINDS)}")
        if self.dtype not in DTYPES:
            raise ConditioningError(f"conditioning input {self.name!r}: dtype {self.dtype!r} is not one of "
                                    f"{list(DTYPES)}")
        if (self.kind == "labels") != (self.num_classes is not None):
            raise ConditioningError(f"conditioning input {self.name!r}: num_classes goes with kind 'labels' only")

    @property
    def shape_text(self) -> str:
        return "[B" + "".join(f", {'*' if d is None else d}" for d in self.shape) + "]"

    def default(self, b: int, image_hw: tuple[int, int] | None, seq_len: int | None = None) -> torch.Tensor | None:
        """What this input is when the caller gives none (None: required). seq_len: S of the given encoder
        states (a mask of any length attends to all of them)."""
        if self.kind == "mask" and (None not in self.shape or seq_len is not None):
            return torch.ones((b, *[seq_len if d is None else d for d in self.shape]))
        if self.kind == "time_ids" and image_hw is not None:
            h, w = image_hw[0] * VAE_SCALE, image_hw[1] * VAE_SCALE
            return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).expand(b, 6).contiguous()
        return None

    def uncond(self, cond: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance's uncond half when the caller gives none (see the module docstring)."""
        if self.kind == "embedding":
            return torch.zeros_like(cond)
        if self.kind == "labels":
            return torch.full_like(cond, self.num_classes)
        return cond.clone()

    def check(self, x, b: int, who: str, fixed: tuple | None = None) -> torch.Tensor:
        """x as a contiguous tensor of this input's dtype, or ConditioningError (one line). fixed: the graph's
        per-sample shape where it fixes dimensions the model leaves open."""
        want = tuple(fixed if fixed is not None else self.shape)
        ok_type = torch.is_tensor(x) and not x.is_complex() and x.dtype != torch.bool or (
            torch.is_tensor(x) and self.kind == "mask")
        if self.dtype == "int64" and torch.is_tensor(x) and x.is_floating_point():
            ok_type = False
        if not ok_type or x.dim() != 1 + len(want) or x.shape[0] != b or any(
                w is not None and g != w for g, w in zip(x.shape[1:], want)):
            got = f"{getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))}"
            shown = "[B" + "".join(f", {'*' if d is None else d}" for d in want) + "]"
            raise ConditioningError(f"{who}: conditioning input '{self.name}' must be {self.dtype} {shown} (B={b}), "
                                    f"got {got}")
        x = x.to(DTYPES[self.dtype]).contiguous()
        if self.dtype == "float32" and not torch.isfinite(x).all():
            raise ConditioningError(f"{who}: conditioning input '{self.name}' contains NaN or Inf")
        if self.kind == "labels":
            bad = x[(x < 0) | (x > self.num_classes)]
            if bad.numel():
                n = self.num_classes
                raise ConditioningError(f"{who}: class label {int(bad[0])} is outside 0..{n} ({n} "
                                        f"classes; {n}: the null class)")
        if self.kind == "mask" and not ((x == 0) | (x == 1)).all():
            raise ConditioningError(f"{who}: conditioning input '{self.name}' must hold only 0 (padding) and 1 "
                                    f"(attend)")
        return x

    def to_dict(self) -> dict:
        d = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "kind": self.kind}
        if self.num_classes is not None:
            d["num_classes"] = self.num_classes
        return d

    @classmethod
    def parse(cls, f: Fields) -> "CondInput":
        shape = f.get("shape", list)
        if not all(d is None or (isinstance(d, int) and not isinstance(d, bool) and d > 0) for d in shape):
            f.fail("shape", f"must list positive integers (or null: any size), got {shape!r}")
        kind, dtype = f.choice("kind", KINDS), f.choice("dtype", tuple(DTYPES))
        n = f.get("num_classes", int, optional=True)
        if (kind == "labels") != (n is not None):
            f.fail("num_classes", "goes with kind 'labels' (and only there)")
        return cls(f.get("name", str), tuple(shape), dtype, kind, n)


@dataclass(frozen=True)
class Conditioning:
    """The ordered set of a model's conditioning inputs (graph input order after sample, timestep)."""

    inputs: tuple[CondInput, ...] = ()
    derived: tuple[str, ...] = ()  # forward arguments computed from the shapes inside the graph (FLUX ids)

    def __iter__(self):
        return iter(self.inputs)

    def __len__(self) -> int:
        return len(self.inputs)

    def __bool__(self) -> bool:
        return bool(self.inputs)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.inputs)

    def get(self, name: str) -> CondInput | None:
        return next((c for c in self.inputs if c.name == name), None)

    def of_kind(self, kind: str) -> CondInput | None:
        return next((c for c in self.inputs if c.kind == kind), None)

    @property
    def labels(self) -> CondInput | None:
        return self.of_kind("labels")

    @property
    def guided(self) -> bool:
        """Classifier-free guidance is possible: the model has content or labels to drop (an embedded
        `guidance` input instead takes the scale itself)."""
        return any(c.kind in ("embedding", "labels") for c in self.inputs)

    def describe(self) -> str:
        if not self.inputs:
            return "none (unconditional)"
        return ", ".join(f"{c.name} {c.shape_text} {c.dtype}" for c in self.inputs)

    def as_mapping(self, cond, who: str) -> dict:
        """The caller's conditioning as {name: value}: a mapping as given; one tensor is shorthand for the
        model's only required input (class_labels of a DiT, encoder_hidden_states of SD-1.5 or PixArt)."""
        if cond is None:
            return {}
        if isinstance(cond, Mapping):
            return dict(cond)
        required = [c for c in self.inputs if c.kind in ("embedding", "labels")]
        if len(required) != 1:
            names = self.names or ("none: unconditional",)
            raise ConditioningError(f"{who}: a bare tensor is given as conditioning, but this model takes "
                                    f"{len(required) or 'no'} required inputs ({', '.join(names)}); pass a "
                                    f"mapping of name to tensor")
        return {required[0].name: cond}

    def check(self, cond, b: int, who: str, image_hw: tuple[int, int] | None = None,
              fixed: Mapping[str, tuple] | None = None) -> dict[str, torch.Tensor]:
        """The checked feeds {name: tensor} in graph order, defaults filled; one line for a missing, an
        extra or a misshapen input."""
        given = self.as_mapping(cond, who)
        extra = [k for k in given if self.get(k) is None]
        if extra:
            takes = ", ".join(self.names) if self.inputs else "none: unconditional"
            raise ConditioningError(f"{who}: conditioning input '{extra[0]}' is not one this model takes ({takes})")
        feeds = {}
        for c in self.inputs:
            x = given.get(c.name)
            if x is None:
                states = feeds.get("encoder_hidden_states")
                x = c.default(b, image_hw, states.shape[1] if states is not None and states.dim() == 3 else None)
                if x is None:
                    raise ConditioningError(f"{who}: conditioning input '{c.name}' {c.shape_text} {c.dtype} is "
                                            f"required (this model takes {', '.join(self.names)})")
            shape = (fixed or {}).get(c.name)
            states = feeds.get("encoder_hidden_states")
            if c.kind == "mask" and None in c.shape and states is not None and states.dim() == 3:
                shape = (states.shape[1],)  # a mask is as long as the states it masks
            feeds[c.name] = c.check(x, b, who, shape)
        return feeds

    def any_length(self) -> "Conditioning":
        """The same inputs with the text length S left open (a PyTorch model takes any S; graphs fix it)."""
        def loose(c: CondInput) -> CondInput:
            if (c.kind == "embedding" and len(c.shape) == 2) or c.kind == "mask":
                return dataclasses.replace(c, shape=(None, *c.shape[1:]))
            return c
        return Conditioning(tuple(loose(c) for c in self.inputs), self.derived)

    def example(self, b: int, image_hw: tuple[int, int] | None = None, generator=None) -> dict[str, torch.Tensor]:
        """Example feeds at batch b (tracing, MAC counts, calibration without encoders): random content
        (zeros without a generator), label 0, a mask that masks the last token, the default time_ids, guidance
        3.5 (FLUX.1-dev's default)."""
        out = {}
        for c in self.inputs:
            shape = (b, *[d or 1 for d in c.shape])
            if c.kind == "labels":
                out[c.name] = torch.zeros(shape, dtype=torch.int64)
            elif c.kind == "mask":
                out[c.name] = torch.cat([torch.ones(*shape[:-1], shape[-1] - 1), torch.zeros(*shape[:-1], 1)], -1) \
                    if shape[-1] > 1 else torch.ones(shape)
            elif c.kind == "time_ids" and image_hw is not None:
                out[c.name] = c.default(b, image_hw)
            elif c.kind == "guidance":
                out[c.name] = torch.full(shape, 3.5)
            else:
                out[c.name] = torch.randn(shape, generator=generator) if generator is not None else torch.zeros(shape)
        return out

    def with_uncond(self, cond: Mapping[str, torch.Tensor], uncond: Mapping[str, torch.Tensor] | None
                    ) -> dict[str, torch.Tensor]:
        """[2B] feeds for classifier-free guidance, cond first, uncond second: each input's uncond from
        `uncond` where given, else its kind's rule (CondInput.uncond)."""
        uncond = uncond or {}
        out = {}
        for name, x in cond.items():
            spec = self.get(name)
            u = uncond.get(name)
            out[name] = torch.cat([x, u if u is not None else spec.uncond(x) if spec else x.clone()])
        return out

    def to_list(self) -> list[dict]:
        return [c.to_dict() for c in self.inputs]

    @classmethod
    def from_specs(cls, specs, num_classes: int | None) -> "Conditioning":
        """From graph input specs (TensorSpec: name, shape with the batch axis first, dtype) of a manifest
        written before the model section named its conditioning: the kind follows from the name."""
        kinds = {"class_labels": "labels", "encoder_attention_mask": "mask", "time_ids": "time_ids",
                 "guidance": "guidance"}
        return cls(tuple(CondInput(s.name, tuple(s.shape[1:]), s.dtype, kinds.get(s.name, "embedding"),
                                   num_classes if s.name == "class_labels" else None) for s in specs))

    @classmethod
    def parse(cls, f: Fields) -> "Conditioning":
        """From a ModelInfo's fields "conditioning" (a list of inputs) and "derived" (names)."""
        inputs = tuple(CondInput.parse(item) for item in f.items("conditioning"))
        if len({c.name for c in inputs}) != len(inputs):
            f.fail("conditioning", f"repeats input names ({[c.name for c in inputs]})")
        derived = f.get("derived", list, optional=True) or []
        if not all(isinstance(d, str) for d in derived):
            f.fail("derived", f"must list names, got {derived!r}")
        return cls(inputs, tuple(derived))
