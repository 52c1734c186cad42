"""Write Hugging Face model folders: safetensors (sharded above 5 GB), config.json, tokenizer files.

Writing takes any array type (numpy, torch, mlx) and the config.json object to write; what a family
writes into config.json is the family's business (moe_local/families/).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

from ..files import AtomicFolder, refuse_existing
from .folder import INDEX_FILE, TOKENIZER_FILES, model_file

SHARD_BYTES = 5 * 1024**3


def _nbytes(array) -> int:
    if hasattr(array, "nbytes"):
        return int(array.nbytes)
    return array.numel() * array.element_size()  # torch


def _save_tensors(tensors: Mapping, path: Path, metadata: dict) -> None:
    first = next(iter(tensors.values()))
    module = type(first).__module__.split(".")[0]
    if module == "torch":
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    elif module == "mlx":
        import mlx.core as mx

        mx.save_safetensors(str(path), dict(tensors), metadata=metadata)
    else:
        from safetensors.numpy import save_file

        save_file(dict(tensors), str(path), metadata=metadata)


def write_weights(folder: Path, tensors: Mapping, max_shard_bytes: int = SHARD_BYTES) -> None:
    """model.safetensors, or numbered shards plus an index when above ``max_shard_bytes``."""
    folder = Path(folder)
    metadata = {"format": "pt"}
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        n = _nbytes(tensors[name])
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += n
    if current:
        shards.append(current)
    if len(shards) == 1:
        _save_tensors(shards[0], folder / "model.safetensors", metadata)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _save_tensors(shard, folder / name, metadata)
        for key in shard:
            weight_map[key] = name
            total += _nbytes(shard[key])
    (folder / INDEX_FILE).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """The tokenizer files that are regular files inside ``src`` (a link out of it is refused), their contents
    copied into new files (so they take the umask's mode, not their source's)."""
    for name in TOKENIZER_FILES:
        source = model_file(src, name)
        if source is not None:
            shutil.copyfile(source, Path(dst) / name)


def carry_remote_code(config: dict, src: Path | None, dst: Path) -> None:
    """Keep ``auto_map`` only with the code files it names (GroveMoE's own ecosystem loads through
    them); this package never runs them. Without those files the entry would point nowhere: drop it."""
    auto_map = config.get("auto_map")
    if not auto_map:
        return
    refs = [v for value in auto_map.values() for v in (value if isinstance(value, list) else [value]) if v]
    files = {ref.split("--")[-1].rsplit(".", 1)[0] + ".py" for ref in refs}
    sources = [model_file(src, f) for f in sorted(files)] if src is not None else [None]
    if all(sources):
        for f, source in zip(sorted(files), sources):
            shutil.copyfile(source, Path(dst) / f)
    else:
        del config["auto_map"]


def write_model(
    out: Path, config: dict, tensors: Mapping, tokenizer_src: Path | None = None, max_shard_bytes: int = SHARD_BYTES
) -> Path:
    """Write a complete model folder atomically; refuses an existing non-empty ``out``."""
    out = Path(out)
    refuse_existing(out)
    config = dict(config)
    with AtomicFolder(out) as tmp:
        write_weights(tmp, tensors, max_shard_bytes)
        carry_remote_code(config, tokenizer_src, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_src is not None:
            copy_tokenizer_files(tokenizer_src, tmp)
    return out
