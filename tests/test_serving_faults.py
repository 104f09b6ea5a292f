"""Issue 20: `serve` and the model repository under bad requests, overload, abandoned sequences and
signals. Each test starts a real Triton server (PyTriton or the bundled tritonserver) on free loopback
ports and drives it with tritonclient (modiff_export/serving/client.py, deadlines on every call)."""
from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny_cond_unet, build_tiny_unet
from serving_util import free_ports, needs_triton, repository_server, wait_port_free

from modiff_export import QuantConfig
from modiff_export.backends.ort_runner import OrtRunner
from modiff_export.export.trace import export_model
from modiff_export.models import LoadedModel
from modiff_export.serving.sampler import Item, generate_items

pytestmark = pytest.mark.slow  # every test starts a real Triton server (12-33 s each); .ci/run's slow set runs them

SCHED = {"num_train_timesteps": 1000}
SHAPE = (1, 16, 16)
EHS = (77, 32)  # build_tiny_cond_unet's encoder states


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "tiny-w8a4"
    export_model(LoadedModel.from_unet(build_tiny_unet(), "tiny", SCHED), QuantConfig(act_bits=4), out, progress=False)
    return out


def _solo(graphs, item: Item, ehs_shape=None, shape=SHAPE) -> np.ndarray:
    return generate_items(OrtRunner(graphs, threads=1), SCHED, [item], shape, ehs_shape)[0].numpy()


class _Server:
    """`cli.py serve` on free ports as a child process (log in tmp_path)."""

    def __init__(self, graphs, tmp_path, *extra, port=None, max_batch=8, name="server"):
        from modiff_export.serving.client import wait_ready
        from modiff_export.serving.process import start_serve

        needs_triton()
        self.port, self.log = port or free_ports(), tmp_path / f"{name}.log"
        self.proc = start_serve(str(graphs), self.port, max_batch=max_batch, log=str(self.log), extra=extra)
        wait_ready(self.port, self.proc, timeout=180)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        from modiff_export.serving.process import stop_server

        stop_server(self.proc, signal.SIGTERM)


def _timed(port, reqs, timeout_s=120.0):
    """Every request at once (even index HTTP, odd gRPC): {k: (image or InferError, seconds, perf_counter
    when answered)}."""
    from modiff_export.serving.client import Client, InferError

    out, lock = {}, threading.Lock()

    def worker(k):
        seed, steps, *rest = reqs[k]
        sched, extra = (list(rest) + [None, None])[:2]
        cl = Client("http", port, timeout_s=timeout_s) if k % 2 == 0 else Client("grpc", port + 1, timeout_s=timeout_s)
        t0 = time.perf_counter()
        try:
            res = cl.infer(seed, steps, sched, **(extra or {}))
        except InferError as e:
            res = e
        with lock:
            out[k] = (res, time.perf_counter() - t0, time.perf_counter())
        cl.close()

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s + 30)
    assert not any(t.is_alive() for t in threads), "a client hung past its deadline"
    return out


def test_bad_requests_in_a_batch_get_their_own_errors(tmp_path_factory, tmp_path):
    """8 requests, 4 of them bad, batched into one execution (max batch 8, 5 s queue delay: Triton runs
    the batch when it is full): each bad one gets its own 400 / INVALID_ARGUMENT with one clear line,
    each good one its image, bit for bit the solo computation."""
    from modiff_export.serving.client import Client, InferError, batch_stats

    graphs = tmp_path_factory.mktemp("faults_cond") / "tiny-cond-w8a4"
    model = LoadedModel.from_unet(build_tiny_cond_unet(), "tinyc", SCHED)
    export_model(model, QuantConfig(act_bits=4), graphs, progress=False)
    # Triton batches only requests with the same inputs: every request sends all five
    states = torch.randn(8, *EHS, generator=torch.Generator().manual_seed(0)).numpy()
    states[5, 3, 4] = np.nan
    spec = [(1, 3, "ddim", 1.0), (2, 0, "ddim", 1.0), (3, 4, "ddim", 2.0), (4, 3, "nope", 1.0),
            (5, 3, "ddim", float("nan")), (6, 3, "ddim", 1.0), (7, 3, "ddpm", 1.0), (8, 4, "ddim", 1.0)]
    reqs = [(seed, steps, sched, {"guidance_scale": (np.float32([g]), "FP32"),
                                  "encoder_hidden_states": (states[k], "FP32")})
            for k, (seed, steps, sched, g) in enumerate(spec)]
    bad = {1: "steps=0 out of range", 3: "unknown scheduler 'nope'", 4: "is not a finite number",
           5: "encoder_hidden_states contains NaN"}
    with _Server(graphs, tmp_path, "--queue-delay-us", "5000000", "--max-steps", "10") as srv:
        got = _timed(srv.port, reqs)
        n_req, n_exec = batch_stats(srv.port + 2, expect=len(reqs) - len(bad))
        assert n_exec == 1, f"Triton ran {n_exec} executions for {n_req} requests: the bad and good were not batched"
        wrong_shape = np.zeros((7, 32), np.float32)  # refused by Triton itself, before any batch
        with pytest.raises(InferError, match="unexpected shape for input 'encoder_hidden_states'") as e:
            Client("http", srv.port).infer(9, 3, encoder_hidden_states=(wrong_shape, "FP32"))
        assert e.value.kind == "bad_request"
    for k, phrase in bad.items():
        err = got[k][0]
        assert isinstance(err, InferError) and err.kind == "bad_request", (k, err)
        assert phrase in err.message and "\n" not in err.message and "Traceback" not in err.message, err.message
        assert err.status == ("400" if k % 2 == 0 else "StatusCode.INVALID_ARGUMENT"), err.status
    for k in sorted(set(range(len(reqs))) - set(bad)):
        seed, steps, sched, g = spec[k]
        img = got[k][0]
        assert isinstance(img, np.ndarray), (k, img)
        solo = _solo(graphs, Item(seed, steps, sched, g, torch.from_numpy(states[k])), EHS, model.sample_shape)
        np.testing.assert_array_equal(img, solo, err_msg=str(k))


def test_overload_is_rejected_at_once_and_accepted_requests_stay_exact(graphs, tmp_path):
    """Queue of 2, batches of 2, 12 requests at once: some are refused at once with 503 / UNAVAILABLE
    'Exceeds maximum queue size', faster than any accepted request was answered; the accepted are exact."""
    from modiff_export.serving.client import InferError

    reqs = [(20 + k, 30) for k in range(12)]
    with _Server(graphs, tmp_path, "--max-queue-size", "2", "--queue-delay-us", "0", "--max-steps", "30",
                 max_batch=2) as srv:
        got = _timed(srv.port, reqs)
    rejected = {k: v for k, v in got.items() if isinstance(v[0], InferError)}
    accepted = {k: v for k, v in got.items() if isinstance(v[0], np.ndarray)}
    assert rejected and len(accepted) >= 2, {k: str(v[0])[:80] for k, v in got.items()}
    for k, (err, _, _) in rejected.items():
        assert err.kind == "busy" and "Exceeds maximum queue size" in err.message, err
        assert err.status == ("503" if k % 2 == 0 else "StatusCode.UNAVAILABLE"), err.status
    assert max(v[1] for v in rejected.values()) < max(v[1] for v in accepted.values())
    for k, (img, _, _) in accepted.items():
        np.testing.assert_array_equal(img, _solo(graphs, Item(*reqs[k])), err_msg=str(k))


def test_sigterm_drains_in_flight_requests(graphs, tmp_path):
    """SIGTERM while 4 long requests run: all 4 are answered with their exact images, those still in flight after
    the signal, then the server exits 0 ('server stopped')."""
    from modiff_export.serving.process import stop_server

    reqs = [(40 + k, 1000) for k in range(4)]  # one batch of 4 x 1000 steps: 3.4 s on a VNNI EPYC core
    srv = _Server(graphs, tmp_path, "--max-steps", "1000", "--exit-timeout-s", "60")
    res = {}
    t = threading.Thread(target=lambda: res.update(_timed(srv.port, reqs, timeout_s=90)), daemon=True)
    t.start()
    time.sleep(1.0)  # in flight: the batch takes seconds (1.36 s at 400 steps, so 200 steps could end before 1.5 s)
    t_term = time.perf_counter()
    rc = stop_server(srv.proc, signal.SIGTERM, timeout=90)
    t.join(100)
    assert rc == 0 and "server stopped" in srv.log.read_text()
    assert len(res) == 4
    for k, (img, _, _) in res.items():
        assert isinstance(img, np.ndarray), (k, img)
        np.testing.assert_array_equal(img, _solo(graphs, Item(*reqs[k])), err_msg=str(k))
    # sent before SIGTERM, answered after it: drained (on a fast CPU a request of the first batch may finish
    # before the signal; at least one must still have been in flight, else this test showed nothing)
    assert any(done > t_term for _, _, done in res.values()), "no request was in flight at SIGTERM"


def test_sigkill_mid_load_gives_errors_not_hangs_and_a_restart_is_exact(graphs, tmp_path):
    from modiff_export.serving.client import InferError

    # 1000-step requests: still running when the kill comes (200 steps of the digits model can finish
    # within the 1.5 s on a quiet machine, and an answered request says nothing about the kill)
    srv = _Server(graphs, tmp_path, "--max-steps", "1000", "--exit-timeout-s", "2", name="killed")
    res = {}
    t = threading.Thread(target=lambda: res.update(_timed(srv.port, [(60 + k, 1000) for k in range(4)],
                                                          timeout_s=15)), daemon=True)
    t.start()
    time.sleep(1.5)
    srv.proc.kill()
    srv.proc.wait(30)
    t.join(60)
    assert not t.is_alive() and len(res) == 4
    for k, (err, secs, _) in res.items():
        assert isinstance(err, InferError) and err.kind in ("unreachable", "error", "busy"), (k, err)
        assert secs < 15 + 10, (k, secs)  # the client deadline at most, not a hang
    wait_port_free(srv.port)
    reqs = [(70, 5), (71, 6)]
    with _Server(graphs, tmp_path, "--max-steps", "10", port=srv.port, name="restarted") as again:
        got = _timed(again.port, reqs)
    for k, (img, _, _) in got.items():
        np.testing.assert_array_equal(img, _solo(graphs, Item(*reqs[k])), err_msg=str(k))


def test_repository_unet_frees_abandoned_sequences(graphs, tmp_path):
    """Held cache bytes (gauge modiff_unet_cache_bytes on /metrics) go back to 0: after whole trajectories
    (END), after sequences abandoned after START (idle timeout 2 s), and a superseding START holds no more."""
    import tritonclient.http as th

    from modiff_export.serving.client import infer_concurrently, metric, metrics_text
    from modiff_export.serving.limits import ServingLimits
    from modiff_export.serving.model_repository import PackageOptions, write_model_repository

    repo = write_model_repository(graphs, tmp_path / "mr", PackageOptions(
        unet_backend="python", max_batch=4, max_steps=10, limits=ServingLimits(sequence_idle_us=2_000_000)))
    with repository_server(repo, ["modiff", "modiff_unet"], tmp_path) as (_, port):
        def held():
            text = metrics_text(port + 2)
            return metric(text, "modiff_unet_cache_bytes", "modiff_unet"), metric(text, "modiff_unet_sequences",
                                                                                   "modiff_unet")

        def step(cid, start=False, end=False):
            a = th.InferInput("sample", [1, *SHAPE], "FP32")
            a.set_data_from_numpy(torch.randn(1, *SHAPE).numpy())
            b = th.InferInput("timestep", [1, 1], "FP32")
            b.set_data_from_numpy(np.array([[900.0]], np.float32))
            client.infer("modiff_unet", [a, b], sequence_id=cid, sequence_start=start, sequence_end=end)

        got, errors = infer_concurrently(port, [(1, 4), (2, 5)])
        assert not errors and len(got) == 2 and held() == (0.0, 0.0)  # END freed both trajectories
        client = th.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=60)
        try:
            for cid in (11, 12, 13):
                step(cid, start=True)  # abandoned: no END ever comes
            b3, n3 = held()
            assert n3 == 3 and b3 > 0
            step(11, start=True)  # superseded: a new trajectory on id 11
            assert held() == (b3, 3)
            step(12, end=True)
            assert held() == (b3 * 2 / 3, 2)
            t0 = time.time()
            while held() != (0.0, 0.0) and time.time() - t0 < 20:
                time.sleep(0.5)
            assert held() == (0.0, 0.0), held()
        finally:
            client.close()


# -- the same contracts without a server (fast) --------------------------------------------------------
def _model(graphs, runner=None):
    from modiff_export.manifest import Manifest
    from modiff_export.serving.triton_server import ModiffModel, ServeConfig

    meta = LoadedModel.from_info(Manifest.load(graphs).model)
    return ModiffModel(runner or OrtRunner(graphs, threads=1), meta, ServeConfig(folder=str(graphs), max_steps=10))


def _req(seed, steps, sched=None):
    r = {"seed": np.array([[seed]], np.int64), "steps": np.array([[steps]], np.int32)}
    if sched is not None:
        r["scheduler"] = np.array([[sched.encode()]], np.object_)
    return r


def _error(resp) -> dict:
    import json

    from modiff_export.serving.pytriton_errors import ERROR_OUTPUT

    assert set(resp) == {ERROR_OUTPUT} and resp[ERROR_OUTPUT].shape == (1, 1), resp
    return json.loads(bytes(resp[ERROR_OUTPUT].reshape(-1)[0]).decode())


def test_infer_answers_each_request_on_its_own(graphs):
    out = _model(graphs).infer([_req(1, 3), _req(2, 0), _req(3, 4, "nope"), _req(4, 4)])
    assert _error(out[1]) == {"code": "INVALID_ARG", "message": "steps=0 out of range [1, 10]"}
    assert _error(out[2])["code"] == "INVALID_ARG" and "unknown scheduler 'nope'" in _error(out[2])["message"]
    for k, (seed, steps) in ((0, (1, 3)), (3, (4, 4))):
        np.testing.assert_array_equal(out[k]["image"][0], _solo(graphs, Item(seed, steps)))


def test_a_runner_failure_is_one_line_per_request(graphs):
    class Broken:
        def reset(self):
            pass

        def __call__(self, *a, **k):
            raise RuntimeError("device lost\nsecond line")

    out = _model(graphs, Broken()).infer([_req(1, 3), _req(2, 0)])
    assert _error(out[0]) == {"code": "INTERNAL", "message": "inference failed: RuntimeError: device lost"}
    assert _error(out[1])["code"] == "INVALID_ARG"


def test_proxy_patch_is_guarded_and_idempotent():
    from modiff_export.serving.pytriton_errors import ProxyPatchError, patch_proxy_source

    pytriton = pytest.importorskip("pytriton", reason="nvidia-pytriton is not installed")
    from pytriton.models.model import Model

    from modiff_export.serving.pytriton_errors import per_request_errors

    original = Model.get_proxy_model_files
    with per_request_errors():
        assert Model.get_proxy_model_files is not original
    assert Model.get_proxy_model_files is original  # restored: other PyTriton users are untouched
    src = (Path(pytriton.__file__).parent / "proxy" / "model.py").read_text()
    once = patch_proxy_source(src)
    assert once != src and patch_proxy_source(once) == once
    compile(once, "model.py", "exec")  # still valid Python
    with pytest.raises(ProxyPatchError, match="_wrap_response"):
        patch_proxy_source(src.replace("def _wrap_response(", "def _other_name("))


@pytest.mark.parametrize("field,value", [("max_queue_size", -1), ("queue_timeout_us", -1), ("sequence_idle_us", 0),
                                         ("max_inflight", 0), ("max_queue_size", True), ("max_queue_size", 2.5)])
def test_limits_are_validated(field, value):
    from modiff_export.serving.limits import LimitsError, ServingLimits

    with pytest.raises(LimitsError, match=field):
        ServingLimits(**{field: value})
