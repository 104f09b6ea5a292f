"""TensorRT backend: the engines of `cli.py build-engine` behind the runner contract (design.md 4).

Not Polygraphy's TrtRunner: this one owns the MoDiff caches. activate() deserializes the plans,
creates one execution context per graph and allocates every device buffer ONCE, at the engine's
max batch (torch CUDA tensors; a smaller batch uses the leading rows, which are contiguous):
the inputs, noise_pred, and two sets of cache buffers. prime writes the caches into set A; each
step reads the current set and writes the other one, then the two swap roles, by rebinding
addresses with set_tensor_address: the caches never leave the device. With cuda_graph=True the
step graph is captured once per (batch, parity) after one ordinary enqueue and replayed after.

Construct with `TrtRunner.from_folder("engines/<name>")`; it needs TensorRT and a CUDA GPU only
when activated.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from ..engine import EngineError, check_engine_io, engine_io, graph_inputs, graph_roles
from ..manifest import BATCH, MANIFEST_NAME, ManifestError, validate
from ..quantization import timestep_bucket
from .base import Runner, RunnerError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}


class TrtRunner(Runner):
    backend = "trt"

    def __init__(self, folder: str | Path, cuda_graph: bool | None = None, device: str = "cuda"):
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not path.is_file():
            raise EngineError(f"{path}: missing; {folder} was not written by `cli.py build-engine`")
        try:
            manifest = json.loads(path.read_text())
            build = json.loads((folder / "build.json").read_text())
        except FileNotFoundError:
            raise EngineError(f"{folder / 'build.json'}: missing; rebuild with `cli.py build-engine`") from None
        except json.JSONDecodeError as e:
            raise ManifestError(f"{folder}: damaged JSON ({e.msg} at line {e.lineno})") from None
        validate(manifest, source=str(path))
        self.roles = graph_roles(manifest)
        self.plans = {r: folder / build["plans"].get(r, f"{r}.plan") for r in self.roles}
        for role, plan in self.plans.items():
            if not plan.is_file() or plan.stat().st_size == 0:
                raise EngineError(f"{plan}: the {role} engine is missing or empty; rebuild with `cli.py build-engine`")
        for spec in graph_inputs(manifest, "step" if "step" in self.roles else "prime"):
            if BATCH in spec["shape"][1:]:
                raise EngineError(f"{path}: tensor {spec['name']!r} has the batch axis at a position other than 0")
        qc = manifest["quant_config"]
        super().__init__(qc.get("keyframe_interval"), uses_cache=bool(manifest["caches"]))
        self.folder, self.manifest, self.build = folder, manifest, build
        self.min_batch, self.max_batch = build["options"]["min_batch"], build["options"]["max_batch"]
        self.cuda_graph = build["options"].get("cuda_graph", False) if cuda_graph is None else cuda_graph
        self.device = device
        self.cuda_graph_active = False
        self._cur = 0

    @classmethod
    def from_folder(cls, folder: str | Path, **kwargs) -> "TrtRunner":
        return cls(folder, **kwargs)

    # -- host-side feeds (pure: CPU-testable) ------------------------------------------------------
    def scale_row(self, timestep: torch.Tensor) -> torch.Tensor | None:
        """delta_scales for this step (static multi-bucket scales), bucket picked by the first timestep."""
        extra = {s["name"]: s for s in self.manifest.get("step_extra_inputs", [])}
        if "delta_scales" not in extra:
            return None
        sc = self.manifest.get("scales") or {}
        if not sc.get("table") or not sc.get("layers"):
            raise RunnerError(f"{self.folder}: the step engine takes delta_scales but the manifest has no scale table")
        b = timestep_bucket(float(timestep.flatten()[0]), int(sc["n_buckets"]), int(sc.get("num_train_timesteps", 1000)))
        return torch.tensor([sc["table"][name][b] for name in sc["layers"]], dtype=_DTYPES[extra["delta_scales"]["dtype"]])

    def host_inputs(self, role: str, sample, timestep, ehs) -> dict[str, torch.Tensor]:
        """The non-cache inputs of one graph call, checked against the manifest, on the host."""
        feeds = {"sample": sample, "timestep": timestep}
        names = [s["name"] for s in self.manifest["inputs"]]
        if "encoder_hidden_states" in names and ehs is None:
            raise RunnerError("trt runner: this model is conditional; pass encoder_hidden_states")
        if "encoder_hidden_states" not in names and ehs is not None:
            raise RunnerError("trt runner: this model is unconditional; encoder_hidden_states must be None")
        if ehs is not None:
            feeds["encoder_hidden_states"] = ehs
        b = sample.shape[0]
        if not self.min_batch <= b <= self.max_batch:
            raise RunnerError(f"trt runner: batch {b} is outside the engine's profile [{self.min_batch}, "
                              f"{self.max_batch}]; rebuild with other --min-batch/--max-batch")
        out = {}
        for spec in self.manifest["inputs"]:
            t = feeds[spec["name"]]
            want = tuple(b if d == BATCH else int(d) for d in spec["shape"])
            if tuple(t.shape) != want:
                raise RunnerError(f"trt runner: input {spec['name']!r} has shape {tuple(t.shape)}, the engine expects {want}")
            out[spec["name"]] = t.to(_DTYPES[spec["dtype"]]).contiguous()
        if role == "step":
            row = self.scale_row(timestep)
            if row is not None:
                out["delta_scales"] = row
        return out

    # -- lifecycle -------------------------------------------------------------------------------
    def activate_impl(self) -> None:
        try:
            import tensorrt as trt
        except ImportError:
            from ..engine import INSTALL_HINT, TensorRTUnavailable
            raise TensorRTUnavailable(INSTALL_HINT) from None
        if not torch.cuda.is_available():
            raise RunnerError("trt runner: needs a CUDA GPU, but torch.cuda.is_available() is False")
        self._trt = trt
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engines, self._ctx = {}, {}
        for role, plan in self.plans.items():
            engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
            if engine is None:
                raise EngineError(f"{plan}: TensorRT could not deserialize it (built by another TensorRT version "
                                  f"or GPU?); rebuild with `cli.py build-engine`")
            check_engine_io(engine_io(engine, trt), self.manifest, role)
            self._engines[role] = engine
            self._ctx[role] = engine.create_execution_context()
        self._stream = torch.cuda.Stream(device=self.device)
        n = self.max_batch

        def alloc(spec):
            shape = tuple(n if d == BATCH else int(d) for d in spec["shape"])
            return torch.empty(shape, dtype=_DTYPES[spec["dtype"]], device=self.device)

        specs = list(self.manifest["inputs"]) + list(self.manifest.get("step_extra_inputs", []))
        self._in = {s["name"]: alloc(s) for s in specs}
        self._batched = {s["name"]: bool(s["shape"]) and s["shape"][0] == BATCH
                         for s in specs + list(self.manifest["outputs"]) + list(self.manifest["caches"])}
        self._out = {s["name"]: alloc(s) for s in self.manifest["outputs"]}
        self._sets = [[alloc(c) for c in self.manifest["caches"]] for _ in range(2)]
        self._graphs = {}
        self._cur = 0

    def deactivate_impl(self) -> None:
        for name in ("_graphs", "_ctx", "_engines", "_runtime", "_in", "_out", "_sets", "_stream"):
            if hasattr(self, name):
                delattr(self, name)

    def reset_impl(self) -> None:
        self._cur = 0  # prime overwrites set A; stale data in set B is never read before a step writes it

    # -- execution -------------------------------------------------------------------------------
    def _view(self, name: str, buf: torch.Tensor, b: int) -> torch.Tensor:
        return buf[:b] if self._batched.get(name, True) else buf

    def _bind(self, role: str, b: int, cache_in: int | None, cache_out: int) -> None:
        ctx, caches = self._ctx[role], self.manifest["caches"]
        bindings = [(s["name"], self._in[s["name"]], True) for s in graph_inputs(self.manifest, role)
                    if s["name"] in self._in]
        if cache_in is not None:
            bindings += [(c["input"], t, True) for c, t in zip(caches, self._sets[cache_in])]
        bindings += [(name, t, False) for name, t in self._out.items()]
        bindings += [(c["output"], t, False) for c, t in zip(caches, self._sets[cache_out])]
        for name, buf, is_input in bindings:
            view = self._view(name, buf, b)
            if is_input and not ctx.set_input_shape(name, tuple(view.shape)):
                raise RunnerError(f"trt runner: the {role} engine rejected shape {tuple(view.shape)} for {name!r}")
            if not ctx.set_tensor_address(name, view.data_ptr()):
                raise RunnerError(f"trt runner: could not bind {name!r} of the {role} engine")

    def _execute(self, role: str, feeds: dict, b: int, cache_in: int | None, cache_out: int) -> torch.Tensor:
        with torch.cuda.stream(self._stream):
            for name, t in feeds.items():
                self._view(name, self._in[name], b).copy_(t, non_blocking=False)
            key = (b, cache_in)
            graph = self._graphs.get(key) if role == "step" else None
            if graph is not None:
                graph.replay()
            else:
                self._bind(role, b, cache_in, cache_out)
                if not self._ctx[role].execute_async_v3(self._stream.cuda_stream):
                    raise RunnerError(f"trt runner: TensorRT failed to execute the {role} engine (see its log)")
                if role == "step" and self.cuda_graph:
                    self._capture(key)
            name = self.manifest["outputs"][0]["name"]
            out = self._out[name][:b].float().cpu()
        self._stream.synchronize()
        return out

    def _capture(self, key) -> None:
        """Record the step enqueue (addresses already bound, one ordinary enqueue done) as a CUDA graph."""
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self._stream):
                self._ctx["step"].execute_async_v3(self._stream.cuda_stream)
            self._graphs[key] = graph
            self.cuda_graph_active = True
        except RuntimeError as e:
            self.cuda_graph = False
            warnings.warn(f"trt runner: CUDA graph capture failed, running the step engine without it ({e})")

    def prime_impl(self, sample, timestep, ehs) -> torch.Tensor:
        feeds = self.host_inputs("prime", sample, timestep, ehs)
        self._cur = 0
        return self._execute("prime", feeds, sample.shape[0], None, 0)

    def step_impl(self, sample, timestep, ehs) -> torch.Tensor:
        feeds = self.host_inputs("step", sample, timestep, ehs)
        out = self._execute("step", feeds, sample.shape[0], self._cur, 1 - self._cur)
        self._cur = 1 - self._cur
        return out

    def caches(self) -> dict[str, torch.Tensor]:
        if self.batch_size is None or not self.is_active or not self.manifest["caches"]:
            return {}
        self._stream.synchronize()
        return {f"{c['layer']}.{c['kind']}": t[:self.batch_size].float().cpu()
                for c, t in zip(self.manifest["caches"], self._sets[self._cur])}
