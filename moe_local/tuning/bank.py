"""The routing bank: per reference sample, whether the base model answers it, its routing and its
embedding — the fixed neighbour targets of RoMA's manifold term (docs/architecture.md: the bank folder).

``bank.safetensors`` holds ``correct [N] uint8``, ``routing [N, layers, experts] float32`` and
``embeddings [N, D] float32``; ``bank.json`` the model fingerprint, the tuned layers and the data's hash.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError, first_non_finite
from ..files import AtomicFolder, atomic_save_numpy_safetensors, atomic_write_text

BANK_TENSORS = "bank.safetensors"
BANK_META = "bank.json"


@dataclass
class Bank:
    """Per reference sample: answered correctly by the base model, its routing, its embedding."""

    correct: np.ndarray  # [N] uint8
    routing: np.ndarray  # [N, layers, experts] float32
    embeddings: np.ndarray  # [N, D] float32
    meta: dict  # fingerprint, layers, data file and hash

    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"])


def check_bank_folder(folder, overwrite: bool = True) -> Path:
    """Refuse a bank path that is a file or a folder of other files; an old bank is replaced only with ``overwrite``."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"bank path {folder} is a file; give a folder")
    if folder.is_dir() and any(folder.iterdir()):
        if not (folder / BANK_META).is_file():
            raise UserError(f"bank folder {folder} holds files that are not a routing bank; give a new folder")
        if not overwrite:
            raise UserError(f"bank folder {folder} exists; pass --overwrite to replace it")
    return folder


def write_bank(folder, bank: Bank) -> Path:
    """Write ``bank.safetensors`` and ``bank.json`` into a new folder atomically (replacing an old bank)."""
    folder = check_bank_folder(folder)
    tensors = {
        "correct": np.ascontiguousarray(bank.correct, dtype=np.uint8),
        "routing": np.ascontiguousarray(bank.routing, dtype=np.float32),
        "embeddings": np.ascontiguousarray(bank.embeddings, dtype=np.float32),
    }
    if folder.is_dir():  # an old bank: replace file by file, each atomically
        atomic_save_numpy_safetensors(folder / BANK_TENSORS, tensors)
        atomic_write_text(folder / BANK_META, json.dumps(bank.meta, indent=2) + "\n")
        return folder
    with AtomicFolder(folder) as tmp:
        atomic_save_numpy_safetensors(tmp / BANK_TENSORS, tensors)
        (tmp / BANK_META).write_text(json.dumps(bank.meta, indent=2) + "\n")
    return folder


def read_bank(folder) -> Bank:
    folder = Path(folder)
    meta_path, tensor_path = folder / BANK_META, folder / BANK_TENSORS
    if not meta_path.is_file() or not tensor_path.is_file():
        raise UserError(
            f"{folder} is not a routing bank (it needs {BANK_META} and {BANK_TENSORS}); "
            "make one with `moe-local prepare`"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{meta_path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    from safetensors.numpy import load_file

    try:
        t = load_file(str(tensor_path))
    except Exception:  # safetensors raises its own error types for corrupt files
        raise UserError(f"{tensor_path} is not a readable safetensors file") from None
    for key in ("correct", "routing", "embeddings"):
        if key not in t:
            raise UserError(f"{tensor_path} lacks the '{key}' tensor")
    if not isinstance(meta, dict) or "layers" not in meta or "fingerprint" not in meta:
        raise UserError(f"{meta_path} is not a routing bank description (no 'layers'/'fingerprint')")
    n = len(t["correct"])
    if (
        t["routing"].ndim != 3
        or t["routing"].shape[0] != n
        or t["routing"].shape[1] != len(meta["layers"])
        or t["embeddings"].ndim != 2
        or t["embeddings"].shape[0] != n
    ):
        raise UserError(f"{tensor_path}: tensor shapes disagree with each other or with {BANK_META}")
    if (bad := first_non_finite({k: t[k] for k in ("routing", "embeddings")})) is not None:
        raise UserError(f"{tensor_path}: '{bad}' holds NaN or infinite values")
    return Bank(t["correct"], t["routing"], t["embeddings"], meta)


def check_bank_model(bank: Bank, spec, where) -> None:
    """A bank must come from this model (its fingerprint over the bank's layers)."""
    try:
        ours = spec.fingerprint(bank.layers)
    except UserError:  # a layer that is not an MoE layer here
        ours = None
    if bank.meta["fingerprint"] != ours:
        raise UserError(f"the routing bank {where} was made for another model; run `moe-local prepare` again")


def check_bank(bank: Bank, spec, layers, data_sha256: str, where) -> None:
    """A bank must come from this model, these tuned layers and this data file."""
    check_bank_model(bank, spec, where)
    if list(layers) != bank.layers:
        raise UserError(f"the routing bank {where} covers layers {bank.layers}, the tune asks for {list(layers)}")
    if bank.meta.get("data_sha256") != data_sha256:
        raise UserError(
            f"the routing bank {where} was made from other data ({bank.meta.get('data_file')}); "
            "run `moe-local prepare` again"
        )
