"""`serve`: MoDiff behind a real Triton Inference Server, started by PyTriton (nvidia-pytriton).

Triton owns the network side (HTTP/REST and gRPC KServe v2 endpoints, health/readiness, Prometheus
metrics, dynamic batching, request queueing); PyTriton forwards each batch Triton forms to
`ModiffModel.infer` in this process, which runs the runner (ort, openvino, trt or torch).

Model `modiff`:
  inputs   seed            INT64 [1]
           steps           INT32 [1]       1 .. max_steps
           scheduler       BYTES [1]       optional, default --scheduler (ddim, ddpm, dpmpp, ...)
           guidance_scale  FP32  [1]       optional, conditional and class-conditional models only (default 1.0)
           encoder_hidden_states FP32 [S, D]  optional, conditional UNets only (default: random from the seed)
           class_label     INT64 [1]       class-conditional models (DiT) only, required: 0 .. num_classes-1
                                           (guidance's uncond is the null class num_classes, added here)
           <name>          FP32 [...]      every other named conditioning input of the manifest, optional
                                           (SDXL text_embeds [P] / time_ids [6], SD3/FLUX pooled_projections
                                           [P]; default: random from the seed, time_ids the image size)
  output   image           FP32  [C, H, W] in [-1, 1]

Every request is answered on its own: a bad one gets its own error (INVALID_ARG: HTTP 400 / gRPC
INVALID_ARGUMENT, one line), the others of its batch their images (pytriton_errors.py). The dynamic
batcher's queue is bounded (limits.py): beyond it Triton rejects at once (UNAVAILABLE, HTTP 503).
SIGTERM/SIGINT: Triton stops taking requests and drains those in flight for up to `exit_timeout_s`.
"""
from __future__ import annotations

import os
import signal
import socket
import sysconfig
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ModiffExportError
from ..models.denoiser import ENCODER_STATES
from ..sampling import SamplingError, resolve_scheduler
from .limits import ServingLimits
from .pytriton_errors import ERROR_OUTPUT, INTERNAL, INVALID_ARG, error_response, per_request_errors
from .sampler import Item, RequestError, check_item, generate_items

MODEL_NAME = "modiff"
LOOPBACK = "127.0.0.1"


class ServeError(ModiffExportError, RuntimeError):
    """The server cannot start (port in use, libpython missing, PyTriton missing, bad folder)."""


@dataclass(frozen=True)
class ServeConfig:
    backend: str = "ort"
    folder: str | None = None         # graphs/<name> (ort, openvino) or engines/<name> (trt)
    model: str | None = None          # torch backend: 'digits' or a diffusers folder
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 8                # Triton max_batch_size (images per runner call, x2 with guidance)
    queue_delay_us: int = 5000        # dynamic batcher: how long Triton waits to fill a batch
    max_steps: int = 100
    scheduler: str = "auto"           # default when a request has no `scheduler` (auto: ddim, or a flow model's own)
    instances: int = 1                # model instances (one runner each)
    threads: int = 1                  # intra-op threads per runner (ort)
    pipeline: str | None = None       # diffusers pipeline folder: its text encoder serves the `prompt` input
    limits: ServingLimits = ServingLimits()  # queue bound and queue timeout of the dynamic batcher
    exit_timeout_s: int = 10          # SIGTERM/SIGINT: how long Triton drains in-flight requests

    def __post_init__(self) -> None:
        if isinstance(self.exit_timeout_s, bool) or not isinstance(self.exit_timeout_s, int) or self.exit_timeout_s < 0:
            raise ServeError(f"ServeConfig.exit_timeout_s={self.exit_timeout_s!r} must be an integer >= 0")


# -- runner + request handling (no PyTriton here: tests call it directly) ------------------------------
class ModiffModel:
    """One model instance: a runner and the metadata to serve it. `infer` takes PyTriton requests
    (dicts of numpy arrays, each with a leading request-batch axis) and returns one dict per request:
    {"image": [n, C, H, W]}, or error_response(...) for a request that cannot be served."""

    def __init__(self, runner, meta, cfg: ServeConfig, prompts=None):
        self.runner, self.meta, self.cfg, self.prompts = runner, meta, cfg, prompts
        self.ehs_shape = (meta.encoder_seq_len, meta.cross_attention_dim) if meta.conditional else None
        self.num_classes = meta.num_classes  # class-conditional models: requests carry class_label
        if prompts is not None and tuple(prompts.shape) != tuple(self.ehs_shape or ()):
            raise ServeError(f"the pipeline's text encoder gives {list(prompts.shape)} states; the UNet takes "
                             f"{list(self.ehs_shape) if self.ehs_shape else 'none (unconditional)'}")
        self.lock = threading.Lock()  # one trajectory at a time per runner (its caches)
        self.batches: deque[int] = deque(maxlen=1000)  # images per recent infer call (tests, debugging)

    def parse(self, req) -> list[Item]:
        def arr(name, dtype, required=True):
            if name not in req:
                if required:
                    raise RequestError(f"input {name!r} is missing")
                return None
            a = np.asarray(req[name])
            if a.dtype != dtype and not (dtype is object and a.dtype.kind in "SO"):
                raise RequestError(f"input {name!r} must be {np.dtype(dtype).name}, got {a.dtype.name}")
            return a

        known = {"seed", "steps", "scheduler", "guidance_scale", "encoder_hidden_states", "prompt", "class_label",
                 *(c.name for c in request_inputs(self.meta))}
        unknown = sorted(set(req) - known)
        if unknown:
            raise RequestError(f"input {unknown[0]!r} is not one this model takes (inputs: {', '.join(sorted(known))})")
        seed = arr("seed", np.int64).reshape(-1)
        n = seed.shape[0]
        steps = arr("steps", np.int32).reshape(-1)
        sched = arr("scheduler", object, required=False)
        gs = arr("guidance_scale", np.float32, required=False)
        ehs = arr("encoder_hidden_states", np.float32, required=False)
        prompt = arr("prompt", object, required=False)
        label = arr("class_label", np.int64, required=False)
        if label is not None and label.size != n:
            raise RequestError(f"'class_label' has {label.size} values for {n} seeds")
        extra = {c.name: arr(c.name, np.float32, required=False) for c in request_inputs(self.meta)}
        extra = {k: v for k, v in extra.items() if v is not None}
        for k, v in extra.items():
            if v.shape[0] != n:
                raise RequestError(f"{k!r} has {v.shape[0]} values for {n} seeds")
        negative = None
        if prompt is not None:
            if self.prompts is None:
                raise RequestError("input 'prompt' needs a server started with --pipeline (a text encoder)")
            if ehs is not None:
                raise RequestError("send 'prompt' or 'encoder_hidden_states', not both")
            texts = [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t) for t in prompt.reshape(-1)]
            if len(texts) != n:
                raise RequestError(f"'prompt' has {len(texts)} values for {n} seeds")
            ehs = self.prompts.encode(texts).numpy()  # [n, S, D]
            negative = self.prompts.negative
        if steps.shape[0] != n:
            raise RequestError(f"'steps' has {steps.shape[0]} values for {n} seeds")
        items = []
        for i in range(n):
            name = self.cfg.scheduler if sched is None else sched.reshape(-1)[i]
            name = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
            try:  # "auto" becomes the model's own sampler; one that does not fit its training objective is refused
                name = resolve_scheduler(name, self.meta.scheduler_config)
            except SamplingError as e:
                raise RequestError(str(e)) from None
            it = Item(int(seed[i]), int(steps[i]), name, 1.0 if gs is None else float(gs.reshape(-1)[i]),
                      None if ehs is None else torch.from_numpy(np.array(ehs[i], dtype=np.float32)), negative,
                      None if label is None else int(label.reshape(-1)[i]),
                      {k: torch.from_numpy(np.array(v[i], dtype=np.float32)) for k, v in extra.items()} or None)
            check_item(it, self.cfg.max_steps, self.meta.conditional, self.ehs_shape, self.num_classes,
                       self.meta.conditioning)
            items.append(it)
        return items

    def infer(self, requests) -> list[dict]:
        """One response per request. A bad request (RequestError) gets its own INVALID_ARG error and adds
        nothing to the computation; the others get exactly the images they get alone. If the runner
        fails, each request of the batch gets an INTERNAL error with the one-line reason."""
        parsed: list = []  # per request: its items, or its error response
        for req in requests:
            try:
                parsed.append(self.parse(req))
            except RequestError as e:
                parsed.append(error_response(INVALID_ARG, str(e)))
        items = [it for p in parsed if isinstance(p, list) for it in p]
        images = None
        if items:
            try:
                with self.lock:
                    per_call = self.cfg.max_batch // (2 if any(it.guidance_scale != 1.0 for it in items) else 1)
                    images = generate_items(self.runner, self.meta.scheduler_config, items, self.meta.sample_shape,
                                            self.ehs_shape, max_group=max(1, per_call),
                                            num_classes=self.num_classes,
                                            conditioning=self.meta.conditioning).numpy()  # [N, C, H, W]
                    self.batches.append(len(items))
            except Exception as e:  # noqa: BLE001 (any runner failure: every request gets it, the server goes on)
                first = (str(e).strip().splitlines() or [""])[0]
                why = f"{type(e).__name__}: {first}" if first else type(e).__name__
                return [p if isinstance(p, dict) else error_response(INTERNAL, f"inference failed: {why}")
                        for p in parsed]
        out, s = [], 0
        for p in parsed:
            if isinstance(p, dict):
                out.append(p)
            else:
                out.append({"image": images[s:s + len(p)]})
                s += len(p)
        return out


def load_runner(cfg: ServeConfig):
    """(runner, model meta) for the configured backend (modiff_export/resolve.py: torch with --graphs is the
    PyTorch reference of that folder, weights included); any problem raises a ModiffExportError."""
    from ..config import QuantConfig
    from ..resolve import RunnerOptions, resolve_runner

    # OpenVINO: dynamic batch shapes, since the dynamic batcher groups a varying number of requests per call
    # (static shapes would recompile the graphs for every new group size)
    kwargs = {"ort": (("threads", cfg.threads),), "openvino": (("static_shapes", False),)}.get(cfg.backend, ())
    opts = RunnerOptions(cfg.backend, cfg.model, cfg.folder, runner_kwargs=kwargs)
    resolved = resolve_runner(opts, QuantConfig() if cfg.backend == "torch" and cfg.folder is None else None)
    resolved.runner.activate()
    return resolved.runner, resolved.model


# -- the Triton side ---------------------------------------------------------------------------------
def libpython_dir() -> str:
    """The folder holding this interpreter's shared libpython, which the Python-backend stub needs."""
    libdir, name = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY") or ""
    if not libdir or not name.endswith(".so") and ".so." not in name or not (Path(libdir) / name).exists():
        raise ServeError(f"this Python ({sysconfig.get_config_var('VERSION')}) has no shared libpython "
                         f"({libdir}/{name}); Triton's Python backend needs one: use a Python built with "
                         f"--enable-shared")
    return libdir


def check_ports(*ports: int) -> None:
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((LOOPBACK, port))
            except OSError as e:
                raise ServeError(f"cannot listen on {LOOPBACK}:{port} ({e.strerror}); pick free ports with "
                                 "--port/--grpc-port/--metrics-port") from None


def request_inputs(meta) -> list:
    """The named conditioning inputs a request may carry beside seed, steps, scheduler, guidance_scale,
    encoder_hidden_states and class_label (models/conditioning.py): content inputs, masks and time_ids."""
    return [c for c in meta.conditioning if c.kind in ("embedding", "time_ids", "mask") and c.name != ENCODER_STATES]


def triton_inputs_outputs(meta, prompts: bool = False):
    from pytriton.model_config import Tensor

    c, h, w = meta.sample_shape
    inputs = [Tensor(name="seed", dtype=np.int64, shape=(1,)), Tensor(name="steps", dtype=np.int32, shape=(1,)),
              Tensor(name="scheduler", dtype=bytes, shape=(1,), optional=True)]
    if meta.conditional or meta.num_classes is not None or meta.conditioning.of_kind("guidance") is not None:
        inputs.append(Tensor(name="guidance_scale", dtype=np.float32, shape=(1,), optional=True))
    if meta.conditional:
        inputs.append(Tensor(name="encoder_hidden_states", dtype=np.float32,
                             shape=(meta.encoder_seq_len, meta.cross_attention_dim), optional=True))
    if meta.num_classes is not None:  # optional for Triton: a missing label gets check_item's error line
        inputs.append(Tensor(name="class_label", dtype=np.int64, shape=(1,), optional=True))
    for c in request_inputs(meta):  # SDXL text_embeds / time_ids, SD3 and FLUX pooled_projections, ...
        inputs.append(Tensor(name=c.name, dtype=np.float32, shape=c.shape, optional=True))
    if prompts:
        inputs.append(Tensor(name="prompt", dtype=bytes, shape=(1,), optional=True))
    # ERROR_OUTPUT is never sent: a response holding it becomes that request's error (pytriton_errors.py)
    return inputs, [Tensor(name="image", dtype=np.float32, shape=(c, h, w)),
                    Tensor(name=ERROR_OUTPUT, dtype=bytes, shape=(1,))]


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def serve(cfg: ServeConfig, on_ready=None) -> None:
    """Start Triton, serve until SIGINT/SIGTERM, stop cleanly. `on_ready(models)` runs once serving."""
    os.environ["LD_LIBRARY_PATH"] = ":".join(p for p in (libpython_dir(), os.environ.get("LD_LIBRARY_PATH")) if p)
    try:
        from pytriton.decorators import batch  # noqa: F401  (import check only)
        from pytriton.model_config import DynamicBatcher, ModelConfig
        from pytriton.triton import Triton, TritonConfig
    except ImportError as e:
        raise ServeError(f"PyTriton is not installed ({e}); pip install nvidia-pytriton") from None
    check_ports(cfg.http_port, cfg.grpc_port, cfg.metrics_port)
    encoder = None
    if cfg.pipeline:
        from ..models.prompts import PromptEncoder

        encoder = PromptEncoder(cfg.pipeline)  # shared by the instances: inference only, no state
    models = []
    for _ in range(cfg.instances):
        runner, meta = load_runner(cfg)
        models.append(ModiffModel(runner, meta, cfg, encoder))
    inputs, outputs = triton_inputs_outputs(models[0].meta, prompts=encoder is not None)
    tcfg = TritonConfig(http_address=LOOPBACK, http_port=cfg.http_port, grpc_address=LOOPBACK, grpc_port=cfg.grpc_port,
                        metrics_address=LOOPBACK, metrics_port=cfg.metrics_port, allow_gpu_metrics=False,
                        exit_timeout_secs=cfg.exit_timeout_s)
    # SIGTERM (docker stop, systemd, kill) stops the server the way Ctrl-C does
    previous = signal.signal(signal.SIGTERM, _interrupt)
    triton = Triton(config=tcfg)
    try:
        try:
            batcher = DynamicBatcher(max_queue_delay_microseconds=cfg.queue_delay_us,
                                     default_queue_policy=cfg.limits.pytriton_queue_policy())
            with per_request_errors():
                triton.bind(model_name=MODEL_NAME, infer_func=[m.infer for m in models], inputs=inputs,
                            outputs=outputs, config=ModelConfig(max_batch_size=cfg.max_batch, batcher=batcher),
                            strict=True)
                triton.run()  # loads the model: PyTriton sends the (patched) proxy files now
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 (PyTriton/tritonserver start failures: one line, details in the log above)
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise ServeError(f"Triton Inference Server did not start: {msg}") from None
        if on_ready is not None:
            on_ready(models)
        triton.serve()  # blocks; returns on SIGINT/SIGTERM (KeyboardInterrupt) or if Triton dies
    except KeyboardInterrupt:
        pass
    finally:
        triton.stop()
        signal.signal(signal.SIGTERM, previous)
        for m in models:
            m.runner.deactivate()
