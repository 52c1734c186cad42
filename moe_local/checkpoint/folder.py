"""Read Hugging Face model folders: config.json, safetensors (one file or shards), the tokenizer.

Reading needs no framework: tensor names and shapes come from the safetensors headers, so the
spec can be built and the checkpoint checked before torch or mlx is imported. Loading the tensors
themselves is the backends' job (they know their array type).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

from ..errors import UserError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_MODELS = {"tiny": ASSETS / "tiny", "tiny-grove": ASSETS / "tiny-grove"}
INDEX_FILE = "model.safetensors.index.json"
# Files that travel with a model folder besides config and weights (a vision-language release's
# processor configs too: its vision tower travels with it).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
)


def resolve_model(model) -> Path:
    """A built-in name (``tiny``, ``tiny-grove``) or a local folder holding config.json."""
    if str(model) in BUILTIN_MODELS:
        path = BUILTIN_MODELS[str(model)]
        if not (path / "config.json").is_file():
            raise UserError(
                f"the built-in model '{model}' is not installed with this copy of moe-local (expected {path})"
            )
        return path
    path = Path(model).expanduser()
    if not path.exists():
        raise UserError(
            f"model folder not found: {path} (give a local folder or one of: "
            f"{', '.join(BUILTIN_MODELS)}; nothing is downloaded)"
        )
    if not path.is_dir():
        raise UserError(f"--model must be a folder, not a file: {path}")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json")
    return path


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{folder} has no config.json") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} must hold a JSON object")
    return config


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files: those the index names, else the folder's *.safetensors files."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{index} is not a valid safetensors index (no 'weight_map')") from None
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{folder} lacks shard {missing[0]} named in {INDEX_FILE}")
        return files
    files = sorted(p for p in folder.glob("*.safetensors") if p.name != "adapters.safetensors")
    if not files:
        raise UserError(f"{folder} has no .safetensors weights")
    return files


def read_header(path: Path) -> dict:
    """name -> {"dtype", "shape"} from a safetensors file's JSON header, without loading data; a file
    shorter than its header says (a copy cut short) is refused here, before anything is loaded."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 * 1024**2:
                raise ValueError("header too large")
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        tensors = {name: {"dtype": v["dtype"], "shape": tuple(v["shape"])} for name, v in header.items()}
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (struct.error, ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError, AttributeError):
        raise UserError(f"{path} is not a safetensors file") from None
    size, needed = Path(path).stat().st_size, 8 + length + end
    if size < needed:
        raise UserError(f"{path} is truncated: {size} bytes, its header describes {needed}")
    return tensors


def tensor_index(folder: Path) -> dict[str, tuple[Path, str, tuple]]:
    """name -> (file, dtype, shape) over all weight files of a folder."""
    index = {}
    for path in safetensors_files(folder):
        for name, meta in read_header(path).items():
            index[name] = (path, meta["dtype"], meta["shape"])
    return index


def carried_tensor_names(folder: Path, is_carried) -> dict[Path, list[str]]:
    """The tensors a written folder keeps although no model reads them (``is_carried(name)``: the
    spec's rule), grouped by the file that holds them."""
    by_file: dict[Path, list[str]] = {}
    for name, (path, _, _) in tensor_index(folder).items():
        if is_carried(name):
            by_file.setdefault(path, []).append(name)
    return by_file


DTYPE_BYTES = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def weight_bytes(folder: Path) -> int:
    """Bytes of all weights as stored (quantized weights packed, with their scales and biases)."""
    total = 0
    for _, dtype, shape in tensor_index(folder).values():
        n = 1
        for d in shape:
            n *= d
        total += n * DTYPE_BYTES.get(dtype, 4)
    return total


def is_quantized(names: Iterable[str]) -> bool:
    """MLX-quantized checkpoints carry ``.scales`` next to packed weights."""
    return any(n.endswith(".scales") for n in names)


def has_weights(folder: Path) -> bool:
    return (folder / INDEX_FILE).is_file() or any(folder.glob("*.safetensors"))


def _root(folder: Path) -> Path:
    """What a model folder's links may point into: the folder itself, or, for a snapshot in the Hugging
    Face cache (``models--ORG--NAME/snapshots/REV``, whose files are links to ``../../blobs``), its repository."""
    real = Path(folder).resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent
    return real


def model_file(folder: Path, name: str) -> Path | None:
    """The regular file ``folder/name`` refers to, or None when there is none; a link that points out of
    the model folder is refused (a tokenizer or template linked to a file elsewhere is never read or copied)."""
    path = Path(folder) / name
    if not path.is_symlink():
        return path if path.is_file() else None
    target = path.resolve()
    root = _root(folder)
    if target != root and root not in target.parents:
        raise UserError(f"{path} is a link to {target}, outside the model folder; only files inside it are read")
    return target if target.is_file() else None


def check_model_files(folder: Path) -> None:
    """Refuse a folder whose tokenizer files link out of it (before a model is loaded from it)."""
    for name in TOKENIZER_FILES:
        model_file(folder, name)


def load_tokenizer(folder: Path):
    """The folder's Hugging Face tokenizer, from local files only (inside the folder: check_model_files)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    check_model_files(folder)
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise UserError(f"{folder} has no tokenizer files (tokenizer.json)")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a model type transformers lacks (grove_moe) only warns here
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer in {folder}: {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
