"""TensorRT backend: the engines of `cli.py build-engine` behind the runner contract (docs/design.md section 4).

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
        self._cur = 0

    @classmethod
    def from_folder(cls, folder: str | Path, **kwargs) -> "TrtRunner":
        return cls(folder, **kwargs)

    # -- host-side feeds (pure: CPU-testable) ------------------------------------------------------
    def host_inputs(self, role: str, sample, timestep, ehs, delta_scales: np.ndarray | None = None
                    ) -> dict[str, torch.Tensor]:
        """The non-cache inputs of one graph call (already checked by the base class), on the host."""
        feeds = {"sample": sample, "timestep": timestep}
        if ehs is not None:
            feeds["encoder_hidden_states"] = ehs
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
        self._batched = {s.name: s.shape[:1] == (BATCH,) for s in m.graph_inputs("step") + m.graph_outputs("step")}
        self._out = {s.name: alloc(s) for s in m.outputs}
        self._sets = [[alloc(c) for c in m.caches] for _ in range(2)]
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
        ctx, caches = self._ctx[role], self.manifest.caches
        bindings = [(s.name, self._in[s.name], True) for s in self.manifest.graph_inputs(role) if s.name in self._in]
        if cache_in is not None:
            bindings += [(c.input, t, True) for c, t in zip(caches, self._sets[cache_in])]
        bindings += [(name, t, False) for name, t in self._out.items()]
        bindings += [(c.output, t, False) for c, t in zip(caches, self._sets[cache_out])]
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
            name = self.manifest.outputs[0].name
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
            warnings.warn(f"trt runner: CUDA graph capture failed, running the step engine without it ({e})",
                          stacklevel=2)

    def prime_impl(self, sample, timestep, ehs) -> torch.Tensor:
        feeds = self.host_inputs("prime", sample, timestep, ehs)
        self._cur = 0
        return self._execute("prime", feeds, sample.shape[0], None, 0)

    def step_impl(self, sample, timestep, ehs, delta_scales) -> torch.Tensor:
        feeds = self.host_inputs("step", sample, timestep, ehs, delta_scales)
        out = self._execute("step", feeds, sample.shape[0], self._cur, 1 - self._cur)
        self._cur = 1 - self._cur
        return out

    def caches(self) -> dict[str, torch.Tensor]:
        if self.batch_size is None or not self.is_active or not self.manifest.caches:
            return {}
        self._stream.synchronize()
        return {c.key: t[:self.batch_size].float().cpu() for c, t in zip(self.manifest.caches, self._sets[self._cur])}
