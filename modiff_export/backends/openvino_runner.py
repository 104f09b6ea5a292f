"""OpenVINO CPU backend: prime.onnx / step.onnx (as written by `cli.py export`) behind the runner contract.

Precision (`precision=`, the step graph's and that of graphs without caches; `prime_precision=` the
MoDiff prime graph's, default "default"):
  f32      INFERENCE_PRECISION_HINT f32: every float op in float32. Quantized Conv/MatMul still run as
           int8 kernels (OpenVINO turns QuantizeLinear -> DequantizeLinear -> Conv into an int8 conv).
  bf16     the bf16 hint: float ops may run in bfloat16.
  default  no hint: the plugin's default (bf16 on CPUs with AVX512_BF16 or AMX, else f32). The prime graph has
           no quantizer (full-precision activations), so below 8-bit activations it runs like the FP model does
           by default; at 8-bit activations the default prime precision is f32 (see __init__).
  mixed    bf16 hint, but in the step graph every node of MoDiff's delta path (x - a_hat, absmax scale,
           Div, Clip, Q/DQ, rescale, o_hat/a_hat updates) is marked `disable_fp16_compression`, the rt_info
           the CPU plugin's precision enforcement honours, so they stay float32 - with ping-pong caches only:
           with stateful caches the plugin runs the ops around the variables in bf16, marks or not.

Step graph form (`levers=`, default DEFAULT_LEVERS): the step graph is rewritten at load time by
export/ov_variant.py into fewer element-wise passes with the same I/O and the same codes (up to float
ties); `levers=()` runs the exported graph as it is.

Shapes (`static_shapes=`, default True): graphs are exported with a dynamic batch axis; the runner
reshapes them to the batch of the call and compiles them for it on the first call of that batch size
(one compiled set at a time: a new batch size recompiles, which a sampling loop does at most once, for its
last, smaller batch). OpenVINO's CPU plugin plans memory and picks kernels once for static shapes; the
measured CIFAR-size W8A4 step costs ~30% less CPU time than with the dynamic batch (docs/speed.md).
Servers whose batches vary per request pass static_shapes=False.

CPU (`cpu_path=`, default: this CPU's class or MODIFF_CPU_PATH): every CPU-dependent choice (int8 kernels or
u8 codes, which graphs are rewritten at load, the default precision) comes from one backends/cpu.CpuPath
(docs/design.md section 4.1); `describe_path()` says which one a runner took. An OpenVINO IR folder (the
NNCF peer's prime.xml) runs as written on every path.

Caches (`cache_mode=`; default stateful for f32/bf16, 1.32-1.37x faster than ping-pong on the CIFAR-size W8A4
step graph (docs/speed.md); ping-pong for mixed, see __init__) never pass through Python per step:
  pingpong  two sets of preallocated host tensors bound with set_tensor; a step reads set A and
            writes set B, then they swap (same scheme as OrtRunner).
  stateful  the step graph's cache inputs/outputs become OpenVINO variables (MakeStateful:
            ReadValue/Assign); prime writes the first values into the states once per trajectory.
            With block reuse (static shapes) the step graph is cut into three stateful models, whose
            outer two also make the shallow call (backends/ov_split.py); dynamic shapes: ping-pong.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..export import ov_variant, passes
from ..manifest import CacheSpec, GraphTensor, Manifest
from ..models.denoiser import TRANSFORMERS
from . import ov_split
from .base import Runner, RunnerError
from .buffers import PingPongBuffers
from .cpu import CpuPath, CpuPathError, release_freed_heap

PRECISIONS = ("f32", "bf16", "mixed", "default")
CACHE_MODES = ("pingpong", "stateful")
_NP = {"float32": np.float32, "float16": np.float16}
# ops that end a delta path going forward (the quantized layer's own compute)
_STOP = {"Convolution", "MatMul", "GroupConvolution", "Result"}
DISABLE_F16 = "disable_fp16_compression_0"  # rt_info key of ov::DisableFP16Compression
# the step graph's rewrite for OpenVINO (export/ov_variant.py); each lever's measured effect: docs/speed.md
DEFAULT_LEVERS = ("minmax", "recip", "update", "share")


def mark_delta_path(model, manifest: Manifest) -> int:
    """Mark MoDiff's delta path in an ov.Model to stay float32 under a bf16/f16 inference hint;
    returns the number of marked nodes. Forward from every a_hat cache input (x - a_hat, absmax,
    scale, Div, Clip, Q/DQ) up to, not including, the quantized Conv/MatMul and up to the cache
    updates; the o_hat inputs' consumers; and backward from every cache output through its
    element-wise producers (Add <- Mul <- ...) down to the Conv/MatMul."""
    names_in = {c.input for c in manifest.caches}
    names_out = {c.output for c in manifest.caches}
    marked = set()

    def mark(node):
        if node.get_type_name() in _STOP or node.get_type_name() in ("Parameter", "Constant"):
            return False
        key = node.get_instance_id()  # Python wrappers are temporary: id() is not a node identity
        if key in marked:
            return False
        node.get_rt_info()[DISABLE_F16] = ""
        marked.add(key)
        return True

    def is_cache_out(node) -> bool:
        return any(names_out & set(o.get_names()) for o in node.outputs())

    stack = []
    for p in model.get_parameters():
        if not (names_in & set(p.output(0).get_names())):
            continue
        consumers = [t.get_node() for t in p.output(0).get_target_inputs()]
        if any(n.endswith(".o_hat") for n in p.output(0).get_names()):
            for node in consumers:  # o_hat only feeds the layer's output update (o_hat + y * s)
                mark(node)
        else:
            stack += consumers
    while stack:  # forward from x - a_hat, up to the quantized op and the cache updates
        node = stack.pop()
        if mark(node) and not is_cache_out(node):
            for out in node.outputs():
                stack += [t.get_node() for t in out.get_target_inputs()]
    for r in model.get_results():
        src = r.input_value(0)
        if not (names_out & set(src.get_names())):
            continue
        stack.append(src.get_node())
        while stack:  # backward, element-wise producers only
            node = stack.pop()
            if node.get_type_name() in _STOP or node.get_type_name() in ("Parameter", "Constant"):
                continue
            mark(node)
            stack += [v.get_node() for v in node.input_values()
                      if v.get_node().get_type_name() not in ("Parameter", "Constant")
                      and v.get_node().get_type_name() in ("Multiply", "Add", "Subtract", "Divide", "Convert")]
    return len(marked)


def with_batch(model, batch: int):
    """`model` (an ov.Model) reshaped in place to a static `batch`: every dynamic dimension of the exported
    graphs is the batch axis. Returns the model."""
    model.reshape({p.get_any_name(): [batch if d.is_dynamic else d.get_length() for d in p.get_partial_shape()]
                   for p in model.inputs})
    return model


def _reason(e: Exception) -> str:
    """The informative line of an OpenVINO exception (its first lines only name C++ source files)."""
    lines = [ln for ln in str(e).splitlines() if ln.strip() and not ln.startswith("Exception from ")]
    return (lines[0] if lines else str(e).strip())[:200]


class OpenVinoRunner(Runner):
    backend = "openvino"

    def __init__(self, graph_folder: str | Path, threads: int | None = None, precision: str = "f32",
                 prime_precision: str | None = None, cache_mode: str | None = None,
                 levers: tuple[str, ...] | None = None, properties: dict | None = None,
                 static_shapes: bool = True, cpu_path: str | CpuPath | None = None):
        if precision not in PRECISIONS or (prime_precision or precision) not in PRECISIONS:
            raise RunnerError(f"openvino runner: precision must be one of {list(PRECISIONS)}")
        # OpenVINO 2026.4's CPU plugin keeps variables (stateful caches) at the inference precision and runs
        # the ops around them in bf16 under a bf16 hint, marks or not (checked in the runtime model): the
        # delta path stays float32 only with explicit cache I/O. So mixed means ping-pong caches.
        self.folder = Path(graph_folder)
        super().__init__(**Runner.contract_of(Manifest.load(self.folder, onnx=False)))
        # Block reuse: the step and shallow graphs share the outer caches, and OpenVINO variables belong to one
        # compiled model; with static shapes the runner cuts the step graph into three stateful models instead
        # (backends/ov_split.py), with dynamic shapes reuse folders run with ping-pong caches.
        self.static_shapes = bool(static_shapes)
        cut = bool(self.reuse_interval) and self.static_shapes and bool(self.manifest.caches)  # can be cut
        if cache_mode is None:
            cache_mode = "pingpong" if precision == "mixed" or (self.reuse_interval and not cut) else "stateful"
        if cache_mode not in CACHE_MODES:
            raise RunnerError(f"openvino runner: cache_mode must be one of {list(CACHE_MODES)}")
        if precision == "mixed" and cache_mode == "stateful":
            raise RunnerError("openvino runner: precision 'mixed' needs cache_mode 'pingpong' (OpenVINO runs the "
                              "ops around stateful variables in bf16 under a bf16 hint)")
        if self.reuse_interval and cache_mode == "stateful" and not cut:
            raise RunnerError(f"{self.folder}: block reuse with stateful caches needs static shapes and MoDiff "
                              f"caches (the step graph is cut into stateful parts per batch); use cache_mode "
                              f"'pingpong'")
        self.threads, self.cache_mode = threads, cache_mode
        self._split = bool(self.reuse_interval) and cache_mode == "stateful"
        # MoDiff's prime has no quantizer (full-precision activations, int8 weights). Below 8-bit activations it
        # runs at OpenVINO's default precision (bf16 on CPUs with BF16); at 8 bits in f32: the prime's output caches
        # o_hat are never re-rounded (every step adds to them), so bf16 rounding there stays in every later output,
        # which at A8 is above the step's own quantization error (digits DDIM-50 W8A8, OpenVINO vs PyTorch: 35.6 dB
        # with a bf16 prime, 63.4 dB with an f32 one; docs/speed.md). Graphs without caches (fp, ptq) run `precision`.
        # Transformers (DiT, PixArt) take an f32 prime at every bit width: with a bf16 prime a random tiny DiT's
        # W8A4 CFG trajectory was 13.6 dB from PyTorch on an AVX-512 BF16 CPU, 45.0 dB with an f32 prime
        # (tests/test_transformers.py::test_dit_cfg_trajectory_parity).
        a8 = self.manifest.quant_config.act_bits >= 8
        transformer = self.manifest.model.class_name in TRANSFORMERS
        prime_default = ("f32" if a8 or transformer else "default") if self.uses_cache else precision
        self.precision = {"step": precision, "shallow": precision, "prime": prime_precision or prime_default}
        self.levers = DEFAULT_LEVERS if levers is None else tuple(levers)
        if set(self.levers) - set(ov_variant.LEVERS):
            raise RunnerError(f"openvino runner: levers must be a subset of {list(ov_variant.LEVERS)}")
        self.properties = dict(properties or {})  # extra compile properties (e.g. PERF_COUNT for profiling)
        # Every CPU-dependent choice (int8 kernels or u8 codes, which graphs are rewritten at load, the default
        # precision) is one CpuPath (backends/cpu.py): this CPU's class, or a forced one (`cpu_path=`, or
        # MODIFF_CPU_PATH). int8 kernels compute the graph's codes exactly only where the int8 dot product does not
        # saturate (VNNI / AMX); elsewhere the step's layers with <= 7-bit codes get int8 kernels through unsigned
        # codes (the u8 lever of export/ov_variant.py: their u8 x s8 pairs cannot saturate) and the others' weights
        # are dequantized at load (export/passes.fold_weight_dequant).
        try:
            self.cpu_path = CpuPath.resolve(cpu_path)
        except CpuPathError as e:
            raise RunnerError(f"openvino runner: {e}") from None
        self.compiled, self.requests = {}, {}
        self._compiled_batch: int | None = None  # static_shapes: the batch the graphs are compiled for
        self._copy_bufs: dict = {}  # stateful: host tensors of the variables whose buffer is not handed out
        self._copy_keys: tuple | None = None  # stateful: (batch, keys of _copy_bufs) once found for that batch
        self.buffers = PingPongBuffers(self.manifest.buffers, self._allocate, 2 if cache_mode == "pingpong" else 1)
        self._direct = False  # this trajectory's prime wrote the step request's variables directly
        self.parts: list = []  # block reuse, stateful: the step graph's three parts (ov_split.Part, with .request)
        self.links: dict = {}  # their link tensors by name; self._feature_link: the one carrying the feature
        self._feature_link: str | None = None

    @property
    def int8_kernels(self) -> bool:
        return self.cpu_path.int8_kernels

    @property
    def u8_codes(self) -> bool:
        return self.cpu_path.u8_codes

    def describe_path(self) -> str:
        """One line for reports: the CPU path and, once compiled, the precision the plugin runs each graph in."""
        got = {}
        compiled = {**self.compiled, **{f"step/{p.name}": p.request.get_compiled_model() for p in self.parts}}
        for role, c in compiled.items():
            try:
                v = c.get_property("INFERENCE_PRECISION_HINT")
                got[role] = v.to_string() if hasattr(v, "to_string") else str(v)
            except Exception:  # noqa: BLE001 - a plugin that does not report it
                pass
        ir = any(str(g).endswith(".xml") for g in self.manifest.graphs.values() if g)
        path = self.cpu_path
        what = (f"{path.tag}: OpenVINO IR run as written (no load-time rewrite), default precision "
                f"{path.precision_here}") if ir else path.describe()
        return f"openvino {what}" + ("; compiled precision " + ", ".join(f"{k} {v}" for k, v in got.items())
                                     if got else "")

    # -- lifecycle ---------------------------------------------------------------------------
    def config(self, role: str) -> dict:
        # DYNAMIC_QUANTIZATION_GROUP_SIZE 0: the CPU plugin would otherwise quantize the *activations* of
        # MatMuls with int8 weights to int8 on the fly (measured: 0.3% error on a full-precision prime
        # Linear of the CIFAR-size UNet): not what the graph says.
        cfg = {"PERFORMANCE_HINT": "LATENCY", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
        if self.precision[role] != "default":  # "default": no hint, the plugin's choice (bf16 if the CPU has it)
            cfg["INFERENCE_PRECISION_HINT"] = "f32" if self.precision[role] == "f32" else "bf16"
        elif self.cpu_path.forced:  # a forced path's default precision, as far as this CPU has it
            cfg["INFERENCE_PRECISION_HINT"] = self.cpu_path.precision_here
        if self.threads:
            cfg["INFERENCE_NUM_THREADS"] = self.threads
        return {**cfg, **self.properties}

    def read(self, role: str, batch: int | None = None, adapt: bool = True):
        """The ov.Model of one graph, with this runner's precision marks and cache mode applied; with
        `batch`, reshaped to that batch first (before MakeStateful: reshaped after it, the variables keep the
        dynamic shapes and the step computes garbage). `adapt=False`: the graph as exported, I/O checked
        (the load-time rewrites keep the I/O)."""
        import openvino as ov

        path = self.folder / self.manifest.graphs[role]
        try:
            # an OpenVINO IR (the NNCF peer's form) runs as it was written: the rewrites are of exported ONNX
            rewrite = adapt and path.suffix == ".onnx" and self.cpu_path.rewrites(role, self.levers)
            model = self._read_rewritten(path, role) if rewrite else ov.Core().read_model(str(path))
        except Exception as e:  # noqa: BLE001 - OpenVINO raises assorted types for damaged files; reported
            raise RunnerError(f"{path}: OpenVINO cannot read this graph ({_reason(e)})") from None
        self._check_io(role, model)
        if not adapt:
            return model
        if batch is not None:
            with_batch(model, batch)
        if self.precision[role] == "mixed" and self.uses_cache and role != "prime":
            mark_delta_path(model, self.manifest)  # prime has no delta path: there mixed = the bf16 hint
        if role == "step" and self.cache_mode == "stateful" and not self._split:
            from openvino import passes

            manager = passes.Manager()
            manager.register_pass(passes.MakeStateful({c.input: c.output for c in self.manifest.caches}))
            manager.run_passes(model)
        return model

    def _read_rewritten(self, path: Path, role: str):
        """A graph rewritten for OpenVINO (same I/O, same codes): a step or shallow graph with
        export/ov_variant.py's levers; without int8 kernels, every graph with its weights dequantized."""
        import tempfile

        import onnx
        import openvino as ov

        fold = not self.int8_kernels
        # read from a file, not from bytes: from bytes OpenVINO drops graph inputs nobody reads (a layer's a_hat
        # input under "share"), and the I/O would no longer match the manifest
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / path.name
            proto = onnx.load(str(path), load_external_data=fold)  # folding computes from the weights
            deep = set(self.manifest.reuse.deep_layers) if self.manifest.reuse else set()
            groups = {c.input: "deep" if c.layer in deep else "outer" for c in self.manifest.caches}
            levers = self.levers + (("u8",) if self.u8_codes and "u8" not in self.levers else ())
            changed = ov_variant.rewrite(proto, levers, groups) if role != "prime" and levers else 0
            keep = ov_variant.unsigned_layers(proto) if fold and self.u8_codes else set()
            changed += passes.fold_weight_dequant(proto, keep) if fold else 0
            data = path.with_name(path.name + ".data")
            if changed and fold:  # float weights: written beside the graph (a float UNet can pass protobuf's 2 GiB)
                onnx.save_model(proto, str(out), save_as_external_data=True, location=data.name)
            elif changed:
                if data.is_file():  # external data: the rewritten graph beside a link to it
                    (Path(tmp) / data.name).symlink_to(data.resolve())
                onnx.save_model(proto, str(out))
            del proto
            release_freed_heap()  # the proto's weights, freed in pieces glibc would keep
            return ov.Core().read_model(str(out if changed else path))  # opens (maps) the data file now

    def activate_impl(self) -> None:
        if self.static_shapes:  # compiled on the first call, for its batch (_compile_for)
            for role in self.manifest.roles:  # read now: a damaged graph is an error here, not mid-trajectory
                self.read(role, adapt=False)  # (the rewrites, at compile time, are this runner's own code)
            release_freed_heap()
        else:
            self._compile(None)

    def _compile(self, batch: int | None) -> None:
        import openvino as ov

        self.compiled, self.requests, self._copy_bufs, self._copy_keys = {}, {}, {}, None
        self.parts, self.links, self._feature_link = [], {}, None
        core = ov.Core()
        for role in self.manifest.roles:
            if self._split and role == "shallow":
                continue  # its work is the step graph's outer parts
            model = self.read(role, batch)
            if self._split and role == "step":
                self._compile_parts(core, model)
                continue
            self.compiled[role] = core.compile_model(model, "CPU", self.config(role))
            self.requests[role] = self.compiled[role].create_infer_request()
            release_freed_heap()  # the ov.Model's constants, copied into the plugin's layouts
        self._compiled_batch = batch

    def _compile_parts(self, core, model) -> None:
        """Block reuse, stateful: the step graph as three stateful models chained by link tensors."""
        import openvino as ov
        from openvino import passes

        parts, self._feature_link = ov_split.split(model, self.manifest)
        del model
        self.links = {}
        for part in parts:
            manager = passes.Manager()
            manager.register_pass(passes.MakeStateful(part.caches))
            manager.run_passes(part.model)
            part.request = core.compile_model(part.model, "CPU", self.config("step")).create_infer_request()
            for out in part.model.outputs:
                name = next((n for n in out.get_names() if n in part.links_out), None)
                if name is not None:
                    self.links[name] = ov.Tensor(np.zeros(list(out.get_shape()), out.get_element_type().to_dtype()))
                    part.request.set_tensor(name, self.links[name])
            part.model = None  # compiled: the plugin holds its own copy
            release_freed_heap()
        for part in parts:
            for name in part.links_in:
                part.request.set_tensor(name, self.links[name])
        self.parts = parts

    def _compile_for(self, batch: int) -> None:
        """static_shapes: the graphs compiled for this batch (a prime always starts a new batch size)."""
        if self.static_shapes and self._compiled_batch != batch:
            self._compile(batch)

    def deactivate_impl(self) -> None:
        self.compiled, self.requests, self._direct, self._copy_bufs, self._compiled_batch = {}, {}, False, {}, None
        self._copy_keys, self.parts, self.links, self._feature_link = None, [], {}, None
        self.buffers.clear()

    def _check_io(self, role: str, model) -> None:
        """Names, dtypes and shapes of the ov.Model against the manifest. A dynamic dimension is None
        (unknown): OpenVINO's inferred output shapes need not keep what the ONNX graph declares."""
        want = {s.name for s in self.manifest.graph_inputs(role) + self.manifest.graph_outputs(role)}

        def io(ports):
            out = []
            for p in ports:  # a port may carry several names: the manifest's one, if it is among them
                name = next((n for n in sorted(p.get_names()) if n in want), p.get_any_name())
                ps = p.get_partial_shape()
                shape = None if ps.rank.is_dynamic else tuple(d.get_length() if d.is_static else None for d in ps)
                out.append(GraphTensor(name, str(np.dtype(p.get_element_type().to_dtype())), shape))
            return out

        self.manifest.check_graph_io(role, io(model.inputs), io(model.outputs),
                                     str(self.folder / self.manifest.graphs[role]), error=RunnerError)

    # -- helpers -----------------------------------------------------------------------------
    @staticmethod
    def _allocate(cache: CacheSpec, batch: int):
        """One cache buffer [B, ...] (PingPongBuffers: two sets for ping-pong, one for stateful priming)."""
        import openvino as ov

        return ov.Tensor(np.zeros(cache.concrete(batch), _NP[cache.dtype]), shared_memory=True)

    def _set_inputs(self, req, sample, timestep, cond, only: list[str] | None = None) -> None:
        """The call's inputs on `req` (`only`: those of these names, for a part of a cut step graph)."""
        import openvino as ov

        for name, t in {"sample": sample, "timestep": timestep, **cond}.items():  # cond: states or labels[, mask]
            if only is None or name in only:
                req.set_tensor(name, ov.Tensor(np.ascontiguousarray(t.numpy())))

    def _variables(self) -> dict:
        """{name: VariableState} of the stateful caches: the step request's, or those of its cut parts."""
        reqs = [p.request for p in self.parts] if self._split else [self.requests["step"]]
        return {s.name: s for r in reqs for s in r.query_state()}

    def _run_parts(self, role: str, sample, timestep, cond, delta_scales=None) -> torch.Tensor:
        """Block reuse, stateful: run the parts of the cut step graph a `role` call runs (ov_split.RUNS)."""
        import openvino as ov

        for part in self.parts:
            if part.name not in ov_split.RUNS[role]:
                continue
            self._set_inputs(part.request, sample, timestep, cond, only=part.feeds)
            if delta_scales is not None and "delta_scales" in part.feeds:
                part.request.set_tensor("delta_scales", ov.Tensor(delta_scales))
            part.request.infer()
        return torch.from_numpy(self.parts[-1].request.get_tensor("noise_pred").data.copy())

    @staticmethod
    def _run(req) -> torch.Tensor:
        req.infer()
        return torch.from_numpy(req.get_tensor("noise_pred").data.copy())  # copies noise_pred only

    # -- the contract ------------------------------------------------------------------------
    def prime_impl(self, sample, timestep, cond) -> torch.Tensor:
        self._compile_for(sample.shape[0])
        req = self.requests["prime"]
        self._set_inputs(req, sample, timestep, cond)
        self._direct = False
        copies = self._bind_states(req, sample.shape[0]) if self.uses_cache and self.cache_mode == "stateful" else None
        if copies is not None:
            self._direct = True  # the prime writes the step request's variables themselves
            if self._split:  # and the feature into the link outer_out reads
                req.set_tensor(self.manifest.reuse.feature.output, self.links[self._feature_link])
            out = self._run(req)
            for st, host in copies:  # variables whose buffer the plugin does not hand out: one copy each
                st.state = host
            return out
        if self.manifest.buffers:
            self.buffers.ensure(sample.shape[0])
            current = self.buffers.current
            for c in self.manifest.cache_io("prime")[1]:
                req.set_tensor(c.output, current[c.key])
        out = self._run(req)
        if self.uses_cache and self.cache_mode == "stateful":
            states, current = self._variables(), self.buffers.current
            for c in self.manifest.caches:
                states[self._state_name(c)].state = current[c.key]  # one copy per trajectory
            if self._split:
                self.links[self._feature_link].data[...] = current[self.manifest.reuse.feature.key].data
        return out

    def _bind_states(self, req, batch: int) -> list | None:
        """Bind the step request's variable buffers (with block reuse: those of its cut parts) as the prime's
        cache outputs, so the prime writes the variables themselves. VariableState.state hands out the plugin's
        own buffer for most variables, but a copy for some (seen for variables the step graph keeps in a blocked
        layout: two reads give two addresses; 33 of the CIFAR-size UNet's 226); those get a host tensor, copied
        into the variable after the prime, and are returned as (state, host tensor). A variable that does not
        fit this batch (first trajectory: OpenVINO starts them empty, [0, ...]; a new batch size) first gets a
        zero tensor of the right shape, once per batch size. None when a variable still does not fit: then every
        cache takes the copy path. Which variables are copies is found once per compiled batch (two reads each);
        later primes read each direct variable once (the plugin alternates its buffers between steps) and skip
        the copies' reads (each one a full copy: ~40 ms of the CIFAR-size prime, docs/speed.md)."""
        import openvino as ov

        states = self._variables()
        fits = lambda b, c: tuple(b.shape) == c.concrete(batch) and b.data.dtype == _NP[c.dtype]  # noqa: E731
        known = self._copy_keys if self._copy_keys is not None and self._copy_keys[0] == batch else None
        binds, copies = [], []
        for c in self.manifest.caches:
            st = states[self._state_name(c)]
            if known is not None and c.key in known[1]:
                host = self._copy_bufs[c.key]
                binds.append((c, host))
                copies.append((st, host))
                continue
            b = st.state
            if not fits(b, c):
                if known is not None:  # the variables changed shape meanwhile: find the copies again
                    self._copy_keys = None
                    return self._bind_states(req, batch)
                st.state = ov.Tensor(np.zeros(c.concrete(batch), _NP[c.dtype]))
                b = st.state
                if not fits(b, c):
                    return None
            if known is not None or st.state.data.ctypes.data == b.data.ctypes.data:  # b (alive): the buffer
                binds.append((c, b))
            else:
                host = self._copy_bufs.get(c.key)
                if host is None or tuple(host.shape) != c.concrete(batch):
                    host = self._copy_bufs[c.key] = ov.Tensor(np.zeros(c.concrete(batch), _NP[c.dtype]))
                binds.append((c, host))
                copies.append((st, host))
        if known is None:
            self._copy_keys = (batch, frozenset(self._copy_bufs))
        for c, b in binds:
            req.set_tensor(c.output, b)
        return copies

    @staticmethod
    def _state_name(c: CacheSpec) -> str:
        return c.input + c.output  # MakeStateful names a variable <param name><result name>

    def step_impl(self, sample, timestep, cond, delta_scales) -> torch.Tensor:
        import openvino as ov

        if self._split:
            return self._run_parts("step", sample, timestep, cond, delta_scales)
        req = self.requests["step"]
        self._set_inputs(req, sample, timestep, cond)
        if delta_scales is not None:
            req.set_tensor("delta_scales", ov.Tensor(delta_scales))
        if self.cache_mode == "stateful":
            return self._run(req)
        return self._continue("step")

    def shallow_impl(self, sample, timestep, cond) -> torch.Tensor:
        if self._split:  # the deep part is not run: outer_out reads the feature its last run left in the link
            return self._run_parts("shallow", sample, timestep, cond)
        self._set_inputs(self.requests["shallow"], sample, timestep, cond)
        return self._continue("shallow")

    def _continue(self, role: str) -> torch.Tensor:
        """Ping-pong: the graph reads the current buffers it takes and writes the spare ones of what it writes,
        then those swap (the others keep what the last full call wrote)."""
        req = self.requests[role]
        (reads, writes), current, spare = self.manifest.cache_io(role), self.buffers.current, self.buffers.spare
        for c in reads:
            req.set_tensor(c.input, current[c.key])
        for c in writes:
            req.set_tensor(c.output, spare[c.key])
        out = self._run(req)
        self.buffers.swap(writes)  # this call's outputs are the next call's inputs
        return out

    def _feature_tensor(self):
        """The ov.Tensor holding the reuse feature: the link outer_out reads (cut graph), else the buffer."""
        return self.links[self._feature_link] if self._split else self.buffers.current[self.manifest.reuse.feature.key]

    def feature_impl(self) -> torch.Tensor:  # a view: the forecast copies it
        return torch.from_numpy(self._feature_tensor().data)

    def set_feature_impl(self, feature: torch.Tensor) -> None:  # the shallow call reads it and never writes it
        np.copyto(self._feature_tensor().data, feature.numpy(), casting="same_kind")

    def reset_impl(self) -> None:
        # stateful: the variables keep their buffers (reset_state() would empty them to [0, ...] and cost a
        # new allocation per trajectory); the next call is a prime, which rewrites every one of them
        self._direct = False

    def caches(self) -> dict[str, torch.Tensor]:
        if (not self.buffers and not self._direct) or self.batch_size is None:
            return {}
        if self.cache_mode == "stateful" and (self.calls > 1 or self._direct):
            states = self._variables()
            out = {c.key: torch.from_numpy(states[self._state_name(c)].state.data.astype(np.float32))
                   for c in self.manifest.caches}
            if self._split:
                out[self.manifest.reuse.feature.key] = torch.from_numpy(self.links[self._feature_link].data.copy())
            return out
        return {k: torch.from_numpy(v.data.astype(np.float32)) for k, v in self.buffers.current.items()}
