"""TensorRT backend: the engines of `cli.py build-engine` behind the runner contract (docs/design.md section 4).

Not Polygraphy's TrtRunner: this one owns the MoDiff caches. activate() deserializes the plans,
creates one execution context per graph and allocates every device buffer ONCE, at the engine's
max batch (torch CUDA tensors; a smaller batch uses the leading rows, which are contiguous):
the inputs, noise_pred, and two buffers per cache (the block-reuse feature included). prime writes
buffer 0 of each; a step or shallow call reads the current buffer of what its engine reads and writes
the other buffer of what it writes (Manifest.cache_io), then those swap, by rebinding addresses with
set_tensor_address: the caches never leave the device. Each cache has its own parity, since the shallow
engine (block reuse) writes only the outer layers' caches. With cuda_graph=True the step and shallow
engines are captured once per (role, batch, parities) after one ordinary enqueue and replayed after.

Construct with `TrtRunner.from_folder("engines/<name>")`; it needs TensorRT and a CUDA GPU only
when activated.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from ..engine import BuildInfo, EngineError, check_engine_io, engine_io
from ..manifest import BATCH, Manifest
from .base import Runner, RunnerError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}


class TrtRunner(Runner):
    backend = "trt"

    def __init__(self, folder: str | Path, cuda_graph: bool | None = None, device: str = "cuda"):
        folder = Path(folder)
        # the manifest lists the ONNX graphs; an engine folder holds plans, verified by build.json's digests
        manifest = Manifest.load(folder, verify=False, what="`cli.py build-engine`")
        self.build = BuildInfo.load(folder)
        self.plans = self.build.verify(folder, manifest.roles)
        for spec in manifest.graph_inputs(manifest.roles[-1]):
            if BATCH in spec.shape[1:]:
                raise EngineError(f"{folder}: tensor {spec.name!r} has the batch axis at a position other than 0")
        super().__init__(**Runner.contract_of(manifest))
        self.folder = folder
        self.min_batch, self.max_batch = self.build.options["min_batch"], self.build.options["max_batch"]
        self.cuda_graph = self.build.options.get("cuda_graph", False) if cuda_graph is None else cuda_graph
        self.device = device
        self.cuda_graph_active = False
        self._cur: dict[str, int] = {}

    @classmethod
    def from_folder(cls, folder: str | Path, **kwargs) -> "TrtRunner":
        return cls(folder, **kwargs)

    # -- host-side feeds (pure: CPU-testable) ------------------------------------------------------
    def host_inputs(self, role: str, sample, timestep, cond: dict, delta_scales: np.ndarray | None = None
                    ) -> dict[str, torch.Tensor]:
        """The non-cache inputs of one graph call (already checked by the base class), on the host."""
        feeds = {"sample": sample, "timestep": timestep, **cond}  # + states or labels[, the caption mask]
        b = sample.shape[0]
        if not self.min_batch <= b <= self.max_batch:
            raise RunnerError(f"trt runner: batch {b} is outside the engine's profile [{self.min_batch}, "
                              f"{self.max_batch}]; rebuild with other --min-batch/--max-batch")
        out = {s.name: feeds[s.name].to(_DTYPES[s.dtype]).contiguous() for s in self.manifest.inputs}
        if role == "step" and delta_scales is not None:
            out["delta_scales"] = torch.from_numpy(delta_scales)
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
            check_engine_io(engine_io(engine, trt), self.manifest, role, plan)
            self._engines[role] = engine
            self._ctx[role] = engine.create_execution_context()
        self._stream = torch.cuda.Stream(device=self.device)
        n = self.max_batch

        def alloc(spec):
            return torch.empty(spec.concrete(n), dtype=_DTYPES[spec.dtype], device=self.device)

        m = self.manifest
        specs = list(m.inputs) + list(m.step_extra_inputs)
        self._in = {s.name: alloc(s) for s in specs}
        self._batched = {s.name: s.shape[:1] == (BATCH,)
                         for r in m.roles for s in m.graph_inputs(r) + m.graph_outputs(r)}
        self._out = {s.name: alloc(s) for s in m.outputs}
        self._bufs = {c.key: [alloc(c), alloc(c)] for c in m.buffers}
        self._graphs = {}
        self._cur = {c.key: 0 for c in m.buffers}

    def deactivate_impl(self) -> None:
        for name in ("_graphs", "_ctx", "_engines", "_runtime", "_in", "_out", "_bufs", "_stream"):
            if hasattr(self, name):
                delattr(self, name)

    def reset_impl(self) -> None:
        # prime overwrites buffer 0 of every cache; buffer 1 is never read before a step writes it
        self._cur = {key: 0 for key in self._cur}

    # -- execution -------------------------------------------------------------------------------
    def _view(self, name: str, buf: torch.Tensor, b: int) -> torch.Tensor:
        return buf[:b] if self._batched.get(name, True) else buf

    def _bind(self, role: str, b: int) -> None:
        """Inputs, noise_pred, the current buffer of every cache the engine reads and the other buffer of
        every cache it writes (prime: buffer 0)."""
        ctx = self._ctx[role]
        reads, writes = self.manifest.cache_io(role)
        bindings = [(s.name, self._in[s.name], True) for s in self.manifest.graph_inputs(role) if s.name in self._in]
        bindings += [(c.input, self._bufs[c.key][self._cur[c.key]], True) for c in reads]
        bindings += [(name, t, False) for name, t in self._out.items()]
        bindings += [(c.output, self._bufs[c.key][0 if role == "prime" else 1 - self._cur[c.key]], False)
                     for c in writes]
        for name, buf, is_input in bindings:
            view = self._view(name, buf, b)
            if is_input and not ctx.set_input_shape(name, tuple(view.shape)):
                raise RunnerError(f"trt runner: the {role} engine rejected shape {tuple(view.shape)} for {name!r}")
            if not ctx.set_tensor_address(name, view.data_ptr()):
                raise RunnerError(f"trt runner: could not bind {name!r} of the {role} engine")

    def _execute(self, role: str, feeds: dict, b: int) -> torch.Tensor:
        with torch.cuda.stream(self._stream):
            for name, t in feeds.items():
                self._view(name, self._in[name], b).copy_(t, non_blocking=False)
            key = (role, b, tuple(self._cur.values()))  # the bound addresses follow from these
            graph = self._graphs.get(key) if role != "prime" else None
            if graph is not None:
                graph.replay()
            else:
                self._bind(role, b)
                if not self._ctx[role].execute_async_v3(self._stream.cuda_stream):
                    raise RunnerError(f"trt runner: TensorRT failed to execute the {role} engine (see its log)")
                if role != "prime" and self.cuda_graph:
                    self._capture(key)
            name = self.manifest.outputs[0].name
            out = self._out[name][:b].float().cpu()
        self._stream.synchronize()
        written = self.manifest.cache_io(role)[1]
        self._cur.update({c.key: 0 if role == "prime" else 1 - self._cur[c.key] for c in written})
        return out

    def _capture(self, key) -> None:
        """Record a step/shallow enqueue (addresses already bound, one ordinary enqueue done) as a CUDA graph."""
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self._stream):
                self._ctx[key[0]].execute_async_v3(self._stream.cuda_stream)
            self._graphs[key] = graph
            self.cuda_graph_active = True
        except RuntimeError as e:
            self.cuda_graph = False
            warnings.warn(f"trt runner: CUDA graph capture failed, running the step engine without it ({e})",
                          stacklevel=2)

    def prime_impl(self, sample, timestep, cond) -> torch.Tensor:
        return self._execute("prime", self.host_inputs("prime", sample, timestep, cond), sample.shape[0])

    def step_impl(self, sample, timestep, cond, delta_scales) -> torch.Tensor:
        return self._execute("step", self.host_inputs("step", sample, timestep, cond, delta_scales), sample.shape[0])

    def shallow_impl(self, sample, timestep, cond) -> torch.Tensor:
        return self._execute("shallow", self.host_inputs("shallow", sample, timestep, cond), sample.shape[0])

    def _feature_buffer(self) -> torch.Tensor:
        key = self.manifest.reuse.feature.key
        return self._bufs[key][self._cur[key]][:self.batch_size]

    def feature_impl(self) -> torch.Tensor:  # stays on the device: the Forecast works there too
        self._stream.synchronize()
        return self._feature_buffer().float()

    def set_feature_impl(self, feature: torch.Tensor) -> None:
        with torch.cuda.stream(self._stream):  # the shallow engine reads this buffer and never writes it
            self._feature_buffer().copy_(feature)

    def caches(self) -> dict[str, torch.Tensor]:
        if self.batch_size is None or not self.is_active or not self.manifest.buffers:
            return {}
        self._stream.synchronize()
        return {c.key: self._bufs[c.key][self._cur[c.key]][:self.batch_size].float().cpu()
                for c in self.manifest.buffers}
