"""Files that are never half-written, outputs that one process writes at a time, and one-line messages for a
full disk or a folder that cannot be written."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from .errors import RegclsError

# The library files whose code decides a trace's numbers (the hooks, the weights, the planted controls, the
# image pipeline) and an image store's pixels: their content is part of each cache key, so a fix in any of them
# is never hidden by a trace computed by the old code.
LIB_ROOT = Path(__file__).resolve().parent
TRACE_SOURCES = ("tracefile.py", "trace.py", "precision.py", "runner.py", "models.py", "planted.py", "data.py",
                 "testtime.py")
STORE_SOURCES = ("data.py",)


def source_digest(names: tuple[str, ...] = TRACE_SOURCES, root: Path | None = None) -> str:
    """SHA-256 (16 hex digits) of the named library files' content."""
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0" + ((root or LIB_ROOT) / name).read_bytes())
    return h.hexdigest()[:16]


def library_digest(root: Path | None = None) -> str:
    """:func:`source_digest` of every file of the library (which code computed a page, a claim row)."""
    root = root or LIB_ROOT
    return source_digest(tuple(sorted(p.name for p in root.glob("*.py"))), root)


# The errors of a file system, not of the data: they get a one-line message that says what was kept.
DISK_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exhausted",
               errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EROFS: "the file system is read-only"}


def _writer(fd: int):
    """The file object a write goes through (a seam: the tests inject a full disk here)."""
    return os.fdopen(fd, "wb")


def _atomic(path: str | Path, write) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then put it in place: ``path`` is either absent, the
    old file, or the complete new one, and a failed write leaves no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with _writer(fd) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_savez(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an .npz atomically, synced to the disk before it is put in place."""
    def write(f):
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    _atomic(path, write)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small text file atomically (absent, old, or complete)."""
    _atomic(path, lambda f: f.write(text.encode()))


# What reading a damaged .npz raises: cut short, garbage, a missing array, another shape.
DAMAGED = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, RegclsError)


def set_aside(path: Path, e: BaseException) -> None:
    """Move a damaged cache entry out of the way (``NAME.bad``), with a one-line warning naming it: it is then
    computed again."""
    import warnings

    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    bad = path.with_name(path.name + ".bad")
    try:
        os.replace(path, bad)
    except OSError as err:
        raise RegclsError(f"cache entry {path} is damaged ({reason}) and cannot be moved aside ({err.strerror}): "
                          "delete it") from None
    warnings.warn(f"cache entry {path} is damaged ({reason}): moved to {bad.name}, computing it again", stacklevel=3)


def disk_error(e: OSError) -> str | None:
    """What went wrong, in words, when ``e`` is a fault of the file system (full, read-only, no permission)."""
    return DISK_ERRORS.get(e.errno)


# ------------------------------------------------------------------------------------------ locks

_HELD: set[str] = set()   # outputs this process holds (a lock is re-entrant within one process)


def _holder(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def describe_holder(info: dict) -> str:
    if not info:
        return "another process"
    return f"pid {info.get('pid')} on {info.get('host')}, since {info.get('since')}"


@contextlib.contextmanager
def output_lock(path: str | Path, wait: bool = False, poll: float = 0.2):
    """Hold ``PATH.lock`` while this process writes ``path``.

    A second process asking for the same output either waits until the first is done (``wait=True``: the
    library, which then reads the first one's result) or gets a one-line :class:`RegclsError` naming the holder
    (the command line). The lock is the operating system's (``flock``): a process that is killed releases it,
    and the next one takes over (saying so); the lock file is removed when the output is done.
    """
    path = Path(path)
    lock = path.with_name(path.name + ".lock")
    key = str(lock.resolve())
    if key in _HELD:
        yield
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    said = False
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if not wait:
                raise RegclsError(f"{path} is being written by another regcls run ({describe_holder(_holder(lock))}): "
                                  "wait for it to finish, or stop it and run again") from None
            if not said:
                print(f"waiting for {describe_holder(_holder(lock))}, which is writing {path.name}", file=sys.stderr,
                      flush=True)
                said = True
            time.sleep(poll)
            continue
        try:  # the file may have been removed by the holder that just finished: lock the file that is there
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    before = _holder(lock)
    if before.get("pid") not in (None, os.getpid()) or before.get("host") not in (None, socket.gethostname()):
        print(f"taking over {path.name} from {describe_holder(before)}, which stopped without finishing",
              file=sys.stderr, flush=True)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    _HELD.add(key)
    try:
        yield
        lock.unlink(missing_ok=True)   # done: no lock file is left beside the output
    finally:
        _HELD.discard(key)
        os.close(fd)


def data_link(data: str, kind: str, filename: str) -> str:
    """An HTML link that downloads ``data`` as ``filename`` (a data URL of type ``kind``): embedded in the page
    itself, the same in the book, in Jupyter and on Colab, with no file beside the page."""
    import base64

    url = f"data:{kind};base64,{base64.b64encode(data.encode()).decode()}"
    return f'<a href="{url}" download="{filename}">{filename}</a>'


def csv_text(rows: list[dict], fields: list[str]) -> str:
    """``rows`` as CSV text with a header of ``fields`` (a file to download: :func:`data_link`)."""
    import csv
    import io

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()
