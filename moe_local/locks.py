"""One run at a time per output: an OS lock on every path a command writes (adapter, bank, fused model, report).

``output_lock(path)`` takes ``flock(2)`` on ``.NAME.lock`` beside the output. The kernel drops the lock
when its process ends, however it ends (SIGKILL included), so a killed run never leaves a stale lock;
the file holds the holder's PID and command line for the message a second run gets (exit 2, one line).
The lock file is removed when the lock is released; one left by a killed run is taken over by the next.
Holding the lock, a run checks that it can write where it will write (before any work, not at the end)
and removes the temporary ``.NAME.partial-*`` entries a killed writer of the same output left
(files.remove_partials): no live run owns them, since every writer holds the lock.

Locks are reentrant within a thread (the command and the library function it calls both take it);
another thread of the same process is refused as another run is. A file system without ``flock``
(NFS without lockd, some FUSE mounts) is a one-line refusal; NFS mounted with ``local_lock`` locks per
host only, so two hosts writing one output there are not told apart.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

from .errors import UserError
from .files import remove_partials

_held: set[tuple[int, str]] = set()  # (thread, lock file) of the locks this process holds


def lock_path(path: Path) -> Path:
    """Where the lock of an output lives: ``.NAME.lock`` beside it."""
    path = Path(path).expanduser().resolve()  # one lock whatever links lead to the output
    return path.parent / f".{path.name}.lock"


def _command() -> str:
    argv = list(sys.argv) or ["python"]
    if Path(argv[0]).name in ("moe-local", "__main__.py"):
        argv[0] = "moe-local"
    return shlex.join(argv)[:300]


def _holder(lock: Path) -> str:
    """The running holder, as its lock file names it (written a moment after the lock is taken)."""
    for _ in range(20):
        try:
            info = json.loads(lock.read_text())
            return f"PID {int(info['pid'])}: {info['command']}"
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "PID unknown"


def _cannot_write(what: str, path: Path, where: Path, e: OSError) -> UserError:
    """``where``: the folder (or file) that refused the write."""
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"cannot write {what} {path}: {where} is read-only for this user")
    return UserError(f"cannot write {what} {path}: {where}: {e.strerror}")


def _folder_of(path: Path) -> Path:
    """The folder an output is written in, as the user named it."""
    return path.parent if str(path.parent) != "." else Path.cwd()


def _open_lock_file(lock: Path, what: str, path: Path) -> int:
    """An fd on ``lock``, made if missing; read-only when another user's killed run left it (flock needs
    no write access, and the folder, writable, lets the file be removed at the end)."""
    cloexec = getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(lock, os.O_RDWR | os.O_CREAT | cloexec, 0o666)
    except PermissionError as e:
        if lock.is_file() and os.access(lock.parent, os.W_OK):
            return os.open(lock, os.O_RDONLY | cloexec)
        raise _cannot_write(what, path, _folder_of(path), e) from None
    except OSError as e:
        raise _cannot_write(what, path, _folder_of(path), e) from None


def _open_locked(lock: Path, what: str, path: Path) -> int:
    """An fd holding the lock on ``lock``, or a UserError naming the running holder."""
    while True:
        existed = lock.exists()
        fd = _open_lock_file(lock, what, path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(
                f"{what} {path} is in use by another moe-local run ({_holder(lock)}); wait for it to end, or stop it"
            ) from None
        except OSError as e:  # a file system without flock
            os.close(fd)
            if not existed:
                with contextlib.suppress(OSError):
                    os.unlink(lock)
            raise UserError(
                f"cannot lock {what} {path}: the file system of {lock.parent} does not support file locks "
                f"({e.strerror}); write it on a local disk"
            ) from None
        try:  # the holder before us may have removed the file between our open and our lock: retry
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def check_writable(path: Path, what: str) -> None:
    """Refuse, before any work, an output the user cannot write: a read-only folder (written into), or a
    read-only file (replaced). The folder beside it was written when the lock file was made."""
    path = Path(path)
    try:
        if path.is_dir():
            with tempfile.TemporaryFile(dir=path):
                pass
        elif path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, "read-only", str(path))
    except OSError as e:
        raise _cannot_write(what, path, path, e) from None


@contextlib.contextmanager
def output_lock(path, what: str = "output"):
    """Hold the lock of ``path`` for the duration; ``what`` names the output in messages (``--report``)."""
    path = Path(path).expanduser()
    lock = lock_path(path)
    key = (threading.get_ident(), str(lock))
    if key in _held:  # taken further up this thread's stack
        yield
        return
    made = [p for p in (lock.parent, *lock.parent.parents) if not p.exists()]
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cannot_write(what, path, Path(e.filename or lock.parent).parent, e) from None
    try:
        fd = _open_locked(lock, what, path)
    except BaseException:
        _remove_empty(made)
        raise
    _held.add(key)
    try:
        with contextlib.suppress(OSError):  # a lock file opened read-only keeps its old holder's words
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "command": _command()}).encode())
        check_writable(path, what)
        remove_partials(path)
        yield
    finally:
        _held.discard(key)
        with contextlib.suppress(OSError):
            os.unlink(lock)  # still holding it: a run that opened it before retries on a new file
        os.close(fd)
        _remove_empty(made)


def _remove_empty(folders) -> None:
    for folder in folders:  # deepest first: the folders made for the lock, if nothing else went there
        with contextlib.suppress(OSError):
            folder.rmdir()
