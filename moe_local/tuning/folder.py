"""The tune's output folder: what may be replaced, where a run writes, checkpoints, and ``--resume``.

Only what this package provably wrote is ever replaced: ``adapter_config.json`` with a ``moe_local``
section, ``checkpoints/step-N/`` folders of ``state.json``/``state.safetensors``, a ``bank/`` of
``bank.json``/``bank.safetensors``, ``metrics.jsonl`` rows and ``adapters.safetensors`` — and only in a
folder one of the first three marks as an adapter. Anything else makes the folder the user's: refused,
never touched. ``--overwrite`` runs in a temporary folder beside the old adapter and takes its place
only when the run has succeeded, so a failed run leaves the old adapter as it was.

A run holds the folder's lock (locks.py) from its first check to its end, and, holding it, clears what
a killed run left (:func:`claim`): the temporary folder of a killed ``--overwrite`` run (which is not
resumable: the old adapter stays, run ``--overwrite`` again), a swap cut between its two renames (the
old adapter is put back, or the new one is completed), and temporaries inside the folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, first_non_finite
from ..files import AtomicFolder, atomic_save_numpy_safetensors, remove_partials, temp_folder_beside
from ..locks import output_lock
from .adapter import CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE
from .bank import BANK_META, BANK_TENSORS, read_bank

CHECKPOINTS = "checkpoints"
BANK_DIR = "bank"
CACHE_FILE = ".prefix-cache.bin"
STEP_DIR = re.compile(r"step-\d+")
CHECKPOINT_FILES = ("state.json", "state.safetensors")
BANK_FILES = (BANK_META, BANK_TENSORS)
WHAT = "adapter path"


def _leftover(name: str) -> bool:
    """A temporary name of our atomic writes (files.py: ``.NAME.partial-*``) or a prefix cache file."""
    return name.startswith(".") and (".partial-" in name or name.startswith(CACHE_FILE[:-4]))


def _holds_only(folder: Path, names) -> bool:
    return all((e.name in names and e.is_file() and not e.is_symlink()) or _leftover(e.name) for e in folder.iterdir())


def _rows_of_ours(path: Path, key: str) -> bool:
    """Whether a file is JSON (``key`` = None: one object with a ``moe_local`` section) or JSON lines of
    objects with ``key`` (a torn last line, as an interrupted run leaves, allowed)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    lines = text.splitlines()
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue
            return False
        if not isinstance(row, dict) or key not in row:
            return False
    return True


def _our_config(path: Path) -> bool:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and isinstance(config.get("moe_local"), dict)


def _kind(entry: Path) -> str | None:
    """What a visible entry of an adapter folder provably is: ``"mark"`` (ours, and it marks the folder as
    an adapter), ``"ours"`` (ours when the folder is marked) or None (the user's)."""
    name = entry.name
    if entry.is_symlink():
        return None
    if name == CONFIG_FILE:
        return "mark" if entry.is_file() and _our_config(entry) else None
    if name == WEIGHTS_FILE:
        return "ours" if entry.is_file() else None
    if name == METRICS_FILE:
        return "ours" if entry.is_file() and _rows_of_ours(entry, "step") else None
    if name == BANK_DIR:
        ok = entry.is_dir() and (entry / BANK_META).is_file() and _holds_only(entry, BANK_FILES)
        return "mark" if ok else None
    if name == CHECKPOINTS and entry.is_dir():
        steps = [e for e in entry.iterdir() if not _leftover(e.name)]
        if not all(
            STEP_DIR.fullmatch(e.name) and e.is_dir() and not e.is_symlink() and _holds_only(e, CHECKPOINT_FILES)
            for e in steps
        ):
            return None
        return "mark" if any((e / "state.json").is_file() for e in steps) else "ours"
    return None


def check_output(out: Path, resume: bool, overwrite: bool, keep_bank: bool = False) -> str:
    """How a run may use the adapter folder ``out``; refuses what would touch the user's files.

    Returns ``"new"`` (absent or empty: the run writes there), ``"resume"`` (continue its checkpoints
    there) or ``"replace"`` (``overwrite`` of an adapter: see :class:`RunFolder`). ``keep_bank``: the bank
    this run reads is ``out/bank`` (the default), which stays.
    """
    out = Path(out)
    if resume and overwrite:
        raise UserError("give --resume or --overwrite, not both")
    if out.exists() and not out.is_dir():
        raise UserError(f"adapter path {out} is a file, not an adapter folder; it is never overwritten")
    entries = sorted(e for e in out.iterdir() if not e.name.startswith(".")) if out.is_dir() else []
    kinds = {e.name: "mark" if keep_bank and e.name == BANK_DIR else _kind(e) for e in entries}
    foreign = [name for name, kind in kinds.items() if kind is None]
    if not foreign and entries and "mark" not in kinds.values():
        foreign = [entries[0].name]
    if foreign:
        raise UserError(
            f"adapter path {out} holds files that are not a moe-local adapter ({foreign[0]}); "
            "it is never overwritten, give a new folder"
        )
    if resume:
        if latest_checkpoint(out) is None:
            raise UserError(f"nothing to resume: {out} has no checkpoints (run without --resume)")
        return "resume"
    if not [name for name in kinds if not (keep_bank and name == BANK_DIR)]:
        return "new"
    if not overwrite:
        raise UserError(
            f"adapter path {out} exists and is not empty; pass --resume to continue it or --overwrite to replace it"
        )
    return "replace"


class RunFolder:
    """Where a run writes, made once the checks have passed (on rank 0 only).

    ``new`` and ``resume`` write in ``out`` itself. ``replace`` writes in a temporary folder beside it and
    :meth:`finish` swaps it in (two renames on one file system), so a run that fails leaves the old
    adapter as it was (one that is killed leaves it too, with its own ``.NAME.partial-*`` folder beside
    it, which the next run on the folder removes).
    A failed ``new`` run keeps what the next run can use — its checkpoints (``--resume``), its bank (the
    next run takes ``out/bank``) — and removes the rest, and the folders it made if they end up empty.
    ``lock``: the folder's lock (an ExitStack), let go by :meth:`release`.
    """

    def __init__(self, out: Path, mode: str, keep_bank: bool = False, lock: contextlib.ExitStack | None = None):
        self.out, self.mode, self.keep_bank = Path(out), mode, keep_bank
        self.lock = lock or contextlib.ExitStack()
        self.made: list[Path] = []
        if mode == "replace":
            self.work = temp_folder_beside(self.out.resolve())
            return
        self.work = self.out
        self.made = [p for p in (self.out, *self.out.parents) if not p.exists()]
        self.out.mkdir(parents=True, exist_ok=True)

    def finish(self) -> None:
        """Swap the new adapter in: the old folder aside, the new one in its place, then the old one's kept
        bank and the user's hidden files moved over. A kill between any two steps is repaired by the next
        run's :func:`claim` (the name of the old folder says whether its bank is kept)."""
        if self.mode != "replace":
            return
        target = self.out.resolve()
        kind = OLD_KEEPING_BANK if self.keep_bank else OLD
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}{kind}", dir=target.parent))
        os.replace(target, old)  # a folder may take the name of an empty one
        try:
            os.replace(self.work, target)
        except OSError:  # the old adapter is whole again; the new run is dropped by abandon()
            os.replace(old, target)
            raise
        _carry(old, target, self.keep_bank)
        shutil.rmtree(old, ignore_errors=True)

    def release(self) -> None:
        """Let the folder's lock go (after :meth:`finish` or :meth:`abandon`)."""
        self.lock.close()

    def abandon(self) -> None:
        """After a failure; never raises, so the run's own error is the one reported."""
        with contextlib.suppress(OSError):
            if self.mode == "replace":
                shutil.rmtree(self.work, ignore_errors=True)
            elif self.mode == "new" and latest_checkpoint(self.out) is None:
                (self.out / METRICS_FILE).unlink(missing_ok=True)
                for folder in self.made:  # deepest first
                    if folder.is_dir() and not any(folder.iterdir()):
                        folder.rmdir()


OLD, OLD_KEEPING_BANK = ".old-", ".old-bank-"


def _carry(old: Path, new: Path, keep_bank: bool) -> None:
    """Move what the new adapter folder takes from the old one: its kept bank, the user's hidden files."""
    for entry in old.iterdir():
        kept = (keep_bank and entry.name == BANK_DIR) or (entry.name.startswith(".") and not _leftover(entry.name))
        if kept and not (new / entry.name).exists():
            os.replace(entry, new / entry.name)


def _repair(out: Path) -> None:
    """Undo or complete what a killed run left in and beside the adapter folder (under its lock, so no
    live run owns any of it): an ``--overwrite`` swap cut short, and temporaries of atomic writes."""
    target = Path(out).resolve()
    remove_partials(target)  # a killed --overwrite run's folder: its checkpoints are not resumable
    for old in sorted(target.parent.glob(f".{target.name}{OLD}*")):
        if not target.exists():  # killed between the two renames: the old adapter comes back whole
            os.replace(old, target)
            continue
        _carry(old, target, old.name.startswith(f".{target.name}{OLD_KEEPING_BANK}"))
        shutil.rmtree(old, ignore_errors=True)
    for folder in (target, target / CHECKPOINTS, target / BANK_DIR):
        if folder.is_dir() and not folder.is_symlink():
            for entry in folder.iterdir():
                if _leftover(entry.name):
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


@contextlib.contextmanager
def claim(out: Path):
    """Hold the adapter folder's lock (a second run is refused, naming this one) and repair what a killed
    run left; reentrant, so the command and the tune it calls both claim the folder."""
    with output_lock(out, WHAT):
        _repair(out)
        yield


def rank_cache_path(out: Path, rank: int) -> Path:
    """Where rank ``rank`` > 0 keeps its prefix cache on disk: beside the output folder, which is rank 0's."""
    side = Path(out).resolve()
    return side.parent / f".{side.name}.prefix-cache.rank{rank}.bin"


def default_bank(out: Path, bank, overwrite: bool):
    """(the bank to use, whether it is ``out/bank``): ``out/bank`` when no bank is given and one is there
    (made by ``moe-local prepare --bank A/bank`` or by an interrupted run), unless ``overwrite``."""
    bank_dir = Path(out) / BANK_DIR
    if bank is None and not overwrite and (bank_dir / BANK_META).is_file():
        bank = bank_dir
    keep = isinstance(bank, (str, Path)) and Path(bank).resolve() == bank_dir.resolve()
    return bank, keep


def latest_checkpoint(out: Path) -> Path | None:
    folder = Path(out) / CHECKPOINTS
    done = sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file()) if folder.is_dir() else []
    return done[-1] if done else None


def save_checkpoint(out: Path, opt, info: dict, keep: int) -> None:
    tensors, opt_info = opt.state()
    folder = Path(out) / CHECKPOINTS / f"step-{opt.step_count:08d}"
    if folder.exists():
        shutil.rmtree(folder)
    with AtomicFolder(folder) as tmp:
        atomic_save_numpy_safetensors(tmp / "state.safetensors", tensors)
        (tmp / "state.json").write_text(json.dumps({**info, "optimizer": opt_info}, indent=2) + "\n")
    old = sorted(p for p in folder.parent.glob("step-*") if p != folder)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path) -> tuple[dict, dict]:
    """(the tensors, the state) of a checkpoint; one with a NaN or infinite value is refused."""
    from safetensors.numpy import load_file

    tensors = load_file(str(path / "state.safetensors"))
    if (bad := first_non_finite(tensors)) is not None:
        raise UserError(f"{path / 'state.safetensors'}: {bad} holds NaN or infinite values; it cannot be resumed")
    return tensors, json.loads((path / "state.json").read_text())


def check_resume(info: dict, hyperparameters: dict, data_sha: str, fingerprint: dict, where: Path) -> None:
    if info.get("data_sha256") != data_sha:
        raise UserError(f"cannot resume {where}: it was tuned on other data")
    if info.get("fingerprint") != fingerprint:
        raise UserError(f"cannot resume {where}: it was tuned on another model")
    saved, now = info.get("hyperparameters", {}), hyperparameters
    for key in now:
        if saved.get(key) != now[key]:
            raise UserError(
                f"cannot resume {where}: it was started with {key}={saved.get(key)!r}, "
                f"now {key}={now[key]!r} (use the same settings, or --overwrite)"
            )


def metrics_upto(out: Path, step: int) -> list[dict]:
    """Rows already logged up to ``step``; a torn last line of an interrupted run is dropped."""
    path = out / METRICS_FILE
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("step", step + 1) <= step:
                rows.append(row)
    return rows


@dataclass
class RunStart:
    """What rank 0 finds and makes before a run: the run folder, the bank to start from (a Bank, or None
    to make one), the latest checkpoint's ``(tensors, state)`` (empty for a fresh run) and the metrics
    rows logged up to it."""

    folder: RunFolder
    bank: object
    checkpoint: tuple[dict, dict]
    logged: list


def open_run(
    out: Path, bank, resume: bool, overwrite: bool, hyperparameters: dict, data_sha: str, fingerprint: dict
) -> RunStart:
    """Claim the output folder (its lock, held by the run folder until it is released), check it (and, on
    ``resume``, that its checkpoint matches this run), read what the run starts from, and make the run
    folder once every check has passed."""
    lock = contextlib.ExitStack()
    lock.enter_context(claim(out))
    try:
        given, keep_bank = default_bank(out, bank, overwrite)
        mode = check_output(out, resume, overwrite, keep_bank=keep_bank)
        latest = latest_checkpoint(out) if resume else None
        tensors, info = load_checkpoint(latest) if latest else ({}, {})
        if latest:
            check_resume(info, hyperparameters, data_sha, fingerprint, out)
        if isinstance(given, (str, Path)):
            given = read_bank(given)
        logged = metrics_upto(out, int(info["optimizer"]["step"])) if latest else []
        return RunStart(RunFolder(out, mode, keep_bank, lock), given, (tensors, info), logged)
    except BaseException:
        lock.close()
        raise
