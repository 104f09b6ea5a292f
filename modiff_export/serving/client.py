"""Client side of model `modiff` (served by `cli.py serve` or a `package-triton` repository): a
tritonclient wrapper whose every call has a deadline, readiness polling, Triton's batch counters, and a
helper that sends requests concurrently. Loopback by default; nothing here retries on its own.

    c = Client("http", 8000)                  # or "grpc" (port 8001 by convention: pass it)
    image = c.infer(seed=42, steps=25)        # [C, H, W]; raises InferError(kind, message)

InferError.kind: "bad_request" (HTTP 400 / INVALID_ARGUMENT: fix the request), "busy" (503 / UNAVAILABLE:
queue full or timed out in it; retry later), "unreachable" (no server, connection lost, deadline
passed), "error" (anything else, e.g. the runner failed).
"""
from __future__ import annotations

import re
import threading
import time
import urllib.request

import numpy as np

LOOPBACK = "127.0.0.1"


class InferError(RuntimeError):
    def __init__(self, kind: str, message: str, status: str = ""):
        super().__init__(f"{kind}: {message}")
        self.kind, self.message, self.status = kind, message, status  # status: "400", "StatusCode.UNAVAILABLE", ...


def _kind(status: str, message: str) -> str:
    s = f"{status} {message}".upper()
    if "400" in status or "INVALID_ARG" in s:
        return "bad_request"
    if "503" in status or "UNAVAILABLE" in s or "EXCEEDS MAXIMUM QUEUE SIZE" in s or ("TIMEOUT" in s and "QUEUE" in s):
        return "busy"
    if "DEADLINE" in s or "TIMED OUT" in s or "CONNECT" in s or "REFUSED" in s or "RESET" in s or "BROKEN PIPE" in s:
        return "unreachable"
    return "error"


class Client:
    """One tritonclient connection (http or grpc) asking for one image at a time; `timeout_s` bounds
    every call (connect and answer), so a dead or hung server is an InferError, never a hang."""

    def __init__(self, protocol: str, port: int, host: str = LOOPBACK, timeout_s: float = 300.0,
                 model: str = "modiff"):
        self.protocol, self.timeout_s, self.model = protocol, float(timeout_s), model
        if protocol == "http":
            import tritonclient.http as tc

            self.tc = tc
            self.client = tc.InferenceServerClient(f"{host}:{port}", connection_timeout=self.timeout_s,
                                                   network_timeout=self.timeout_s)
        elif protocol == "grpc":
            import tritonclient.grpc as tc

            self.tc = tc
            self.client = tc.InferenceServerClient(f"{host}:{port}")
        else:
            raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")

    def _input(self, name: str, value, dtype: str) -> object:
        arr = np.asarray(value)
        arr = arr.reshape(1, *(arr.shape or (1,)))
        x = self.tc.InferInput(name, list(arr.shape), dtype)
        x.set_data_from_numpy(arr)
        return x

    def infer(self, seed: int, steps: int, scheduler: str | None = None, class_label: int | None = None,
              **extra) -> np.ndarray:
        """The image [C, H, W] for one request. `class_label`: class-conditional models (0..num_classes-1).
        `extra`: name -> (numpy value of one request, without the batch axis, Triton dtype), e.g.
        guidance_scale=(np.float32([7.5]), "FP32")."""
        inputs = [self._input("seed", np.array([seed], np.int64), "INT64"),
                  self._input("steps", np.array([steps], np.int32), "INT32")]
        if scheduler is not None:
            inputs.append(self._input("scheduler", np.array([scheduler.encode()], np.object_), "BYTES"))
        if class_label is not None:
            inputs.append(self._input("class_label", np.array([class_label], np.int64), "INT64"))
        for name, (value, dtype) in extra.items():
            inputs.append(self._input(name, value, dtype))
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        try:
            result = self.client.infer(self.model, inputs, **kwargs)
        except Exception as e:  # noqa: BLE001 (tritonclient raises several types: one InferError for all)
            st = getattr(e, "status", None)
            status = str(st() or "") if callable(st) else ""
            msg = e.message() if callable(getattr(e, "message", None)) else str(e)
            msg = " ".join(str(msg or type(e).__name__).split())
            raise InferError(_kind(status, msg or type(e).__name__), msg[:500], status) from None
        return result.as_numpy("image")[0]

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001, S110 (closing a dead connection)
            pass


def infer_concurrently(port: int, reqs: list[tuple], grpc_port: int | None = None,
                       timeout_s: float = 300.0) -> tuple[dict[int, np.ndarray], dict[int, InferError]]:
    """Send every request at once, one thread each, alternating HTTP and gRPC. A request is (seed, steps)
    or (seed, steps, scheduler, extra dict). Returns ({index: image}, {index: InferError})."""
    got, errors, lock = {}, {}, threading.Lock()
    grpc_port = port + 1 if grpc_port is None else grpc_port

    def worker(k):
        seed, steps, *rest = reqs[k]
        sched, extra = (rest + [None, None])[:2]
        cl = Client("http", port, timeout_s=timeout_s) if k % 2 == 0 else Client("grpc", grpc_port, timeout_s=timeout_s)
        try:
            img = cl.infer(seed, steps, sched, **(extra or {}))
            with lock:
                got[k] = img
        except InferError as e:
            with lock:
                errors[k] = e
        finally:
            cl.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got, errors


def wait_ready(port: int, proc=None, timeout: float = 120.0, model: str = "modiff", host: str = LOOPBACK) -> None:
    """Poll /v2/models/<model>/ready until 200; raises if `proc` (a Popen) exits or `timeout` passes."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/v2/models/{model}/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"server not ready after {timeout:.0f} s")


def metrics_text(metrics_port: int, host: str = LOOPBACK) -> str:
    return urllib.request.urlopen(f"http://{host}:{metrics_port}/metrics", timeout=5).read().decode()


def metric(text: str, name: str, model: str = "modiff") -> float:
    """One Prometheus sample of `model` (version 1) from a /metrics page; NaN if absent."""
    m = re.search(rf'^{name}{{model="{model}",version="1"}} ([0-9.e+-]+)$', text, re.MULTILINE)
    return float(m.group(1)) if m else float("nan")


def batch_stats(metrics_port: int, expect: int = 1, timeout: float = 15.0, model: str = "modiff",
                field: str = "nv_inference_count") -> tuple[float, float]:
    """(requests, executions) of `model` from Triton's metrics; requests / executions = mean batch.
    Triton publishes its counters with a delay, so poll until `field` counts at least `expect` or
    `timeout` seconds pass. field: nv_inference_count counts successful requests,
    nv_inference_request_success + nv_inference_request_failure all of them."""
    deadline = time.time() + timeout
    while True:
        text = metrics_text(metrics_port)
        n_req, n_exec = metric(text, field, model), metric(text, "nv_inference_exec_count", model)
        if n_req >= expect or time.time() > deadline:
            return n_req, n_exec
        time.sleep(0.5)
