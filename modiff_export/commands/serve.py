"""`serve` (Triton Inference Server via PyTriton) and `package-triton` (a Triton model repository)."""
from __future__ import annotations

import click

from ..backends import BACKENDS
from ..sampling import SCHEDULER_CHOICES

QUEUE_SIZE = click.option("--max-queue-size", type=click.IntRange(0, 1_000_000), default=32, show_default=True,
                          help="Requests waiting for a batch (dynamic batcher queue); more are rejected at once "
                               "(HTTP 503 / gRPC UNAVAILABLE, 'Exceeds maximum queue size'). 0: unbounded.")
QUEUE_TIMEOUT = click.option("--queue-timeout-ms", type=click.IntRange(0, 86_400_000), default=0, show_default=True,
                             help="Reject a request that waited this long in the queue (0: no timeout; a request "
                                  "may ask for a shorter one with parameter `timeout`, microseconds).")


@click.command("serve")
@click.option("--graphs", type=click.Path(file_okay=False), default=None,
              help="Graph folder from `cli.py export` (--backend ort/openvino; with torch: its quant config).")
@click.option("--engines", type=click.Path(file_okay=False), default=None, help="Engine folder (--backend trt).")
@click.option("--backend", type=click.Choice(BACKENDS), default="ort", show_default=True,
              help="Runner behind the server.")
@click.option("--model", default=None, help="--backend torch: 'digits' or a diffusers UNet/DiT folder "
                                            "[default: digits].")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True,
              help="HTTP port (KServe v2 REST) on 127.0.0.1.")
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=None, help="gRPC port [default: --port + 1].")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="Prometheus metrics port [default: --port + 2].")
@click.option("--max-batch", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Triton max_batch_size: images per runner call.")
@click.option("--queue-delay-us", type=click.IntRange(0), default=5000, show_default=True,
              help="Dynamic batcher: max wait to fill a batch.")
@click.option("--max-steps", type=click.IntRange(1, 1000), default=100, show_default=True,
              help="Largest `steps` a request may ask for.")
@click.option("--scheduler", type=click.Choice(SCHEDULER_CHOICES), default="auto", show_default=True,
              help="Scheduler when a request names none (auto: ddim, or a flow model's own).")
@click.option("--instances", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Model instances (one runner each).")
@QUEUE_SIZE
@QUEUE_TIMEOUT
@click.option("--exit-timeout-s", type=click.IntRange(0, 3600), default=10, show_default=True,
              help="On SIGTERM/Ctrl-C: how long Triton drains in-flight requests before it exits.")
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True,
              help="Intra-op threads per ORT runner.")
@click.option("--pipeline", type=click.Path(exists=True, file_okay=False), default=None,
              help="Diffusers pipeline folder (tokenizer/, text_encoder/): adds a `prompt` BYTES [1] request input "
                   "encoded by its text encoder (guidance uncond: the empty prompt).")
def serve(graphs, engines, backend, model, port, grpc_port, metrics_port, max_batch, queue_delay_us, max_steps,
          scheduler, instances, max_queue_size, queue_timeout_ms, exit_timeout_s, threads, pipeline):
    """Serve model `modiff` with a real Triton Inference Server (PyTriton), on loopback only.

    \b
    Request:  seed INT64 [1], steps INT32 [1], optional scheduler BYTES [1]
              (+ guidance_scale FP32 [1], encoder_hidden_states FP32 [S, D] for conditional UNets,
              and prompt BYTES [1] with --pipeline; class-conditional models (DiT): class_label INT64 [1]
              in 0..num_classes-1, required, and guidance_scale FP32 [1] (uncond: the null class))
    Response: image FP32 [C, H, W] in [-1, 1]
    Health: GET /v2/health/live, /v2/health/ready, /v2/models/modiff/ready; metrics: GET :METRICS_PORT/metrics.
    Batched requests give exactly the images they give alone. Ctrl-C (or SIGTERM) stops the server.
    See docs/serving.md."""
    from ..serving.limits import ServingLimits
    from ..serving.triton_server import ServeConfig
    from ..serving.triton_server import serve as run_server

    folder = engines if backend == "trt" else graphs
    if backend == "trt" and graphs and not engines:
        folder = None
    cfg = ServeConfig(backend=backend, folder=folder, model=model, http_port=port, grpc_port=grpc_port or port + 1,
                      metrics_port=metrics_port or port + 2, max_batch=max_batch, queue_delay_us=queue_delay_us,
                      max_steps=max_steps, scheduler=scheduler, instances=instances, threads=threads, pipeline=pipeline,
                      limits=ServingLimits(max_queue_size=max_queue_size, queue_timeout_us=queue_timeout_ms * 1000),
                      exit_timeout_s=exit_timeout_s)

    def ready(models):
        m = models[0].meta
        click.echo(f"serving {m.name} [{backend}] as model 'modiff' on http://127.0.0.1:{cfg.http_port} "
                   f"(gRPC 127.0.0.1:{cfg.grpc_port}, metrics http://127.0.0.1:{cfg.metrics_port}/metrics); "
                   f"image {list(m.sample_shape)}; Ctrl-C to stop", err=True)

    run_server(cfg, on_ready=ready)
    click.echo("server stopped", err=True)


@click.command("package-triton")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default="model_repository", show_default=True,
              help="Repository folder to write.")
@click.option("--unet-backend", type=click.Choice(["onnxruntime", "tensorrt", "python"]), default=None,
              help="Backend of modiff_unet [default: onnxruntime for graph folders, tensorrt for engine folders]. "
                   "python: ORT inside Triton's Python backend (runs on the tritonserver bundled with "
                   "nvidia-pytriton).")
@click.option("--graphs", type=click.Path(exists=True, file_okay=False), default=None,
              help="With an engine folder: the graph folder it was built from (source of the merged graph).")
@click.option("--max-batch", type=click.IntRange(1, 256), default=8, show_default=True,
              help="max_batch_size of both models.")
@click.option("--max-steps", type=click.IntRange(1, 1000), default=100, show_default=True,
              help="Largest `steps` a request may ask for.")
@click.option("--scheduler", type=click.Choice(SCHEDULER_CHOICES), default="auto", show_default=True,
              help="Scheduler when a request names none (auto: ddim, or a flow model's own).")
@click.option("--instances", type=click.IntRange(1), default=1, show_default=True,
              help="modiff_unet instances (per GPU with --kind KIND_GPU).")
@click.option("--kind", type=click.Choice(["KIND_AUTO", "KIND_GPU", "KIND_CPU"]), default="KIND_AUTO",
              show_default=True,
              help="instance_group kind of modiff_unet.")
@QUEUE_SIZE
@QUEUE_TIMEOUT
@click.option("--max-inflight", type=click.IntRange(1, 100_000), default=64, show_default=True,
              help="Trajectories the sampler runs at once; more are rejected at once (UNAVAILABLE).")
@click.option("--sequence-idle-s", type=click.FloatRange(0.001, 86_400), default=60.0, show_default=True,
              help="A UNet sequence idle this long (a trajectory abandoned mid-way) is ended and its caches freed.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
def package_triton(src, out, unet_backend, graphs, max_batch, max_steps, scheduler, instances, kind, max_queue_size,
                   queue_timeout_ms, max_inflight, sequence_idle_s, overwrite):
    """Write a Triton model repository for SRC (graphs/<name>, or engines/<name> with --graphs): `modiff`
    (Python backend sampler: seed, steps -> image) calling `modiff_unet` (the UNet as one graph whose
    prime/step branch is chosen by the sequence START flag, every MoDiff cache as Triton implicit state).
    Deploy with `tritonserver --model-repository OUT`; see docs/serving.md."""
    from pathlib import Path

    from ..serving.limits import ServingLimits
    from ..serving.model_repository import PackageOptions, write_model_repository

    is_engine = (Path(src) / "build.json").is_file()
    opt = PackageOptions(unet_backend=unet_backend or ("tensorrt" if is_engine else "onnxruntime"), max_batch=max_batch,
                         max_steps=max_steps, default_scheduler=scheduler, unet_instances=instances, kind=kind,
                         limits=ServingLimits(max_queue_size=max_queue_size, queue_timeout_us=queue_timeout_ms * 1000,
                                              max_inflight=max_inflight,
                                              sequence_idle_us=max(1, round(sequence_idle_s * 1e6))))
    path = write_model_repository(src, out, opt, graphs=graphs, overwrite=overwrite)
    plan = "; build the plan: see modiff_unet/BUILD_PLAN.md" if opt.unet_backend == "tensorrt" else ""
    click.echo(f"wrote {path}/: modiff (python, sampler) -> modiff_unet ({opt.unet_backend}, sequence batching, "
               f"implicit state){plan}")


COMMANDS = [serve, package_triton]
