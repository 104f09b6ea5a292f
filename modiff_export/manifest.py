"""The manifest: the typed, versioned I/O contract written beside the graphs (docs/design.md section 3).

Exporter, engine builder, `check`, graph variants and every runner read names, shapes, dtypes, the
quantization config and the scale table from one `Manifest` object; nothing else parses the JSON.

    manifest.json (schema_version 2)
      model:        ModelInfo   name, class, content_hash, in/out channels, sample_size [H, W],
                                cross_attention_dim / encoder_seq_len (null: unconditional), scheduler_config,
                                conditioning [{name, shape, dtype, kind[, num_classes]}], derived, packed
      quant_config: QuantConfig.to_dict()
      opset, cache_dtype ("float32" | "float16"), batch_axis ("batch")
      graphs:       {"prime": "prime.onnx", "step": "step.onnx" | null, "shallow": "shallow.onnx" | null}
                    (fp/ptq: no caches, no step; shallow exactly with block reuse)
      files:        {file name: "sha256:<hex>"}   every graph (and external-data) file, verified on load
      target:       "trt" (explicit Q/DQ, as exported) | "ort" (rewritten by export/ort_variant.py)
                    | "openvino" (an OpenVINO IR graph, prime.xml + .bin: harness/nncf_peer.py)
      variant:      null | {"method", "rewritten_layers"}   what a target rewrite did
      inputs:       [TensorSpec]   sample [B,C,H,W] (FLUX: packed [B,N,C*4]), timestep [B], then the model's
                                   conditioning inputs in model.conditioning's order (models/conditioning.py)
      outputs:      [TensorSpec]   noise_pred [B,C_out,H,W]
      caches:       [CacheSpec]    prime outputs `output`; step reads `input` and writes `output`
      step_extra_inputs: [TensorSpec]   delta_scales [L] (static scales, several timestep buckets)
      layers:       [LayerInfo]    every Conv/Linear: bits, weight shape, skipped, cached
      scales:       null | ScaleTable   static delta scales per layer and timestep bucket
      reuse:        null | ReuseSpec    block reuse (design section 1.1): interval, depth, the deep-branch
                                        feature cache (prime/step write it, shallow reads it), deep layers
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .config import ConfigError, QuantConfig
from .errors import Fields, ModiffExportError
from .fsutil import atomic_write_text, read_json, sha256_file
from .models.conditioning import Conditioning
from .models.info import DEFAULT_SCHEDULER_CONFIG, ModelInfo  # noqa: F401  (part of the manifest's API)
from .quant.scales import ScaleTable

SCHEMA = "modiff-export/manifest"
SCHEMA_VERSION = 2
BATCH = "batch"
MANIFEST_NAME = "manifest.json"
ROLES = ("prime", "step", "shallow")
DTYPES = ("float32", "float16", "int64", "int32")
CACHE_DTYPES = ("float32", "float16")
TARGETS = ("trt", "ort", "openvino")


class ManifestError(ModiffExportError):
    pass


def _shape(f: Fields) -> tuple:
    shape = f.get("shape", list)
    for d in shape:
        if d != BATCH and (isinstance(d, bool) or not isinstance(d, int) or d < 0):
            f.fail("shape", f"has dimension {d!r}; expected non-negative integers or {BATCH!r}")
    return tuple(shape)


class GraphTensor(NamedTuple):
    """One input or output of a graph or engine as its backend reports it.

    shape: per dimension an int (fixed; TensorRT's -1: dynamic), a symbolic name (ONNX, ONNX Runtime:
    "batch"), or None where the backend does not know it (OpenVINO's inferred output shapes);
    shape None: not even the rank is known."""

    name: str
    dtype: str  # numpy-style: "float32", "float16", "int64", ...
    shape: tuple | None


def _dim_matches(got, want) -> bool:
    """A reported dimension against the manifest's: unknown (None) fits anything; the batch axis must be
    dynamic (the name "batch", or a negative int); a fixed one must be that int."""
    if got is None:
        return True
    if want == BATCH:
        return got == BATCH or (isinstance(got, int) and not isinstance(got, bool) and got < 0)
    return isinstance(got, int) and not isinstance(got, bool) and got == want


def _shape_matches(got, want: tuple) -> bool:
    return got is None or (len(got) == len(want) and all(_dim_matches(g, w) for g, w in zip(got, want)))


# -- the typed pieces ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple  # ints, and BATCH for the symbolic batch axis
    dtype: str

    def concrete(self, batch: int) -> tuple[int, ...]:
        """The shape with the batch axis replaced by `batch`."""
        return tuple(batch if d == BATCH else int(d) for d in self.shape)

    @classmethod
    def parse(cls, f: Fields) -> "TensorSpec":
        return cls(f.get("name", str), _shape(f), f.choice("dtype", DTYPES))

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class CacheSpec:
    """One cache tensor: a_hat (last reconstructed input) or o_hat (last output) of one layer."""

    layer: str
    kind: str  # "a_hat" | "o_hat"
    input: str  # step-graph input name
    output: str  # prime/step-graph output name
    shape: tuple
    dtype: str

    @property
    def key(self) -> str:
        """The name runners and tests use for this cache: '<layer>.<kind>'."""
        return f"{self.layer}.{self.kind}"

    def as_input(self) -> TensorSpec:
        return TensorSpec(self.input, self.shape, self.dtype)

    def as_output(self) -> TensorSpec:
        return TensorSpec(self.output, self.shape, self.dtype)

    def concrete(self, batch: int) -> tuple[int, ...]:
        return self.as_input().concrete(batch)

    @classmethod
    def parse(cls, f: Fields) -> "CacheSpec":
        return cls(f.get("layer", str), f.choice("kind", ("a_hat", "o_hat")), f.get("input", str),
                   f.get("output", str), _shape(f), f.choice("dtype", CACHE_DTYPES))

    @classmethod
    def parse_feature(cls, f: Fields) -> "CacheSpec":
        """The reuse feature cache (kind "feature"; layer: the module whose output it is)."""
        return cls(f.get("layer", str), f.choice("kind", ("feature",)), f.get("input", str), f.get("output", str),
                   _shape(f), f.choice("dtype", CACHE_DTYPES))

    def to_dict(self) -> dict:
        return {"layer": self.layer, "kind": self.kind, "input": self.input, "output": self.output,
                "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class LayerInfo:
    """One Conv2d/Linear of the exported UNet, as quantized (cost accounting and reports)."""

    name: str
    kind: str  # "conv" | "linear"
    weight_shape: tuple[int, ...]
    skipped: bool
    weight_bits: int | None
    act_bits: int | None
    cached: bool
    weight_format: str | None = None
    weight_note: str | None = None
    weight_rounding: str | None = None  # "gptq": codes from a calibration file; None: nearest rounding

    @classmethod
    def parse(cls, f: Fields) -> "LayerInfo":
        shape = f.get("weight_shape", list)
        if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            f.fail("weight_shape", f"must be a list of positive integers, got {str(shape)[:60]!r}")
        bits = {k: f.get(k, int, optional=True) for k in ("weight_bits", "act_bits")}
        for k, v in bits.items():
            if v is not None and not 2 <= v <= 8:
                f.fail(k, f"must be an integer in 2..8 (or null), got {v}")
        return cls(f.get("name", str), f.choice("kind", ("conv", "linear")), tuple(shape),
                   f.get("skipped", bool), bits["weight_bits"], bits["act_bits"], f.get("cached", bool),
                   f.get("weight_format", str, optional=True), f.get("weight_note", str, optional=True),
                   f.choice("weight_rounding", ("gptq",), optional=True))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["weight_shape"] = list(self.weight_shape)
        for key in ("weight_note", "weight_rounding"):
            if d[key] is None:
                del d[key]
        return d


@dataclass(frozen=True)
class ReuseSpec:
    """Block reuse of the exported graphs (docs/design.md section 1.1): on all but every `interval`-th call
    of a trajectory the runner runs the shallow graph, which computes only the outer `depth` block pairs and
    reads the deep branch's output from `feature` (written by the last prime/step); `deep_layers` are the
    layers the shallow graph does not compute (their caches are neither its inputs nor its outputs)."""

    interval: int
    depth: int
    feature: CacheSpec
    deep_layers: tuple[str, ...]

    @classmethod
    def parse(cls, f: Fields) -> "ReuseSpec":
        interval, depth = f.get("interval", int), f.get("depth", int)
        for k, v, low in (("interval", interval, 1), ("depth", depth, 0)):  # depth 0: a transformer's every block
            if v < low:
                f.fail(k, f"must be an integer >= {low}, got {v}")
        deep = f.get("deep_layers", list)
        if not all(isinstance(n, str) for n in deep):
            f.fail("deep_layers", "must be a list of layer names")
        return cls(interval, depth, CacheSpec.parse_feature(f.sub("feature")), tuple(deep))

    def to_dict(self) -> dict:
        return {"interval": self.interval, "depth": self.depth, "feature": self.feature.to_dict(),
                "deep_layers": list(self.deep_layers)}


# -- the manifest ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Manifest:
    model: ModelInfo
    quant_config: QuantConfig
    opset: int
    cache_dtype: str
    graphs: dict  # {"prime": file, "step": file | None}
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    caches: tuple[CacheSpec, ...] = ()
    step_extra_inputs: tuple[TensorSpec, ...] = ()
    layers: tuple[LayerInfo, ...] = ()
    scales: ScaleTable | None = None
    files: dict = field(default_factory=dict)  # {file: "sha256:..."}
    target: str = "trt"
    variant: dict | None = None
    reuse: ReuseSpec | None = None

    def __post_init__(self):
        self.validate("manifest")

    # -- what runners and builders ask -------------------------------------------------------
    @property
    def roles(self) -> list[str]:
        return [r for r in ROLES if self.graphs.get(r)]

    @property
    def uses_cache(self) -> bool:
        return bool(self.caches)

    @property
    def conditioning(self) -> Conditioning:
        """The named conditioning inputs of the graphs (models/conditioning.py), in input order."""
        return self.model.conditioning

    @property
    def conditional(self) -> bool:
        """Takes encoder_hidden_states (text-conditional)."""
        return any(s.name == "encoder_hidden_states" for s in self.inputs)

    @property
    def cond_input(self) -> str | None:
        """The input that carries the conditioning: encoder_hidden_states, class_labels or None."""
        return next((s.name for s in self.inputs if s.name in ("encoder_hidden_states", "class_labels")), None)

    @property
    def mask_input(self) -> str | None:
        """encoder_attention_mask when the graphs take a caption padding mask (PixArt), else None (folders
        exported before the mask existed attend to every caption token)."""
        return next((s.name for s in self.inputs if s.name == "encoder_attention_mask"), None)

    @property
    def keyframe_interval(self) -> int | None:
        return self.quant_config.keyframe_interval

    @property
    def reuse_interval(self) -> int | None:
        return None if self.reuse is None else self.reuse.interval

    @property
    def shallow_caches(self) -> tuple[CacheSpec, ...]:
        """The caches the shallow graph reads and writes: those of the layers outside the deep branch."""
        deep = set(self.reuse.deep_layers) if self.reuse else set()
        return tuple(c for c in self.caches if c.layer not in deep)

    @property
    def buffers(self) -> tuple[CacheSpec, ...]:
        """Every tensor a runner keeps between calls: the caches, then the reuse feature (if any)."""
        return self.caches + ((self.reuse.feature,) if self.reuse else ())

    def cache_io(self, role: str) -> tuple[tuple[CacheSpec, ...], tuple[CacheSpec, ...]]:
        """(the buffers the `role` graph reads, the buffers it writes), in graph order: prime writes every
        cache and the reuse feature; step reads the caches and writes them and the feature; shallow reads
        its caches and the feature and writes its caches (runners bind and swap exactly these)."""
        feature = (self.reuse.feature,) if self.reuse else ()
        if role == "prime":
            return (), self.caches + feature
        if role == "step":
            return self.caches, self.caches + feature
        return self.shallow_caches + feature, self.shallow_caches

    def graph_inputs(self, role: str) -> list[TensorSpec]:
        """Every input of one graph, in graph order."""
        extra = list(self.step_extra_inputs) if role == "step" else []
        return list(self.inputs) + extra + [c.as_input() for c in self.cache_io(role)[0]]

    def graph_outputs(self, role: str) -> list[TensorSpec]:
        return list(self.outputs) + [c.as_output() for c in self.cache_io(role)[1]]

    def graph_io_problems(self, role: str, inputs, outputs, what: str = "graph") -> list[str]:
        """Every difference between the I/O a backend reports for the `role` graph (`inputs`,
        `outputs`: iterables of GraphTensor or (name, dtype, shape)) and this manifest: names, dtypes
        and shapes (the symbolic batch axis included). One phrase per tensor; `what` names the
        artifact ("graph", "engine")."""
        problems = []
        for kind, want, got in (("input", self.graph_inputs(role), inputs),
                                ("output", self.graph_outputs(role), outputs)):
            got = {t[0]: GraphTensor(*t) for t in got}
            names = {s.name for s in want}
            problems += [f"{what} {kind} {name!r} is not in manifest.json" for name in sorted(set(got) - names)]
            for spec in want:
                t = got.get(spec.name)
                if t is None:
                    problems.append(f"manifest.json {kind} {spec.name!r} is missing from the {what}")
                elif t.dtype != spec.dtype or not _shape_matches(t.shape, spec.shape):
                    shape = "unknown" if t.shape is None else list(t.shape)
                    problems.append(f"{kind} {spec.name!r} has dtype {t.dtype} and shape {shape}, "
                                    f"manifest.json says {spec.dtype} {list(spec.shape)}")
        return problems

    def check_graph_io(self, role: str, inputs, outputs, source: str, what: str = "graph",
                       error: type[Exception] = ManifestError, fix: str = "re-export the folder") -> None:
        """graph_io_problems as one line: `error("<source>: <role> <what> I/O does not match
        manifest.json: <first 3 problems> (+N more); <fix>")`. Every backend checks a graph or
        engine with this before allocating buffers from the manifest's shapes."""
        problems = self.graph_io_problems(role, inputs, outputs, what)
        if problems:
            more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
            raise error(f"{source}: {role} {what} I/O does not match manifest.json: "
                        f"{'; '.join(problems[:3])}{more}; {fix}")

    def spec(self, name: str) -> TensorSpec:
        for s in [s for r in ROLES for s in self.graph_inputs(r) + self.graph_outputs(r)]:
            if s.name == name:
                return s
        raise KeyError(name)

    def delta_scale_row(self, timestep: float) -> np.ndarray | None:
        """The `delta_scales` input of one step (static multi-bucket graphs), else None."""
        if not any(s.name == "delta_scales" for s in self.step_extra_inputs):
            return None
        return self.scales.row(timestep)

    @property
    def cache_bytes_per_sample(self) -> int:
        itemsize = {"float32": 4, "float16": 2}
        return sum(math.prod(c.concrete(1)) * itemsize[c.dtype] for c in self.buffers)

    @property
    def tag(self) -> str:
        return self.quant_config.tag

    # -- validation ----------------------------------------------------------------------------
    def validate(self, source: str) -> None:
        def need(cond, what):
            if not cond:
                raise ManifestError(f"{source}: {what}")

        need(self.graphs.get("prime"), "graphs.prime is missing")
        need(set(self.graphs) <= set(ROLES), f"graphs has unknown roles {sorted(set(self.graphs) - set(ROLES))}")
        need(self.cache_dtype in CACHE_DTYPES, f"cache_dtype {self.cache_dtype!r} not in {list(CACHE_DTYPES)}")
        need(self.target in TARGETS, f"target {self.target!r} not in {list(TARGETS)}")
        need(bool(self.caches) == bool(self.graphs.get("step")), "a step graph is listed exactly when there are caches")
        need(bool(self.reuse) == bool(self.graphs.get("shallow")),
             "a shallow graph is listed exactly when the manifest has a reuse section")
        if self.reuse:
            qc, r = self.quant_config, self.reuse
            need((qc.reuse_interval, qc.reuse_depth) == (r.interval, r.depth),
                 f"reuse interval/depth {r.interval}/{r.depth} differ from quant_config's "
                 f"{qc.reuse_interval}/{qc.reuse_depth}")
            unknown = sorted(set(r.deep_layers) - {layer.name for layer in self.layers}) if self.layers else []
            need(not unknown, f"reuse.deep_layers names layers the manifest does not have: {unknown[:3]}")
            need(r.feature.shape[:1] == (BATCH,) and r.feature.dtype == self.cache_dtype,
                 f"reuse feature shape {list(r.feature.shape)} / dtype {r.feature.dtype}: expected the batch axis "
                 f"first and cache_dtype {self.cache_dtype}")
        names = [s.name for s in self.graph_inputs("step") + self.graph_outputs("step")]
        dup = sorted({n for n in names if names.count(n) > 1})
        need(not dup, f"tensor names appear twice: {dup[:3]}")
        need([s.name for s in self.inputs[:2]] == ["sample", "timestep"], "inputs must start with sample, timestep")
        need([s.name for s in self.outputs] == ["noise_pred"], "outputs must be [noise_pred]")
        cond = self.model.conditioning
        want = [(c.name, (BATCH, *c.shape), c.dtype) for c in cond]
        got = [(s.name, tuple(s.shape), s.dtype) for s in self.inputs[2:]]
        need(got == want, f"conditioning inputs {[f'{n} {list(sh)} {dt}' for n, sh, dt in got]} differ from the "
                          f"model's {[f'{n} {list(sh)} {dt}' for n, sh, dt in want]}")
        labels = cond.labels
        need((labels.num_classes if labels else None) == self.model.num_classes,
             f"a class_labels input exactly for class-conditional models (model.num_classes {self.model.num_classes})")
        shape = self.model.graph_sample_shape
        need(self.inputs[0].shape == (BATCH, *shape),
             f"sample shape {list(self.inputs[0].shape)} does not match the model's [batch, "
             f"{', '.join(map(str, shape))}]")
        for c in self.caches:
            need(c.shape[:1] == (BATCH,) and BATCH not in c.shape[1:],
                 f"cache {c.key} shape {list(c.shape)} must have the batch axis first and only there")
            need(c.dtype == self.cache_dtype,
                 f"cache {c.key} dtype {c.dtype} differs from cache_dtype {self.cache_dtype}")
        if any(s.name == "delta_scales" for s in self.step_extra_inputs):
            need(self.scales is not None, "step graph takes delta_scales but there is no scale table")
            shape = self.spec("delta_scales").shape
            need(len(shape) == 1 and shape[0] != BATCH, f"delta_scales must have the shape [L], got {list(shape)}")
            n_q = sum(1 for layer in self.layers if not layer.skipped)
            need(len(self.scales.layers) == self.spec("delta_scales").shape[0] and (not self.layers or
                 len(self.scales.layers) == n_q), "scale table layers do not match the delta_scales input")

    # -- (de)serialization -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d, source: str = "manifest") -> "Manifest":
        f = Fields(d, "", source, ManifestError)
        if d.get("schema") != SCHEMA:
            f.fail("schema", f"is {d.get('schema')!r}, expected {SCHEMA!r}")
        if d.get("schema_version") != SCHEMA_VERSION:
            f.fail("schema_version", f"{d.get('schema_version')!r} is not supported (this tool reads "
                                     f"{SCHEMA_VERSION}); re-export the folder with `cli.py export`")
        graphs = f.sub("graphs")
        graph_files = {r: graphs.get(r, str, optional=(r != "prime")) for r in ROLES}
        for r, name in graph_files.items():  # a plain file name in the folder: never a path elsewhere
            if name is not None and (not name or name != Path(name).name or name in (".", "..")):
                graphs.fail(r, f"must be a file name inside the folder, got {name!r}")
        extra_roles = set(graphs.d) - set(ROLES)
        if extra_roles:
            graphs.fail(sorted(extra_roles)[0], "is not a graph role (prime, step, shallow)")
        try:
            qc = QuantConfig.from_dict(f.get("quant_config", dict))
        except (ConfigError, TypeError) as e:
            raise ManifestError(f"{source}: quant_config: {e}") from None
        scales = f.sub("scales", optional=True)
        files = f.get("files", dict)
        if not all(isinstance(v, str) and v.startswith("sha256:") for v in files.values()):
            f.fail("files", "must map file names to 'sha256:<hex>' digests")
        opset = f.get("opset", int)
        inputs = tuple(TensorSpec.parse(x) for x in f.items("inputs"))
        model = ModelInfo.parse(f.sub("model"))
        if "conditioning" not in d["model"]:  # written before the model section named its conditioning inputs
            model = dataclasses.replace(model, conditioning=Conditioning.from_specs(inputs[2:], model.num_classes))
        try:
            return cls(model=model, quant_config=qc, opset=opset,
                       cache_dtype=f.choice("cache_dtype", CACHE_DTYPES), graphs=graph_files,
                       inputs=inputs,
                       outputs=tuple(TensorSpec.parse(x) for x in f.items("outputs")),
                       caches=tuple(CacheSpec.parse(x) for x in f.items("caches")),
                       step_extra_inputs=tuple(TensorSpec.parse(x) for x in f.items("step_extra_inputs",
                                                                                    optional=True)),
                       layers=tuple(LayerInfo.parse(x) for x in f.items("layers", optional=True)),
                       scales=None if scales is None else ScaleTable.parse(scales), files=dict(files),
                       target=f.choice("target", TARGETS) if "target" in d else "trt",
                       variant=f.get("variant", dict, optional=True),
                       reuse=None if d.get("reuse") is None else ReuseSpec.parse(f.sub("reuse")))
        except ManifestError as e:  # __post_init__ says "manifest: ..."; name the file instead
            raise ManifestError(str(e).replace("manifest:", f"{source}:", 1)) from None

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "model": self.model.to_dict(),
                "quant_config": self.quant_config.to_dict(), "opset": self.opset, "cache_dtype": self.cache_dtype,
                "batch_axis": BATCH, "graphs": dict(self.graphs), "files": dict(self.files), "target": self.target,
                "variant": self.variant, "inputs": [s.to_dict() for s in self.inputs],
                "outputs": [s.to_dict() for s in self.outputs], "caches": [c.to_dict() for c in self.caches],
                "step_extra_inputs": [s.to_dict() for s in self.step_extra_inputs],
                "layers": [x.to_dict() for x in self.layers],
                "scales": None if self.scales is None else self.scales.to_dict(),
                "reuse": None if self.reuse is None else self.reuse.to_dict()}

    def replace(self, **changes) -> "Manifest":
        from dataclasses import replace

        return replace(self, **changes)

    # -- files ---------------------------------------------------------------------------------
    def graph_files(self, folder: str | os.PathLike) -> list[str]:
        """Every file the graphs consist of (graph files and their external-data files)."""
        folder = Path(folder)
        names = []
        for r in self.roles:
            names.append(self.graphs[r])
            if (folder / f"{self.graphs[r]}.data").is_file():
                names.append(f"{self.graphs[r]}.data")
            if self.graphs[r].endswith(".xml"):  # OpenVINO IR: the weights file beside it
                names.append(self.graphs[r][:-4] + ".bin")
        return names

    def with_digests(self, folder: str | os.PathLike) -> "Manifest":
        """This manifest with the sha256 of every graph file in `folder` recorded."""
        return self.replace(files={n: sha256_file(Path(folder) / n) for n in self.graph_files(folder)})

    def verify_files(self, folder: str | os.PathLike, source: str | None = None) -> None:
        """Every graph file exists and has the digest recorded at export: a graph from another model
        or config (or a damaged copy) is one error naming both sides."""
        folder = Path(folder)
        source = source or str(folder / MANIFEST_NAME)
        for r in self.roles:
            if not (folder / self.graphs[r]).is_file():
                raise ManifestError(f"{source}: the {r} graph {folder / self.graphs[r]} is missing")
        for name in self.graph_files(folder):
            want = self.files.get(name)
            if want is None:
                raise ManifestError(f"{source}: {name} has no recorded digest; re-export the folder")
            got = sha256_file(folder / name)
            if got != want:
                raise ManifestError(f"{folder / name} does not belong to this manifest: its digest is {got[:19]}..., "
                                    f"{source} records {want[:19]}... for {self.tag} of model {self.model.name} "
                                    f"({self.model.content_hash[:19]}...); re-export the folder")

    def write(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / MANIFEST_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike, verify: bool = True, what: str = "`cli.py export`",
             onnx: bool = True) -> "Manifest":
        """Read and validate `<folder>/manifest.json` (one-line error for every problem); with
        `verify`, check every graph file's digest too. `onnx`: the caller reads the exported ONNX graphs, so an
        OpenVINO IR folder (target "openvino", the NNCF peer's form) is refused in one line; only the OpenVINO
        runner and the speed harness pass onnx=False."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ManifestError(f"{folder}: not a folder (expected a folder written by {what})")
        path = folder / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(f"{path}: missing; {folder} was not written by {what}")
        manifest = cls.from_dict(read_json(path, ManifestError), source=str(path))
        if onnx and manifest.target == "openvino":
            method = (manifest.variant or {}).get("method", "an OpenVINO IR")
            raise ManifestError(f"{folder}: an OpenVINO IR folder ({manifest.graphs['prime']}, {method}), not ONNX "
                                f"graphs; this needs a folder written by {what} (only the OpenVINO backend runs IR)")
        if verify:
            manifest.verify_files(folder, str(path))
        return manifest
