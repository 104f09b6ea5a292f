"""`cli.py serve` as a child process: start it, wait until model `modiff` is ready, stop it with a signal.
For load tests, soaks and fault drills (benchmarks/, tests/) and for supervisors that embed the server."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from .client import wait_ready

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding modiff_export/ (and cli.py)


def start_serve(graphs: str, port: int, backend: str = "ort", max_batch: int = 8, log: str | None = None,
                extra: tuple[str, ...] = (), nice: int = 0) -> subprocess.Popen:
    """`python -m modiff_export serve --graphs GRAPHS --port PORT ...` with this interpreter and this copy of
    the package (PYTHONPATH), output to `log` (or discarded). gRPC on port+1, metrics on port+2."""
    cmd = [sys.executable, "-m", "modiff_export", "serve", "--graphs", str(graphs), "--backend", backend,
           "--port", str(port), "--max-batch", str(max_batch), *map(str, extra)]
    if nice:
        cmd = ["nice", "-n", str(nice), *cmd]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH"))
                                                      if p))
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (the child owns it)
    try:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=PACKAGE_ROOT, env=env)
    finally:
        if log:
            out.close()


def stop_server(proc: subprocess.Popen, sig=signal.SIGINT, timeout: float = 60.0) -> int:
    """Send `sig` and wait for the exit code; SIGKILL if it is still running after `timeout` s."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
        raise


def rss_bytes(pid: int, children: bool = True) -> int:
    """Resident memory of `pid` (and, with `children`, of all its descendants: tritonserver and its
    Python-backend stubs), from /proc. 0 if the process is gone."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            if children:
                for task in Path(f"/proc/{p}/task").iterdir():
                    kids = (task / "children").read_text().split()
                    todo += [int(k) for k in kids]
        except (OSError, ValueError):
            continue
    return total


__all__ = ["start_serve", "stop_server", "rss_bytes", "wait_ready"]


def port_free(port: int) -> bool:
    """Nothing listens on loopback `port` (SO_REUSEADDR, as Triton binds: connections in TIME_WAIT from a
    killed server do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports() -> int:
    """A loopback port p with p+1 (gRPC) and p+2 (metrics) free too: the ports `serve` listens on."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65000 and all(port_free(port + k) for k in (1, 2)):
            return port
