"""Helpers of the reliability tests: run the real CLI in-process or as a subprocess, snapshot
a folder tree byte for byte, assert the one-`error:`-line contract, make a folder read-only even as root."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cli import main  # noqa: E402


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """`python cli.py ARGS` in this process, through cli.main (the same code path as the script, so
    click's own errors are the one-line form too): (exit code, stdout, stderr). An exception that
    escapes main() is not caught: the test fails with its traceback, as the user would see it."""
    out, err = io.StringIO(), io.StringIO()
    argv, code = sys.argv, 0
    sys.argv = ["cli.py", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as e:  # sys.exit(1) / SystemExit("error: ...") as the interpreter would end
                code = e.code
                if isinstance(code, str):
                    err.write(code + "\n")
                    code = 1
                code = 0 if code is None else code
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def run_cli_subprocess(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python cli.py ARGS` as a real process (one intra-op thread: the machine is shared)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def error_line(code: int, stderr: str) -> str:
    """The contract for bad input: exit code 1 and stderr is exactly one `error: ...` line (no
    traceback, no usage text, nothing else). A progress bar erased with carriage returns (tqdm,
    leave=False) is not a line: what counts is what stays visible on a terminal. Returns that line."""
    visible = [seg.rsplit("\r", 1)[-1] for seg in stderr.split("\n")]
    lines = [line for line in visible if line.strip()]
    assert code == 1, f"exit code {code}, stderr:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one 'error:' line, got:\n{stderr[-3000:]}"
    return lines[0]


def snapshot(root: Path) -> dict[str, tuple]:
    """{relative path: ("dir",) | ("file", sha256) | ("link", target)} of everything under `root`."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                snap[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                snap[rel] = ("dir",)
            else:
                snap[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return snap


def diff_snapshots(before: dict, after: dict) -> str:
    """'' when equal, else a short description of what was left, lost or changed."""
    left = sorted(set(after) - set(before))
    lost = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    parts = [f"{what}: {items[:8]}" for what, items in (("left", left), ("lost", lost), ("changed", changed)) if items]
    return "; ".join(parts)


def temporaries(folder: Path) -> list[str]:
    """Temporary siblings written by modiff_export.fsutil (and anything else hidden and temporary)."""
    return sorted(p.name for p in Path(folder).rglob("*") if ".modiff-tmp-" in p.name or p.name.endswith(".tmp"))


@contextlib.contextmanager
def read_only(folder: Path):
    """Make `folder` unwritable for this process: chmod 0555, and as root (which ignores modes) the
    immutable attribute (chattr +i). Yields False when neither works here (the caller skips)."""
    folder.chmod(0o555)
    immutable = False
    try:
        if os.geteuid() == 0:
            immutable = shutil.which("chattr") is not None and subprocess.run(
                ["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        probe = folder / ".probe"
        try:
            probe.touch()
            probe.unlink()
            works = False
        except OSError:
            works = True
        yield works
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)


def dead_pid() -> int:
    """The id of a process that has ended (what a killed run leaves in its temporaries' names)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid
