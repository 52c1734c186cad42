"""The tune's output folder: what may be replaced, checkpoints, and what ``--resume`` continues from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from . import roma
from .adapter import CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE
from .errors import UserError
from .files import AtomicFolder, atomic_save_numpy_safetensors

CHECKPOINTS = "checkpoints"
BANK_DIR = "bank"
CACHE_FILE = ".prefix-cache.bin"
# Entries of an adapter folder this package writes; anything else there is the user's and is never touched.
OURS = (WEIGHTS_FILE, CONFIG_FILE, METRICS_FILE, CHECKPOINTS, BANK_DIR)


def check_output(out: Path, resume: bool, overwrite: bool, keep_bank: bool = False, clear: bool = True) -> None:
    """Refuse what would overwrite the user's files; clear our own with ``overwrite`` (and ``clear``)."""
    out = Path(out)
    if resume and overwrite:
        raise UserError("give --resume or --overwrite, not both")
    if out.exists() and not out.is_dir():
        raise UserError(f"adapter path {out} is a file, not an adapter folder; it is never overwritten")
    entries = [e for e in out.iterdir() if not e.name.startswith(".")] if out.is_dir() else []
    if keep_bank:   # the bank given for this run may live in the adapter folder (A/bank, the default)
        entries = [e for e in entries if e.name != BANK_DIR]
    foreign = [e.name for e in entries if e.name not in OURS]
    if not foreign and (out / CONFIG_FILE).is_file():
        try:
            ours = isinstance(json.loads((out / CONFIG_FILE).read_text()).get("moe_local"), dict)
        except (json.JSONDecodeError, AttributeError):
            ours = False
        if not ours:
            foreign = [CONFIG_FILE]
    if foreign:
        raise UserError(f"adapter path {out} holds files that are not a moe-local adapter ({foreign[0]}); "
                        "it is never overwritten, give a new folder")
    if resume:
        if latest_checkpoint(out) is None:
            raise UserError(f"nothing to resume: {out} has no checkpoints (run without --resume)")
        return
    if entries and not overwrite:
        raise UserError(f"adapter path {out} exists and is not empty; pass --resume to continue it "
                        "or --overwrite to replace it")
    for e in entries if clear else []:
        shutil.rmtree(e) if e.is_dir() else e.unlink()


def default_bank(out: Path, bank, overwrite: bool):
    """(the bank to use, whether it is ``out/bank``): ``out/bank`` when no bank is given and one is there
    (made by ``moe-local prepare --bank A/bank`` or by an interrupted run), unless ``overwrite``."""
    bank_dir = Path(out) / BANK_DIR
    if bank is None and not overwrite and (bank_dir / roma.BANK_META).is_file():
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
    for p in old[:max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path) -> tuple[dict, dict]:
    from safetensors.numpy import load_file

    return load_file(str(path / "state.safetensors")), json.loads((path / "state.json").read_text())


def check_resume(info: dict, hyperparameters: dict, data_sha: str, fingerprint: dict, where: Path) -> None:
    if info.get("data_sha256") != data_sha:
        raise UserError(f"cannot resume {where}: it was tuned on other data")
    if info.get("fingerprint") != fingerprint:
        raise UserError(f"cannot resume {where}: it was tuned on another model")
    saved, now = info.get("hyperparameters", {}), hyperparameters
    for key in now:
        if saved.get(key) != now[key]:
            raise UserError(f"cannot resume {where}: it was started with {key}={saved.get(key)!r}, "
                            f"now {key}={now[key]!r} (use the same settings, or --overwrite)")


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
