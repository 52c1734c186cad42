"""Atomic writes appear whole, with the permissions a plain write would give, and never clobber on failure."""

import os
import stat

import pytest

from moe_local.files import AtomicFolder, atomic_write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_file_has_the_umask_mode_and_no_leftovers(tmp_path, umask_022):
    atomic_write_text(tmp_path / "report.json", "[]\n")
    assert mode(tmp_path / "report.json") == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_atomic_folder_has_the_umask_mode(tmp_path, umask_022):
    with AtomicFolder(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
    assert mode(tmp_path / "model") == 0o755
    assert (tmp_path / "model" / "config.json").read_text() == "{}"


def test_a_failed_folder_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with AtomicFolder(tmp_path / "model") as tmp:
            (tmp / "half.safetensors").write_text("x")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
