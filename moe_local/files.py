"""Atomic writes: a file or folder appears whole under its name, or not at all."""

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


def _temp_beside(path: Path, suffix: str = "") -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.partial-", suffix=suffix, dir=path.parent)
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
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()
        _as_if_created(self.tmp, directory=True)
        os.replace(self.tmp, self.out)
        return False
