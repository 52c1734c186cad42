"""Atomic writes: a file or folder appears whole under its name, or not at all, with the mode a plain
write would give it under the umask.

A write goes to a temporary ``.NAME.partial-*`` beside its target and is renamed into place. A killed
writer leaves that temporary behind; the next run that takes the output's lock (locks.py) removes it
(:func:`remove_partials`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from .errors import UserError


def refuse_existing(out: Path, what: str = "output folder") -> None:
    """The user's files are never overwritten: an existing non-empty folder, or a file, is refused."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{what} {out} is a file; give a new folder")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"{what} {out} exists and is not empty; give a new folder")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _as_if_created(path: Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp make private (0600/0700) entries; give them the mode a plain open/mkdir would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def as_if_created_tree(folder: Path) -> None:
    """Every folder and file under ``folder`` (itself included) with the mode a plain mkdir/open under the
    umask gives, whatever the writer did (safetensors writes 0600, copies carry their source's mode)."""
    folder = Path(folder)
    for entry in folder.rglob("*"):
        if not entry.is_symlink():
            _as_if_created(entry, entry.is_dir())
    _as_if_created(folder, directory=True)


def temp_folder_beside(path: Path) -> Path:
    """A new empty folder ``.NAME.partial-*`` beside ``path``, with the mode a plain mkdir gives."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=partial_prefix(path), dir=path.parent))
    _as_if_created(tmp, directory=True)
    return tmp


def partial_prefix(path: Path) -> str:
    """The name prefix of a temporary written beside ``path`` on its way to ``path``."""
    return f".{Path(path).name}.partial-"


def remove_partials(path: Path) -> None:
    """Remove the temporaries a killed writer of ``path`` left beside it (call while holding its lock)."""
    path = Path(path).expanduser().resolve()
    if not path.parent.is_dir():
        return
    for entry in path.parent.glob(partial_prefix(path) + "*"):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _temp_beside(path: Path, suffix: str = "") -> Path:
    fd, name = tempfile.mkstemp(prefix=partial_prefix(path), suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(name)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _as_if_created(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_save_numpy_safetensors(path: Path, tensors: Mapping, metadata: dict | None = None) -> None:
    from safetensors.numpy import save

    atomic_write_bytes(path, save(dict(tensors), metadata=metadata))


class AtomicFolder:
    """Write a folder under a temporary name beside it and rename it into place on success."""

    def __init__(self, out: Path):
        self.out = Path(out)

    def __enter__(self) -> Path:
        self.tmp = temp_folder_beside(self.out)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()
        as_if_created_tree(self.tmp)
        os.replace(self.tmp, self.out)
        return False
