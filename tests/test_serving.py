"""`serve`: per-request sampling is batch-invariant, and a real Triton server (PyTriton) keeps concurrent
requests isolated (every image equals the same request computed alone, exactly)."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny_dit, build_tiny_unet
from reliability_util import run_cli
from serving_util import assert_label_errors, free_ports, needs_triton

from modiff_export import QuantConfig
from modiff_export.backends.ort_runner import OrtRunner
from modiff_export.export.trace import export_model
from modiff_export.models import LoadedModel, load_model
from modiff_export.sampling import Trajectories, generate, make_scheduler, sample_model
from modiff_export.serving.sampler import Item, RequestError, check_item, generate_items

ROOT = Path(__file__).resolve().parent.parent
SCHED = {"num_train_timesteps": 1000}
SHAPE = (1, 16, 16)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "tiny-w8a4"
    export_model(LoadedModel.from_unet(build_tiny_unet(), "tiny", SCHED), QuantConfig(act_bits=4), out, progress=False)
    return out


def test_group_is_the_generate_loop(graphs):
    """Same noise -> generate_items gives what sampling.generate gives (one trajectory, one batch)."""
    r = OrtRunner(graphs, threads=1)
    items = [Item(5, 6, "ddim"), Item(9, 6, "ddim")]
    noise = torch.cat([torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(it.seed)) for it in items])
    ref = generate(r, make_scheduler("ddim", SCHED), 6, 2, 0, SHAPE, progress=False, noise=noise)
    assert torch.equal(generate_items(r, SCHED, items, SHAPE), ref)


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])  # ddpm: per-request step noise from the request's generator
def test_mixed_batch_equals_solo(graphs, scheduler):
    r = OrtRunner(graphs, threads=1)
    items = [Item(1, 6, scheduler), Item(2, 4, scheduler), Item(3, 6, scheduler), Item(4, 4, scheduler), Item(5, 3,
                                                                                                              scheduler)]
    first_solo = generate_items(r, SCHED, [items[0]], SHAPE)
    batched = generate_items(r, SCHED, items, SHAPE, max_group=2)
    for i, it in enumerate(items):  # exact: per-sample scales, one generator per request, min batch 2
        assert torch.equal(batched[i], generate_items(r, SCHED, [it], SHAPE)[0]), i
    assert torch.equal(first_solo[0], generate_items(r, SCHED, [items[0]], SHAPE)[0])  # caches reset per group
    assert len({float(batched[i].abs().sum()) for i in range(5)}) == 5  # different seeds, different images


def test_bad_requests():
    for it, msg in [(Item(0, 0), "out of range"), (Item(0, 101), "out of range"), (Item(0, 5, "nope"),
                                                                                   "unknown scheduler"),
                    (Item(0, 5, "ddim", float("nan")), "finite"), (Item(0, 5, "ddim", 7.5), "conditional")]:
        with pytest.raises(RequestError, match=msg):
            check_item(it, 100, False, None)


@pytest.mark.slow  # a real Triton server: ~20 s; the slow set (.ci/run) runs it
def test_server_isolation_under_concurrency(graphs, tmp_path):
    """6 concurrent clients (HTTP + gRPC), two step counts, a long queue delay so Triton batches them;
    every image must equal the same request computed alone in this process, bit for bit."""
    needs_triton()
    from modiff_export.serving.client import Client, InferError, batch_stats, infer_concurrently, wait_ready
    from modiff_export.serving.process import start_serve, stop_server

    port = free_ports()
    proc = start_serve(str(graphs), port, max_batch=8, log=str(tmp_path / "server.log"),
                        extra=("--queue-delay-us", "300000", "--max-steps", "10"))
    try:
        wait_ready(port, proc)
        reqs = [(100 + k, 4 if k % 2 else 6) for k in range(6)]
        got, errors = infer_concurrently(port, reqs)
        assert not errors, errors
        n_req, n_exec = batch_stats(port + 2, expect=len(reqs))
        assert n_exec < n_req, "Triton never batched two requests; the test proves nothing"
        r = OrtRunner(graphs, threads=1)
        for k, (seed, steps) in enumerate(reqs):
            solo = generate_items(r, SCHED, [Item(seed, steps, "ddim")], SHAPE)[0].numpy()
            assert np.array_equal(got[k], solo), k
        with pytest.raises(InferError, match="out of range"):  # a bad request gets a clear error
            Client("http", port).infer(1, 11)
        with pytest.raises(InferError, match="class_label") as e:  # Triton's own: the input is not declared
            Client("http", port).infer(1, 5, class_label=3)
        assert e.value.kind == "bad_request"
    finally:
        rc = stop_server(proc, signal.SIGTERM) if proc.poll() is None else proc.returncode
    assert rc == 0 and "server stopped" in (tmp_path / "server.log").read_text()


def test_port_in_use_is_one_error_line(graphs):
    needs_triton()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = subprocess.run([sys.executable, "cli.py", "serve", "--graphs", str(graphs), "--port", str(port)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: cannot listen on 127.0.0.1:{port}")


def test_openvino_backend_serves_like_ort(graphs):
    """`serve --backend openvino` loads the same graph folder behind the same runner contract; its prime call
    equals ONNX Runtime's up to the precision it runs at: OpenVINO's prime runs at the plugin's default
    precision (bf16 on CPUs with BF16: 8 significant bits), so rms(ov - ort) <= 2% of rms(ort), the bound
    of tests/test_runner_contract.py (steps are covered by tests/test_openvino.py)."""
    from modiff_export.serving.triton_server import ServeConfig, load_runner

    ov, meta = load_runner(ServeConfig(backend="openvino", folder=str(graphs)))
    ort, _ = load_runner(ServeConfig(backend="ort", folder=str(graphs)))
    assert ov.backend == "openvino" and ov.is_active
    x = torch.randn(2, *meta.sample_shape, generator=torch.Generator().manual_seed(3))  # [B, C, H, W]
    a, b = ort(x, 900.0), ov(x, 900.0)
    rms = lambda t: t.pow(2).mean().sqrt()  # noqa: E731
    assert rms(a - b) <= 2e-2 * rms(a)


def test_missing_libpython_is_a_clear_error(monkeypatch):
    from modiff_export.serving import triton_server

    real = triton_server.sysconfig.get_config_var
    monkeypatch.setattr(triton_server.sysconfig, "get_config_var",
                        lambda k: "libpython3.11.a" if k == "LDLIBRARY" else real(k))  # a static-only Python build
    with pytest.raises(triton_server.ServeError, match="no shared libpython"):
        triton_server.libpython_dir()


# -- class-conditional models (DiT, issue 19) -----------------------------------------------------------
def export_tiny_dit(root: Path) -> tuple[Path, Path]:
    """(model folder, W8A4 graph folder) of a tiny random DiTTransformer2DModel (10 classes, 1x8x8),
    exported with the CLI."""
    build_tiny_dit().save_pretrained(root / "dit", safe_serialization=True)
    (root / "dit" / "scheduler_config.json").write_text('{"_class_name": "DDPMScheduler", "num_train_timesteps": 1000}')
    code, _, err = run_cli(["export", "--model", root / "dit", "--act-bits", "4", "--out", root / "dit-w8a4",
                            "--quiet"])
    assert code == 0, err[-2000:]
    return root / "dit", root / "dit-w8a4"


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    return export_tiny_dit(tmp_path_factory.mktemp("serve-dit"))


def dit_reference(model_folder, graphs, seed: int, label: int, guidance: float, steps: int = 5) -> torch.Tensor:
    """What `sample` computes for one image: sampling.sample_model with the ORT runner, batch 1."""
    m = load_model(str(model_folder))
    traj = Trajectories(steps=steps, samples=1, batch_size=1, seed=seed, labels=(label,), guidance_scale=guidance)
    return sample_model(m, QuantConfig(act_bits=4), traj, progress=False, runner=OrtRunner(graphs, threads=1))[0]


def assert_like_sample_model(got, ref, guidance: float) -> None:
    """Served == sample_model. With guidance both run the runner at batch >= 2 (the doubled batch): exact.
    Without, sample_model's batch of 1 takes ORT's M = 1 GEMM path on the [B]-row Linears (timestep and
    class embeddings, adaLN), the server's batch of 2 (MIN_BATCH) the M >= 2 one: float ulps that MoDiff's
    rounding may turn into a flipped code; measured 3.6e-6 max abs here (images in [-1, 1]), bound 1e-4."""
    got, ref = torch.tensor(np.array(got)), torch.tensor(np.array(ref))
    if guidance != 1.0:
        assert torch.equal(got, ref)
    else:
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_dit_items_equal_sample_model(dit, guidance):
    """Per-request labels (and the null class under guidance) give what `sample --labels` gives; batched
    requests with other labels and seeds give what they give alone, exactly."""
    model_folder, graphs = dit
    r = OrtRunner(graphs, threads=1)
    m = load_model(str(model_folder))
    items = [Item(3, 5, "ddim", guidance, class_label=7), Item(4, 5, "ddim", guidance, class_label=2),
             Item(5, 5, "ddim", guidance, class_label=7)]
    batched = generate_items(r, m.scheduler_config, items, m.sample_shape, num_classes=10)
    for i, it in enumerate(items):
        solo = generate_items(r, m.scheduler_config, [it], m.sample_shape, num_classes=10)[0]
        assert torch.equal(batched[i], solo), i
        assert_like_sample_model(solo, dit_reference(model_folder, graphs, it.seed, it.class_label, guidance),
                                 guidance)
    other = generate_items(r, m.scheduler_config, [Item(3, 5, "ddim", guidance, class_label=1)], m.sample_shape,
                           num_classes=10)[0]
    assert (other - batched[0]).abs().max() > 1e-2  # the label changes the image


def test_dit_bad_requests(dit):
    """One clear error each: a label outside 0..num_classes-1 (the null class 10 included: it is the
    server's), a missing label, a label for a model without classes; the same through serve's parser."""
    from modiff_export.serving.pytriton_errors import ERROR_OUTPUT
    from modiff_export.serving.triton_server import ModiffModel, ServeConfig, load_runner

    for it, msg in [(Item(0, 5, class_label=10), r"outside 0\.\.9"), (Item(0, 5, class_label=-1), r"outside 0\.\.9"),
                    (Item(0, 5), "'class_label' is missing")]:
        with pytest.raises(RequestError, match=msg):
            check_item(it, 100, False, None, num_classes=10)
    with pytest.raises(RequestError, match="not class-conditional"):
        check_item(Item(0, 5, class_label=3), 100, False, None)
    check_item(Item(0, 5, "ddim", 4.0, class_label=9), 100, False, None, num_classes=10)  # guidance is fine
    cfg = ServeConfig(folder=str(dit[1]), max_steps=10)
    served = ModiffModel(*load_runner(cfg), cfg)
    req = {"seed": np.array([[1]], np.int64), "steps": np.array([[3]], np.int32)}
    bad = served.infer([req, {**req, "class_label": np.array([[10]], np.int64)},
                        {**req, "class_label": np.array([[3]], np.int64)}])
    msg = [json.loads(r[ERROR_OUTPUT].reshape(-1)[0])["message"] if ERROR_OUTPUT in r else None for r in bad]
    assert "'class_label' is missing" in msg[0] and "outside 0..9" in msg[1] and msg[2] is None
    assert bad[2]["image"].shape == (1, 1, 8, 8)


@pytest.mark.slow  # a real Triton server: ~20 s; the slow set (.ci/run) runs it
def test_dit_served_through_triton(dit, tmp_path):
    """`cli.py serve --graphs <DiT>`: concurrent requests with labels (and guidance) over HTTP and gRPC give
    what sample_model gives; bad labels are one bad_request line; a label to an unconditional server too."""
    needs_triton()
    from modiff_export.serving.client import Client, infer_concurrently, wait_ready
    from modiff_export.serving.process import start_serve, stop_server

    model_folder, dit_graphs = dit
    port = free_ports()
    proc = start_serve(str(dit_graphs), port, max_batch=8, log=str(tmp_path / "server.log"),
                       extra=("--queue-delay-us", "300000", "--max-steps", "10"))
    try:
        wait_ready(port, proc)
        reqs = [(20, 5, None, {"class_label": 7}),
                (21, 5, None, {"class_label": 2, "guidance_scale": (np.float32([3.0]), "FP32")})]
        got, errors = infer_concurrently(port, reqs)
        assert not errors, errors
        assert_like_sample_model(got[0], dit_reference(model_folder, dit_graphs, 20, 7, 1.0), 1.0)
        assert_like_sample_model(got[1], dit_reference(model_folder, dit_graphs, 21, 2, 3.0), 3.0)
        c = Client("http", port)
        np.testing.assert_array_equal(c.infer(20, 5, class_label=7), got[0])
        assert_label_errors(c)
    finally:
        rc = stop_server(proc, signal.SIGTERM) if proc.poll() is None else proc.returncode
    assert rc == 0
