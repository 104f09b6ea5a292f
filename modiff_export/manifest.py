"""The manifest: the versioned I/O contract written beside the graphs (design.md section 2).

Runtimes, engine builds and Triton configs read every name, shape and dtype from here.

    {
      "schema": "modiff-export/manifest", "schema_version": 1,
      "model":  {"name", "class", "content_hash", "in_channels", "out_channels", "sample_size",
                 "cross_attention_dim" (null for unconditional), "encoder_seq_len" (null)},
      "quant_config": QuantConfig.to_dict(),
      "opset": 17, "cache_dtype": "float32" | "float16",
      "graphs": {"prime": "prime.onnx", "step": "step.onnx" | null (fp/ptq: no caches)},
      "inputs":  [TensorSpec ...]   # sample, timestep[, encoder_hidden_states] (both graphs)
      "outputs": [TensorSpec ...]   # noise_pred
      "caches":  [CacheSpec ...]    # prime outputs them; step takes `input` and returns `output`
      "step_extra_inputs": [TensorSpec ...]  # e.g. delta_scales [L] for static multi-bucket
      "scales": null | {"source": path, "n_buckets", "num_train_timesteps",
                        "layers": [layer ...], "table": {layer: [scale per bucket]}},
      "batch_axis": "batch"
    }
    TensorSpec = {"name", "shape": ["batch" | int ...], "dtype": "float32" | ...}
    CacheSpec  = TensorSpec without name + {"layer", "kind": "a_hat" | "o_hat", "input", "output"}
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ModiffExportError

SCHEMA = "modiff-export/manifest"
SCHEMA_VERSION = 1
BATCH = "batch"
MANIFEST_NAME = "manifest.json"


class ManifestError(ModiffExportError):
    pass


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write to a temporary file in the same folder, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artifacts are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike):
    """Yield a temporary sibling of `out` to fill; on success it replaces `out` in one rename, on any
    error (or Ctrl-C) it is removed, so `out` is never half-written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # same filesystem: rename is atomic
    try:
        yield tmp
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(folder: str | os.PathLike, manifest: dict) -> Path:
    validate(manifest, source=str(folder))
    path = Path(folder) / MANIFEST_NAME
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
    return path


def load_manifest(folder: str | os.PathLike) -> dict:
    """Read and validate `<folder>/manifest.json`, with a one-line error for every problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"{folder}: not a folder (expected a graph folder written by `cli.py export`)")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: missing; {folder} was not written by `cli.py export`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); the file is damaged") from None
    validate(manifest, source=str(path))
    for role, name in manifest["graphs"].items():
        if name is not None and not (folder / name).is_file():
            raise ManifestError(f"{path}: the {role} graph {folder / name} is missing")
    return manifest


def validate(m: dict, source: str = "manifest") -> None:
    def need(cond, what):
        if not cond:
            raise ManifestError(f"{source}: {what}")

    need(isinstance(m, dict), "manifest must be a JSON object")
    need(m.get("schema") == SCHEMA, f"schema is {m.get('schema')!r}, expected {SCHEMA!r}")
    need(m.get("schema_version") == SCHEMA_VERSION,
         f"schema_version {m.get('schema_version')!r} is not supported (this tool reads {SCHEMA_VERSION})")
    for key in ("model", "quant_config", "opset", "cache_dtype", "graphs", "inputs", "outputs", "caches"):
        need(key in m, f"missing field {key!r}")
    need("prime" in m["graphs"], "graphs.prime is missing")
    need(m["cache_dtype"] in ("float32", "float16"), f"cache_dtype {m['cache_dtype']!r} not in ['float32', 'float16']")
    names = set()
    specs = list(m["inputs"]) + list(m["outputs"]) + list(m.get("step_extra_inputs", []))
    specs += [{"name": c["input"], **c} for c in m["caches"]] + [{"name": c["output"], **c} for c in m["caches"]]
    for spec in specs:
        need(isinstance(spec.get("name"), str) and isinstance(spec.get("shape"), list) and "dtype" in spec,
             f"tensor entry {spec!r} needs name, shape and dtype")
        need(spec["name"] not in names, f"tensor name {spec['name']!r} appears twice")
        names.add(spec["name"])
    need(bool(m["caches"]) == (m["graphs"].get("step") is not None),
         "a step graph is listed exactly when there are caches")


# -- small helpers the runtimes use ---------------------------------------------------------------
def concrete_shape(spec: dict, batch: int) -> tuple[int, ...]:
    return tuple(batch if d == BATCH else int(d) for d in spec["shape"])


def step_input_names(m: dict) -> list[str]:
    return ([s["name"] for s in m["inputs"]] + [s["name"] for s in m.get("step_extra_inputs", [])]
            + [c["input"] for c in m["caches"]])


def prime_output_names(m: dict) -> list[str]:
    return [s["name"] for s in m["outputs"]] + [c["output"] for c in m["caches"]]


def cache_bytes_per_sample(m: dict) -> int:
    itemsize = 2 if m["cache_dtype"] == "float16" else 4
    total = 0
    for c in m["caches"]:
        n = 1
        for d in c["shape"]:
            n *= 1 if d == BATCH else int(d)
        total += n * itemsize
    return total
