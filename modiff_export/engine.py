"""TensorRT engine builds for exported graph folders (docs/design.md sections 3-4).

Everything up to the TensorRT call is plain Python and runs (and is tested) on a CPU machine:
options, optimization profiles taken from the manifest's symbolic batch axis, builder settings,
and the check of a built engine's I/O against the manifest. `build_engines` imports TensorRT and
Polygraphy lazily and raises `TensorRTUnavailable` (one line) where they are not installed.

    engines/<name>/  prime.plan, step.plan (when the graphs have caches), timing.cache,
                     build.log (text), build.json (settings, profiles, versions), manifest.json
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ModiffExportError
from .fsutil import atomic_folder, check_writable, sha256_file
from .manifest import BATCH, GraphTensor, Manifest, TensorSpec

PRECISIONS = ("int8", "int4", "fp16")
INSTALL_HINT = 'TensorRT is not installed; on a machine with an NVIDIA GPU run: pip install -e ".[tensorrt]"'


class EngineError(ModiffExportError):
    """Bad build options, a graph that cannot become the requested engine, or an engine/manifest mismatch."""


class TensorRTUnavailable(ModiffExportError):
    """TensorRT / Polygraphy cannot be imported on this machine."""


@dataclass(frozen=True)
class EngineBuildOptions:
    """What to build. Batch sizes are UNet batches: with classifier-free guidance the UNet sees
    cond + uncond, i.e. twice the number of images, and the profile must cover that."""

    precision: str = "int8"
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8
    workspace_gb: float | None = None  # None: TensorRT's default (the device's memory)
    timing_cache: str | None = None    # shared cache file: read before, updated after a successful build
    cuda_graph: bool = False           # recorded in build.json; TrtRunner reads it as its default
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise EngineError(f"precision {self.precision!r} is not supported; expected one of {list(PRECISIONS)}")
        for name in ("min_batch", "opt_batch", "max_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise EngineError(f"{name}={v!r}; expected an integer >= 1")
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise EngineError(f"batch sizes must satisfy min <= opt <= max, got min={self.min_batch}, "
                              f"opt={self.opt_batch}, max={self.max_batch}")
        w = self.workspace_gb
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or w <= 0):
            raise EngineError(f"workspace_gb={w!r}; expected a positive number of GiB (or None)")
        for name in ("cuda_graph", "overwrite"):
            if not isinstance(getattr(self, name), bool):
                raise EngineError(f"{name}={getattr(self, name)!r}; expected True or False")

    @property
    def workspace_bytes(self) -> int | None:
        return None if self.workspace_gb is None else int(self.workspace_gb * 1024**3)


BUILD_NAME = "build.json"


@dataclass(frozen=True)
class BuildInfo:
    """build.json beside the engines: how they were built, and each plan's digest (checked on load)."""

    tensorrt: str
    options: dict
    settings: dict
    profiles: dict
    plans: dict  # {role: file}
    digests: dict  # {role: "sha256:..."}

    def write(self, folder: Path) -> None:
        (Path(folder) / BUILD_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "BuildInfo":
        path = Path(folder) / BUILD_NAME
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise EngineError(f"{path}: missing; {folder} was not written by `cli.py build-engine`") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EngineError(f"{path}: unreadable or damaged ({type(e).__name__}); rebuild the engines") from None
        fields = ("tensorrt", "options", "settings", "profiles", "plans", "digests")
        if not isinstance(d, dict) or any(k not in d for k in fields):
            raise EngineError(f"{path}: needs the fields {list(fields)}; rebuild the engines")
        for key in ("min_batch", "max_batch"):
            v = d["options"].get(key) if isinstance(d["options"], dict) else None
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise EngineError(f"{path}: options.{key} is {v!r}; expected a positive integer")
        return cls(**{k: d[k] for k in fields})

    def verify(self, folder: str | Path, roles: list[str]) -> dict[str, Path]:
        """{role: plan path}, each checked to exist and to have the digest recorded at build time."""
        folder, plans = Path(folder), {}
        for role in roles:
            plan = folder / self.plans.get(role, f"{role}.plan")
            if not plan.is_file() or plan.stat().st_size == 0:
                raise EngineError(f"{plan}: the {role} engine is missing or empty; rebuild with `cli.py build-engine`")
            got, want = sha256_file(plan), self.digests.get(role)
            if got != want:
                raise EngineError(f"{plan} does not belong to this build: its digest is {got[:19]}..., "
                                  f"{folder / BUILD_NAME} records {str(want)[:19]}...; rebuild the engines")
            plans[role] = plan
        return plans


# -- pure planning (CPU) ----------------------------------------------------------------------------
def _shape_at(spec: TensorSpec, batch: int) -> tuple[int, ...]:
    if BATCH in spec.shape[1:]:
        raise EngineError(f"manifest tensor {spec.name!r} has the batch axis at a position other than 0 "
                          f"(an optimization profile needs every other dimension fixed)")
    return spec.concrete(batch)


def plan_profiles(manifest: Manifest, options: EngineBuildOptions) -> dict[str, list[tuple]]:
    """{role: [(input name, min shape, opt shape, max shape), ...]} for every input of every graph
    (caches and step_extra_inputs included; inputs without a batch axis get one fixed shape)."""
    return {role: [(s.name, _shape_at(s, options.min_batch), _shape_at(s, options.opt_batch),
                    _shape_at(s, options.max_batch)) for s in manifest.graph_inputs(role)]
            for role in manifest.roles}


def builder_settings(manifest: Manifest, options: EngineBuildOptions,
                     block_quantized_weights: int | None = None) -> dict:
    """How TensorRT must be configured for these graphs, with the reason in words.

    Explicitly quantized graphs (quant_config.mode != "fp") are built strongly typed: the Q/DQ
    nodes and tensor types in the graph decide every precision, and precision flags (fp16/int8)
    must not be set. block_quantized_weights: INT4 DequantizeLinear nodes with block_size found in
    the graphs (None: not scanned).
    """
    qc = manifest.quant_config
    mode, wbits, tag = qc.mode, qc.weight_bits, qc.tag
    p = options.precision
    s = {"precision": p, "strongly_typed": mode != "fp", "fp16": False, "int8": False,
         "workspace_bytes": options.workspace_bytes, "warnings": []}
    if mode == "fp":
        if p != "fp16":
            raise EngineError(f"--precision {p} needs explicitly quantized graphs, but these were exported with "
                              f"quant_config.mode='fp' (no Q/DQ nodes); export with a quantized config or use fp16")
        s["fp16"] = True
        s["explain"] = ("fp graph, weakly typed with the FP16 builder flag: TensorRT may run layers in FP16 "
                        "(FP32 fallback); caches and I/O keep the manifest's dtypes")
        return s
    if p == "fp16":
        raise EngineError(f"--precision fp16 is for unquantized graphs; these graphs are explicitly quantized "
                          f"({tag}), so their precisions are fixed by the Q/DQ nodes: use --precision int8"
                          f"{' or int4' if wbits is not None and wbits <= 4 else ''}")
    if p == "int8":
        s["explain"] = (f"{tag}: strongly typed, explicit quantization; INT8 Q/DQ pairs around Conv/Gemm are "
                        f"fused into INT8 kernels where TensorRT has one; activations below 8 bits are clipped "
                        f"to their range before the INT8 QuantizeLinear, so they stay exact in INT8 containers")
        if wbits is not None and wbits < 8:
            s["explain"] += f"; {wbits}-bit weights are stored in INT8 containers"
        return s
    # int4
    if wbits is None or wbits > 4:
        raise EngineError(f"--precision int4 needs weights of 4 bits or fewer, but the graphs are {tag}; "
                          f"use --precision int8")
    if manifest.opset < 21:
        raise EngineError(f"--precision int4 needs INT4 block-quantized weights (DequantizeLinear with block_size, "
                          f"ONNX opset >= 21), but the graphs use opset {manifest.opset}; their 4-bit weights "
                          f"live in INT8 containers: use --precision int8")
    if block_quantized_weights == 0:
        raise EngineError("--precision int4: the graphs contain no INT4 block-quantized weights (DequantizeLinear "
                          "with block_size on an INT4 initializer); TensorRT runs INT4 only as weight-only "
                          "block-quantized MatMul/Gemm, so there is nothing to run in INT4: use --precision int8")
    if block_quantized_weights is None:
        s["warnings"].append("graphs were not scanned for INT4 block-quantized weights")
    s["explain"] = (f"{tag}: strongly typed; INT4 weight-only block quantization for MatMul/Gemm weights "
                    f"({block_quantized_weights if block_quantized_weights is not None else 'unknown'} found), "
                    f"dequantized in the GEMM; convolution weights stay INT8 (4-bit values in INT8 containers) "
                    f"and run as INT8")
    return s


def count_block_quantized_weights(onnx_path: str | Path) -> int:
    """DequantizeLinear nodes with a block_size attribute reading an INT4 initializer."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    int4 = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT4}
    return sum(1 for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input and n.input[0] in int4
               and any(a.name == "block_size" and a.i > 0 for a in n.attribute))


def check_engine_io(engine_io: dict, manifest: Manifest, role: str, source: str | Path | None = None) -> None:
    """engine_io: {name: {"mode": "input"|"output", "dtype": "float32", "shape": [-1, 4, 8, 8]}}
    (-1 where the dimension is dynamic), as `engine_io` reads it from an engine. Raises EngineError
    (Manifest.check_graph_io's one line) naming the first mismatches."""
    tensors = {mode: [GraphTensor(name, t.get("dtype"), tuple(t.get("shape", ()))) for name, t in engine_io.items()
                      if t.get("mode") == mode] for mode in ("input", "output")}
    manifest.check_graph_io(role, tensors["input"], tensors["output"], str(source or f"{role} engine"),
                            what="engine", error=EngineError, fix="rebuild the engines with `cli.py build-engine`")


# -- TensorRT (lazy) ---------------------------------------------------------------------------------
def import_tensorrt():
    """(tensorrt, polygraphy.backend.trt) or TensorRTUnavailable with one line."""
    try:
        import tensorrt as trt
        from polygraphy.backend import trt as pg_trt
    except ImportError as e:
        raise TensorRTUnavailable(f"{INSTALL_HINT} ({e.msg})") from None
    return trt, pg_trt


def engine_io(engine, trt) -> dict:
    """The I/O table of a deserialized ICudaEngine, in check_engine_io's form."""
    import numpy as np

    out = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        out[name] = {"mode": mode, "dtype": str(np.dtype(trt.nptype(engine.get_tensor_dtype(name)))),
                     "shape": [int(d) for d in engine.get_tensor_shape(name)]}
    return out


def build_engines(graph_folder: str | Path, options: EngineBuildOptions, out_folder: str | Path,
                  progress: bool = True) -> Path:
    """Build one TensorRT engine per graph of `graph_folder` into `out_folder` (atomically):
    <role>.plan, each checked against the manifest (check_engine_io), then build.json, manifest.json
    and build.log. Everything before the TensorRT import is checked first (options, profiles,
    settings, a writable output)."""
    graph_folder, out = Path(graph_folder), Path(out_folder)
    manifest = Manifest.load(graph_folder)
    profiles = plan_profiles(manifest, options)
    blocks = None
    if options.precision == "int4" and manifest.quant_config.mode != "fp":
        blocks = sum(count_block_quantized_weights(graph_folder / manifest.graphs[r]) for r in profiles)
    settings = builder_settings(manifest, options, blocks)
    check_writable(out, options.overwrite)
    trt, pg = import_tensorrt()
    if settings["fp16"] and not hasattr(trt.BuilderFlag, "FP16"):
        raise EngineError(f"TensorRT {trt.__version__} has no FP16 builder flag (always strongly typed); "
                          f"export the graph in float16 instead of asking for --precision fp16")

    log = [f"modiff-export build-engine {time.strftime('%Y-%m-%d %H:%M:%S')}",
           f"graphs: {graph_folder.resolve()}", f"tensorrt {trt.__version__}",
           f"options: {asdict(options)}", f"settings: {settings['explain']}"]
    log += [f"warning: {w}" for w in settings["warnings"]]
    with atomic_folder(out, options.overwrite) as tmp:  # no half-written engine folder, whatever fails
        cache = tmp / "timing.cache"
        if options.timing_cache and Path(options.timing_cache).is_file():
            shutil.copyfile(options.timing_cache, cache)
        for role in profiles:
            start = time.time()
            if progress:
                print(f"building {role} engine ({options.precision}, batch {options.min_batch}..{options.max_batch})",
                      flush=True)
            plan = _build_plan(trt, pg, graph_folder / manifest.graphs[role], role, profiles[role], settings,
                               options, cache)
            (tmp / f"{role}.plan").write_bytes(plan)
            io = engine_io(pg.EngineFromBytes(plan)(), trt)
            check_engine_io(io, manifest, role, out / f"{role}.plan")
            log.append(f"{role}: {len(plan) / 2**20:.1f} MiB in {time.time() - start:.1f} s; "
                       f"profile {[(n, lo, opt, hi) for n, lo, opt, hi in profiles[role]]}; io {io}")
        _write_build_record(tmp, trt.__version__, options, settings, profiles, manifest, log)
        if options.timing_cache and cache.is_file():
            Path(options.timing_cache).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cache, f"{options.timing_cache}.tmp")
            Path(f"{options.timing_cache}.tmp").replace(options.timing_cache)
    return out


def _build_plan(trt, pg, graph: Path, role: str, profile: list[tuple], settings: dict, options: EngineBuildOptions,
                cache: Path) -> bytes:
    """One serialized engine from one ONNX graph through Polygraphy: an optimization profile of
    (input, min, opt, max shape), the builder settings, the shared timing cache (read and updated)."""
    pg_profile = pg.Profile()
    for name, lo, opt, hi in profile:
        pg_profile.add(name, min=lo, opt=opt, max=hi)
    cfg = {"profiles": [pg_profile]}
    if settings["fp16"]:
        cfg["fp16"] = True
    if cache.is_file():
        cfg["load_timing_cache"] = str(cache)
    if options.workspace_bytes:
        cfg["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: options.workspace_bytes}
    network = pg.NetworkFromOnnxPath(str(graph), strongly_typed=settings["strongly_typed"])
    try:
        return bytes(pg.EngineBytesFromNetwork(network, config=pg.CreateConfig(**cfg), save_timing_cache=str(cache))())
    except Exception as e:  # Polygraphy reports parser/builder failures as PolygraphyException
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EngineError(f"TensorRT could not build the {role} engine from {graph}: {first}") from e


def _write_build_record(tmp: Path, version: str, options: EngineBuildOptions, settings: dict, profiles: dict,
                        manifest: Manifest, log: list[str]) -> None:
    """build.json (options, settings, profiles, each plan's digest), manifest.json and build.log."""
    info = BuildInfo(tensorrt=version, options=asdict(options), settings=settings,
                     profiles={r: [[n, list(a), list(b), list(c)] for n, a, b, c in v] for r, v in profiles.items()},
                     plans={r: f"{r}.plan" for r in profiles},
                     digests={r: sha256_file(tmp / f"{r}.plan") for r in profiles})
    info.write(tmp)
    manifest.write(tmp)
    (tmp / "build.log").write_text("\n".join(log) + "\n")


__all__ = ["BuildInfo", "EngineBuildOptions", "EngineError", "TensorRTUnavailable", "plan_profiles",
           "builder_settings", "check_engine_io", "count_block_quantized_weights", "build_engines", "import_tensorrt",
           "engine_io"]
