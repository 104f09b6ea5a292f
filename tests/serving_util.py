"""Helpers of the serving tests (test_serving*.py, test_model_repository.py): free loopback ports, the
skip when PyTriton / tritonclient / a shared libpython are missing, the bundled tritonserver on a
repository. Client code lives in the package (modiff_export/serving/client.py, process.py)."""
from __future__ import annotations

import shutil
import sysconfig
import time
from contextlib import contextmanager

import pytest

from modiff_export.serving.process import free_ports, port_free  # noqa: F401  (tests import free_ports from here)


def wait_port_free(port: int, timeout: float = 60.0) -> None:
    t0 = time.time()
    while not all(port_free(port + k) for k in range(3)):
        if time.time() - t0 > timeout:
            pytest.fail(f"ports {port}..{port + 2} still taken {timeout:.0f} s after the server died")
        time.sleep(0.5)


def needs_triton() -> None:
    pytest.importorskip("pytriton", reason="nvidia-pytriton is not installed")
    pytest.importorskip("tritonclient.http", reason="tritonclient is not installed")
    if not str(sysconfig.get_config_var("LDLIBRARY") or "").endswith(".so"):
        pytest.skip("this Python has no shared libpython: Triton's Python backend stub cannot start")


@contextmanager
def repository_server(repo, models: list[str], tmp_path):
    """The bundled tritonserver on `repo` with `models` ready: yields (process, HTTP port); SIGTERM after."""
    needs_triton()
    from modiff_export.serving.client import wait_ready
    from modiff_export.serving.model_repository import local_tritonserver

    port = free_ports()
    log = tmp_path / "ts.log"
    proc, scratch = local_tritonserver(repo, port, port + 1, port + 2, models, log)
    try:
        try:
            for m in models:
                wait_ready(port, proc, timeout=120, model=m)
        except (RuntimeError, TimeoutError) as e:
            pytest.fail(f"tritonserver not ready ({e}): {log.read_text()[-2000:]}")
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(60)
        shutil.rmtree(scratch, ignore_errors=True)


def assert_label_errors(client, num_classes: int = 10) -> None:
    """A class-conditional server refuses a missing and an out-of-range class label as bad requests, with
    check_item's own message word for word: the Triton sampler (serving/triton_models/sampler.py) keeps a
    copy of those checks, and this keeps both servers' messages equal to the library's."""
    import re

    from modiff_export.serving.client import InferError
    from modiff_export.serving.sampler import Item, RequestError, check_item

    for label in (None, num_classes):
        with pytest.raises(RequestError) as want:
            check_item(Item(seed=1, steps=3, class_label=label), 10, False, None, num_classes)
        with pytest.raises(InferError, match=re.escape(str(want.value))) as e:
            client.infer(1, 3, class_label=label)
        assert e.value.kind == "bad_request"
