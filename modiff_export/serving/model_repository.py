"""`package-triton`: a Triton model repository for production servers (docs/serving.md).

    <out>/modiff/        Python backend (BLS): the sampler clients call with a seed -> image
    <out>/modiff_unet/   the UNet, one graph with prime and step selected by the sequence START flag,
                         every MoDiff cache as Triton implicit state (sequence batching, oldest strategy):
                           onnxruntime_onnx (graph folders), tensorrt_plan (engine folders: the plan is
                           built from the same merged graph on the target GPU), or python (ORT inside the
                           Python backend, caches per correlation id: for servers without the
                           onnxruntime backend, e.g. the tritonserver bundled with nvidia-pytriton)

Every config.pbtxt is built as Triton's own protobuf (tritonclient's model_config_pb2) and written with
text_format, so what is written parses on a server.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from ..errors import ModiffExportError
from ..fsutil import atomic_folder, check_writable
from ..manifest import Manifest, TensorSpec
from ..sampling import resolve_scheduler
from .limits import ServingLimits

SAMPLER, UNET = "modiff", "modiff_unet"
TEMPLATES = Path(__file__).parent / "triton_models"
TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int32": "TYPE_INT32", "int64": "TYPE_INT64"}
UNET_BACKENDS = ("onnxruntime", "tensorrt", "python")


class PackageError(ModiffExportError):
    pass


@dataclass(frozen=True)
class PackageOptions:
    unet_backend: str = "onnxruntime"   # onnxruntime | tensorrt | python
    max_batch: int = 8                  # UNet rows per execution (sequences batched together)
    max_steps: int = 100
    default_scheduler: str = "auto"  # resolved at packaging: ddim, or a flow model's own sampler
    unet_instances: int = 1
    sampler_instances: int = 1
    kind: str = "KIND_AUTO"             # instance_group kind of the UNet (KIND_GPU on GPU servers)
    limits: ServingLimits = ServingLimits()  # sampler queue bound/timeout, in-flight cap, sequence idle timeout


def _pb():
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2 as mc
    except ImportError as e:
        raise PackageError(f"package-triton needs tritonclient[grpc] for Triton's model_config protobuf "
                           f"({e})") from None
    return mc, text_format


def _dims(shape) -> list[int]:
    return [int(d) for d in shape[1:]]  # drop the batch axis (Triton adds it: max_batch_size > 0)


def unet_config(m: Manifest, opt: PackageOptions):
    """ModelConfig of the stateful UNet, read from the manifest."""
    mc, _ = _pb()
    c = mc.ModelConfig(name=UNET, max_batch_size=opt.max_batch)
    if opt.unet_backend == "onnxruntime":
        c.platform, c.default_model_filename = "onnxruntime_onnx", "model.onnx"
    elif opt.unet_backend == "tensorrt":
        c.platform, c.default_model_filename = "tensorrt_plan", "model.plan"
    else:
        c.backend = "python"
    for s in m.inputs:
        if len(s.shape) == 1:  # timestep, class_labels: [B] in the graph, [1] per request reshaped to a scalar
            c.input.add(name=s.name, data_type=TYPES[s.dtype], dims=[1], reshape=mc.ModelTensorReshape(shape=[]))
        else:
            c.input.add(name=s.name, data_type=TYPES[s.dtype], dims=_dims(s.shape))
    for s in m.outputs:
        c.output.add(name=s.name, data_type=TYPES[s.dtype], dims=_dims(s.shape))
    sb = c.sequence_batching
    sb.max_sequence_idle_microseconds = opt.limits.sequence_idle_us  # an abandoned sequence ends after this
    sb.oldest.max_candidate_sequences = 4 * opt.max_batch
    sb.oldest.preferred_batch_size.append(opt.max_batch)
    sb.oldest.max_queue_delay_microseconds = 2000
    K = mc.ModelSequenceBatching.Control
    sb.control_input.add(name="start", control=[K(kind=K.CONTROL_SEQUENCE_START, int32_false_true=[0, 1])])
    if opt.unet_backend == "python":  # the Python backend keeps the caches itself, by correlation id
        sb.control_input[0].name = "START"
        sb.control_input.add(name="END", control=[K(kind=K.CONTROL_SEQUENCE_END, int32_false_true=[0, 1])])
        sb.control_input.add(name="CORRID", control=[K(kind=K.CONTROL_SEQUENCE_CORRID, data_type=mc.TYPE_UINT64)])
        c.parameters["intra_op_threads"].string_value = "1"
        # the Python backend is not told when Triton ends an idle sequence: the model drops its caches itself
        c.parameters["sequence_idle_us"].string_value = str(opt.limits.sequence_idle_us)
    else:
        for cache in m.caches:
            dt, dims = TYPES[cache.dtype], _dims(cache.shape)
            sb.state.add(input_name=cache.input, output_name=cache.output, data_type=dt, dims=dims,
                         initial_state=[mc.ModelSequenceBatching.InitialState(data_type=dt, dims=dims, zero_data=True,
                                                                              name="zeros")])
    c.instance_group.add(count=opt.unet_instances, kind=getattr(mc.ModelInstanceGroup.Kind, opt.kind))
    return c


def sampler_config(m: Manifest, opt: PackageOptions):
    mc, _ = _pb()
    mm = m.model
    c = mc.ModelConfig(name=SAMPLER, backend="python", max_batch_size=opt.max_batch)
    c.input.add(name="seed", data_type=mc.TYPE_INT64, dims=[1])
    c.input.add(name="steps", data_type=mc.TYPE_INT32, dims=[1])
    c.input.add(name="scheduler", data_type=mc.TYPE_STRING, dims=[1], optional=True)
    cond = m.conditioning
    if cond.guided or cond.of_kind("guidance") is not None:
        c.input.add(name="guidance_scale", data_type=mc.TYPE_FP32, dims=[1], optional=True)
    for ci in cond:  # the named conditioning inputs a request may carry (models/conditioning.py)
        if ci.kind in ("embedding", "time_ids"):  # default: random content from the seed; time_ids the image size
            c.input.add(name=ci.name, data_type=mc.TYPE_FP32, dims=[int(d) for d in ci.shape] or [1], optional=True)
        elif ci.kind == "labels":  # optional for Triton: the sampler answers a missing label with its own error
            c.input.add(name="class_label", data_type=mc.TYPE_INT64, dims=[1], optional=True)
    c.output.add(name="image", data_type=mc.TYPE_FP32, dims=list(mm.sample_shape))
    c.dynamic_batching.max_queue_delay_microseconds = 5000
    opt.limits.fill_queue_policy(c.dynamic_batching.default_queue_policy)
    c.instance_group.add(count=opt.sampler_instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    default_scheduler = resolve_scheduler(opt.default_scheduler, dict(mm.scheduler_config))
    params = {"unet_model": UNET, "sample_shape": json.dumps(list(mm.sample_shape)),
              "ehs_shape": json.dumps([mm.encoder_seq_len, mm.cross_attention_dim]) if mm.conditional else "",
              "num_classes": "" if mm.num_classes is None else str(mm.num_classes),
              "max_steps": str(opt.max_steps), "default_scheduler": default_scheduler,
              "max_inflight": str(opt.limits.max_inflight), "masked": "1" if m.mask_input else "",
              "conditioning": json.dumps(cond.to_list()), "packed": "1" if mm.packed else ""}
    for k, v in params.items():
        c.parameters[k].string_value = v
    return c


def write_model_repository(src: str | Path, out: str | Path, opt: PackageOptions = PackageOptions(),
                           graphs: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write the repository for a graph folder (or an engine folder + the graph folder it was built from)."""
    from .merge_graph import merged_unet_model

    _, text_format = _pb()
    src, out = Path(src), Path(out)
    if (src / "build.json").is_file() and not any(src.glob("*.onnx")):  # an engine folder: graphs come from --graphs
        if opt.unet_backend != "tensorrt":
            raise PackageError(f"{src} is an engine folder: use --unet-backend tensorrt (and --graphs graphs/<name>)")
        if graphs is None:
            raise PackageError(f"{src}: engine folders hold separate prime/step plans; pass --graphs graphs/<name> "
                               "(the folder they were built from) to build the one START-selected plan")
    graph_folder = Path(graphs) if graphs is not None else src
    m = Manifest.load(graph_folder)
    check_writable(out, overwrite)
    model = merged_unet_model(graph_folder)
    with atomic_folder(out, overwrite) as tmp:
        for name, cfg in ((UNET, unet_config(m, opt)), (SAMPLER, sampler_config(m, opt))):
            (tmp / name / "1").mkdir(parents=True)
            (tmp / name / "config.pbtxt").write_text(text_format.MessageToString(cfg))
        unet_dir = tmp / UNET / "1"
        if opt.unet_backend == "tensorrt":
            onnx.save(model, str(tmp / UNET / "model.onnx"))  # outside the version folder: the plan goes in 1/
            (tmp / UNET / "BUILD_PLAN.md").write_text(plan_instructions(m, opt))
        else:
            onnx.save(model, str(unet_dir / "model.onnx"))
        if opt.unet_backend == "python":
            shutil.copyfile(TEMPLATES / "unet_python.py", unet_dir / "model.py")
            m.write(unet_dir)  # the Python-backend model reads its cache names from it
        shutil.copyfile(TEMPLATES / "sampler.py", tmp / SAMPLER / "1" / "model.py")
        sched = m.model.scheduler_config
        (tmp / SAMPLER / "1" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
    return out


def plan_instructions(m: Manifest, opt: PackageOptions) -> str:
    shapes = []
    for s in [*m.inputs, TensorSpec("start", ("batch", 1), "int32"), *(c.as_input() for c in m.caches)]:
        shapes.append((s.name, "x".join(str(int(d)) for d in s.shape[1:])))

    def prof(b):
        return ",".join(f"{n}:{b}" + (f"x{r}" if r else "") for n, r in shapes)
    return ("# Build model.plan on the target GPU (TensorRT version = the server's)\n\n"
            f"    trtexec --onnx=modiff_unet/model.onnx --saveEngine=modiff_unet/1/model.plan --int8 --fp16 \\\n"
            f"      --minShapes={prof(1)} \\\n      --optShapes={prof(opt.max_batch)} \\\n      "
            f"--maxShapes={prof(opt.max_batch)}\n")


# -- the bundled tritonserver (nvidia-pytriton), for tests and local checks ------------------------------
def local_tritonserver(repo: str | Path, http_port: int, grpc_port: int, metrics_port: int, models: list[str],
                       log: str | Path) -> tuple[subprocess.Popen, Path]:
    """Start nvidia-pytriton's tritonserver (Python backend only) on `repo`, loading `models`.
    Returns (process, scratch folder to delete after it exits)."""
    import sysconfig

    from pytriton.utils.distribution import get_libs_path, get_root_module_path

    from .triton_server import libpython_dir

    root = get_root_module_path() / "tritonserver"
    scratch = Path(tempfile.mkdtemp(prefix="modiff-tritonserver-"))
    backend = scratch / "backends" / "python"
    backend.mkdir(parents=True)
    for f in (root / "backends" / "python").iterdir():
        os.symlink(f, backend / f.name)
    ver = sysconfig.get_config_var("py_version_short")
    shutil.copy(root / "python_backend_stubs" / ver / "triton_python_backend_stub",
                backend / "triton_python_backend_stub")
    env = dict(os.environ, LD_LIBRARY_PATH=":".join([libpython_dir(), str(get_libs_path()),
                                                     os.environ.get("LD_LIBRARY_PATH", "")]),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    cmd = [str(root / "bin" / "tritonserver"), f"--model-repository={repo}",
           f"--backend-directory={scratch / 'backends'}",
           "--model-control-mode=explicit", *[f"--load-model={n}" for n in models],
           "--http-address=127.0.0.1", f"--http-port={http_port}",
           "--grpc-address=127.0.0.1", f"--grpc-port={grpc_port}",
           "--metrics-address=127.0.0.1", f"--metrics-port={metrics_port}",
           "--allow-gpu-metrics=false", "--exit-timeout-secs=10"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    return proc, scratch
