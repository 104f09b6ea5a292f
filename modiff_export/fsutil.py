"""Safe file writes (docs/design.md section 3, "Artifacts"): nothing is half-written, nothing the user
owns is replaced unasked.

    atomic_write_text(path, text)         temp file in the same folder, then one rename (or, without
    atomic_write_bytes(path, data)        overwrite, one hard link that fails if `path` appeared meanwhile)
    atomic_folder(out, overwrite=False)   fill a temp sibling folder; on success it takes `out`'s place
    sha256_file(path)                     "sha256:<hex>" of a file's bytes (artifact identity)
    check_writable(path)                  fail before long work when an output cannot be written
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from .errors import ModiffExportError

TMP_TAG = ".modiff-tmp-"  # prefix of every temporary sibling this module creates


class OutputError(ModiffExportError):
    """An output location that cannot or must not be written."""


def read_json(path: Path, error: type[ModiffExportError], damaged: str = "the file is damaged"):
    """The JSON value in `path`; an unreadable or invalid file is one `error` line naming it."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: unreadable ({type(e).__name__})") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); {damaged}") from None


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def check_writable(path: str | os.PathLike, overwrite: bool = False, kind: str = "folder") -> Path:
    """Check, before any long work, that `path` can be created: it does not exist (or `overwrite`),
    its nearest existing parent is a writable folder, and no file stands where a folder is needed."""
    path = Path(path)
    if kind == "folder":
        with contextlib.suppress(OSError):  # a killed run's leftovers first: its old folder may go back
            clean_stale_temps(path.parent, path.name)
    if path.is_symlink() and not path.exists():
        raise OutputError(f"{path} is a dangling symbolic link; remove it or choose another output")
    if path.exists():
        if not overwrite:
            raise OutputError(f"{path} already exists; pass --overwrite to replace it")
        if kind == "folder" and not path.is_dir():
            raise OutputError(f"{path} exists and is not a folder; refusing to replace a file with a folder")
        if kind == "folder" and not os.access(path, os.W_OK | os.X_OK):  # its files could not be removed
            raise OutputError(f"{path} is not writable, so it cannot be replaced")
        if kind == "file" and path.is_dir():
            raise OutputError(f"{path} is a folder; expected a file path")
    parent = path.parent
    while not parent.exists():
        if parent.is_symlink():
            raise OutputError(f"{parent} is a dangling symbolic link; cannot create {path}")
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{parent} is a file, so {path} cannot be created under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{parent} is not writable, so {path} cannot be created")
    try:  # the real test (read-only mounts, pseudo file systems, ACLs): create and remove a file there
        with _held_interrupts():  # a signal between mkstemp and unlink would leave the probe behind
            fd, probe = tempfile.mkstemp(prefix=f"{TMP_TAG}probe.", dir=parent)
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{parent} is not writable ({e.strerror}), so {path} cannot be created") from None
    return path


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> None:
    """Write to a temporary file in the same folder, then rename it into place (see atomic_write_bytes)."""
    atomic_write_bytes(path, text.encode(), overwrite)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = True) -> None:
    """Write to a temporary file in the same folder, then put it at `path` in one step: a rename with
    `overwrite`, else a hard link, which fails instead of replacing a file that appeared meanwhile."""
    path = Path(path)
    check_writable(path, overwrite=True, kind="file")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = fd = None
    try:
        with _held_interrupts():  # a signal just after mkstemp would leave the file behind (see atomic_folder)
            fd, tmp = tempfile.mkstemp(prefix=f"{TMP_TAG}{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            fd = None  # the file object owns and closes it now
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artifacts are meant to be shared
        if overwrite:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise OutputError(f"{path} appeared while this run was writing (another process?); it was left "
                              f"untouched; pass --overwrite to replace it") from None
        except OSError:  # no hard links on this file system: check, then rename (a tiny window remains)
            if path.exists() or path.is_symlink():
                raise OutputError(f"{path} appeared while this run was writing; it was left untouched") from None
            os.replace(tmp, path)
        Path(tmp).unlink(missing_ok=True)
    except BaseException:
        if fd is not None:  # interrupted between mkstemp and fdopen: nobody else closes it
            os.close(fd)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt while a folder is being written, so the cleanup below runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def _held_interrupts():
    """SIGINT/SIGTERM inside the block are recorded, not raised; leaving it raises KeyboardInterrupt for
    one that came. Python runs signal handlers in the main thread only (elsewhere this holds nothing);
    a signal the process ignores stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    held = [s for s, h in previous.items() if h not in (signal.SIG_IGN, None)]
    for s in held:
        signal.signal(s, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for s in held:
            signal.signal(s, previous[s])
    if pending:
        raise KeyboardInterrupt(f"signal {pending[0]}")


def _temp_owner(entry: str, name: str) -> tuple[int, str] | None:
    """(pid, "new" | "old") when `entry` is a temporary of output `name` made by atomic_folder:
    `<TMP_TAG><name>.<random>.<pid>.new` or `<TMP_TAG><name>.<pid>.old`; None for anything else
    (including the temporaries of a sibling output such as `<name>.v2`)."""
    prefix = f"{TMP_TAG}{name}."
    if not entry.startswith(prefix):
        return None
    parts = entry[len(prefix):].split(".")
    if parts[-1] == "old" and len(parts) == 2 and parts[0].isdigit():
        return int(parts[0]), "old"
    if parts[-1] == "new" and len(parts) == 3 and parts[1].isdigit():
        return int(parts[1]), "new"
    return None


def clean_stale_temps(parent: Path, name: str) -> None:
    """Remove temporary siblings of `name` left by a run that was killed (SIGKILL, power loss); an old
    folder that was moved aside but never replaced is put back."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    for p in sorted(parent.iterdir()):
        owner = _temp_owner(p.name, name)
        if owner is None:
            continue
        pid, kind = owner
        if pid == os.getpid() or _alive(pid):
            continue
        out = parent / name
        if kind == "old" and not (out.exists() or out.is_symlink()):
            p.rename(out)  # killed between "old aside" and "new in": the old folder goes back
        else:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary sibling of `out` to fill; on success it takes `out`'s place.

    Without `overwrite`, an `out` that exists at the end (even one created meanwhile by someone else)
    is never touched: the new folder is discarded with an error. With `overwrite`, the old folder is
    first renamed aside, the new one renamed in, and only then the old one deleted, so an interrupt
    at any moment leaves either the old or the new complete folder at `out`. On any error, Ctrl-C or
    SIGTERM the temporary folder is removed; temporaries of killed runs are cleaned on the next run.
    """
    out = check_writable(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out.parent, out.name)
    old, swapped, tmp = None, False, None
    with _sigterm_as_interrupt():
        try:
            # Ctrl-C / SIGTERM wait until `tmp` is bound: a signal just after mkdtemp (CI caught one on a
            # busy machine) would otherwise leave the folder behind. Same filesystem as `out`, so the
            # renames are atomic; the pid lets a later run spot a dead writer.
            with _held_interrupts():
                tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_TAG}{out.name}.", suffix=f".{os.getpid()}.new",
                                            dir=out.parent))
            yield tmp
            tmp.chmod(0o755)
            if out.exists() or out.is_symlink():
                if not overwrite:
                    raise OutputError(f"{out} appeared while this run was writing (another process?); "
                                      f"it was left untouched; pass --overwrite to replace it")
                old = out.with_name(f"{TMP_TAG}{out.name}.{os.getpid()}.old")
                out.rename(old)
            try:
                os.rename(tmp, out)  # fails (instead of merging) if a folder appeared at `out` meanwhile
            except OSError:
                raise OutputError(f"{out} appeared while this run was writing (another process?); "
                                  f"it was left untouched") from None
            swapped = True
        except BaseException:  # an error, Ctrl-C or SIGTERM at any point: the old or the new folder stays
            if old is not None and old.exists():
                if swapped or not tmp.exists():  # the new folder is in place: the old one goes
                    shutil.rmtree(old, ignore_errors=True)
                elif not (out.exists() or out.is_symlink()):
                    old.rename(out)  # between "old aside" and "new in": the old folder goes back
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
