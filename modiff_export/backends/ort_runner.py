"""ONNX Runtime backend: prime.onnx / step.onnx behind the runner contract.

The caches never pass through Python per step: they are two sets of OrtValues allocated once per
batch (on the CUDA device when onnxruntime-gpu is installed; backends/buffers.PingPongBuffers), bound
with IOBinding. A step reads set A and writes set B, then the two swap, so no cache tensor is copied.

On x86 CPUs without VNNI/AMX, ONNX Runtime's QDQ fusion runs quantized convolutions as MLAS u8 x s8 integer
kernels whose dot product saturates (backends/cpu.py); there the runner folds the weight DequantizeLinear
nodes at load (export/passes.fold_weight_dequant) so those layers run the same weights in float and the
activation codes stay the graph's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..manifest import CacheSpec, GraphTensor, Manifest
from .base import Runner, RunnerError
from .buffers import PingPongBuffers
from .cpu import CpuPath, CpuPathError, release_freed_heap

_NP = {"float32": np.float32, "float16": np.float16}
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32"}


def available_providers() -> list[str]:
    import onnxruntime as ort

    wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in wanted if p in ort.get_available_providers()]


class OrtRunner(Runner):
    backend = "ort"

    def __init__(self, graph_folder: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 matmul_accuracy_level: int = 0, int8_kernels: bool | None = None,
                 cpu_path: str | CpuPath | None = None):
        self.folder = Path(graph_folder)
        super().__init__(**Runner.contract_of(Manifest.load(self.folder)))
        self.providers = providers or available_providers()
        self.threads = threads
        self.matmul_accuracy_level = matmul_accuracy_level
        # int8 kernels compute the codes exactly only where the CPU's int8 dot product does not saturate; the CUDA
        # provider's do. None: from the CPU path (backends/cpu.py: this CPU's class, or a forced one through
        # `cpu_path=` or MODIFF_CPU_PATH; CPU provider only).
        on_cpu = self.providers[0] == "CPUExecutionProvider"
        try:
            self.cpu_path = CpuPath.resolve(cpu_path)
        except CpuPathError as e:
            raise RunnerError(f"ort runner: {e}") from None
        self.int8_kernels = (not on_cpu or self.cpu_path.int8_kernels) if int8_kernels is None else bool(int8_kernels)
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self.sessions: dict = {}
        self.buffers = PingPongBuffers(self.manifest.buffers, self._allocate)

    def describe_path(self) -> str:
        if self.device == "cuda":
            return "ort CUDA"
        how = "int8 kernels" if self.int8_kernels else "weights dequantized at load (int8 dot product saturates)"
        return f"ort {self.cpu_path.tag}: {how}"

    # -- lifecycle ---------------------------------------------------------------------------
    def activate_impl(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            opts.intra_op_num_threads = self.threads
        # ORT fuses DequantizeLinear(int8 weight) -> MatMul into MatMulNBits, whose default
        # accuracy level 4 quantizes the *activations* to int8 on the fly: not what the graph says.
        # Level 0 keeps them float.
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(self.matmul_accuracy_level))
        for role in self.manifest.roles:
            name = self.manifest.graphs[role]
            try:
                self.sessions[role] = self._session(self.folder / name, opts)
            except Exception as e:  # ORT raises its own exception types for damaged files
                first = (str(e).splitlines() or [type(e).__name__])[0][:200]
                raise RunnerError(f"{self.folder / name}: ONNX Runtime cannot load this graph ({first})") from None
            self._check_io(role, self.sessions[role])
        self.bindings = {role: s.io_binding() for role, s in self.sessions.items()}

    def _session(self, path: Path, opts):
        """An InferenceSession of one graph; without int8 kernels, of the graph with its weights dequantized
        (passes.fold_weight_dequant), written with external data to a temporary folder that ORT has read (or
        mapped: the mapping outlives the unlink) once the session exists."""
        import tempfile

        import onnx
        import onnxruntime as ort

        from ..export.passes import fold_weight_dequant

        if not self.int8_kernels:
            proto = onnx.load(str(path))
            if fold_weight_dequant(proto):
                with tempfile.TemporaryDirectory() as tmp:
                    out = Path(tmp) / path.name
                    onnx.save_model(proto, str(out), save_as_external_data=True, location=path.name + ".data")
                    del proto
                    release_freed_heap()  # the proto's weights, freed in pieces glibc would keep
                    return ort.InferenceSession(str(out), opts, providers=self.providers)
            del proto
            release_freed_heap()
        return ort.InferenceSession(str(path), opts, providers=self.providers)

    def deactivate_impl(self) -> None:
        self.sessions, self.bindings = {}, {}
        self.buffers.clear()

    def _check_io(self, role: str, session) -> None:
        """Names, dtypes and shapes against the manifest: buffers are allocated from the manifest's."""
        def io(args):
            return [GraphTensor(a.name, _ORT_TYPES.get(a.type, a.type), tuple(a.shape)) for a in args]

        self.manifest.check_graph_io(role, io(session.get_inputs()), io(session.get_outputs()),
                                     str(self.folder / self.manifest.graphs[role]), error=RunnerError)

    # -- helpers -----------------------------------------------------------------------------
    def _ortvalue(self, array: np.ndarray):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def _allocate(self, cache: CacheSpec, batch: int):
        """One cache buffer [B, ...] on the session's device (PingPongBuffers calls this once per batch)."""
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_shape_and_type(cache.concrete(batch), _NP[cache.dtype], self.device, 0)

    def _bind_inputs(self, io, sample, timestep, cond) -> None:
        io.bind_ortvalue_input("sample", self._ortvalue(sample.numpy()))
        io.bind_ortvalue_input("timestep", self._ortvalue(timestep.numpy()))
        for name, t in cond.items():  # states or labels[, the caption mask]: checked by the base class
            io.bind_ortvalue_input(name, self._ortvalue(t.numpy()))

    def _run(self, role: str, io) -> torch.Tensor:
        # noise_pred is bound last: ORT lists outputs in binding order
        io.bind_output("noise_pred", "cpu")
        try:
            self.sessions[role].run_with_iobinding(io)
        except Exception as e:  # ORT's own exception types (out of memory, a kernel failure, ...)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise RunnerError(f"{self.folder / self.manifest.graphs[role]}: ONNX Runtime failed to run the {role} "
                              f"graph ({first})") from None
        return torch.from_numpy(io.get_outputs()[-1].numpy())  # copies noise_pred only

    # -- the contract ------------------------------------------------------------------------
    def prime_impl(self, sample, timestep, cond) -> torch.Tensor:
        io = self.bindings["prime"]
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        self._bind_inputs(io, sample, timestep, cond)
        if self.manifest.buffers:
            self.buffers.ensure(sample.shape[0])
            current = self.buffers.current
            for c in self.manifest.cache_io("prime")[1]:
                io.bind_ortvalue_output(c.output, current[c.key])
        return self._run("prime", io)

    def step_impl(self, sample, timestep, cond, delta_scales) -> torch.Tensor:
        return self._continue("step", sample, timestep, cond, delta_scales)

    def shallow_impl(self, sample, timestep, cond) -> torch.Tensor:
        return self._continue("shallow", sample, timestep, cond, None)

    def _continue(self, role: str, sample, timestep, cond, delta_scales) -> torch.Tensor:
        """A step or shallow call: reads the current buffers the graph takes, writes the spare ones of what it
        writes, then swaps those (ping-pong; the others keep what the last full call wrote)."""
        io = self.bindings[role]
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        self._bind_inputs(io, sample, timestep, cond)
        if delta_scales is not None:
            io.bind_ortvalue_input("delta_scales", self._ortvalue(delta_scales))
        (reads, writes), current, spare = self.manifest.cache_io(role), self.buffers.current, self.buffers.spare
        for c in reads:
            io.bind_ortvalue_input(c.input, current[c.key])
        for c in writes:
            io.bind_ortvalue_output(c.output, spare[c.key])
        out = self._run(role, io)
        self.buffers.swap(writes)  # ping-pong: this call's outputs are the next call's inputs
        return out

    def feature_impl(self) -> torch.Tensor:
        return torch.from_numpy(self.buffers.current[self.manifest.reuse.feature.key].numpy())  # forecast.full casts

    def set_feature_impl(self, feature: torch.Tensor) -> None:
        buf = self.buffers.current[self.manifest.reuse.feature.key]  # read by the shallow call, never written
        buf.update_inplace(feature.numpy().astype(_NP[self.manifest.reuse.feature.dtype]))

    def reset_impl(self) -> None:
        pass  # buffers are overwritten by the next prime; nothing to free between trajectories

    def caches(self) -> dict[str, torch.Tensor]:
        if not self.buffers or self.batch_size is None:
            return {}
        return {k: torch.from_numpy(v.numpy().astype(np.float32)) for k, v in self.buffers.current.items()}
