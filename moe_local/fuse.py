"""Fuse a router adapter into its base model: an ordinary model folder any engine can serve.

The folder is what the backend's ``save`` writes (moe_local.checkpoint.write_model): config.json
with both spellings, safetensors sharded above 5 GB, the tokenizer files, GroveMoE's format for
Grove models, written under a temporary name and renamed into place, so a failed fuse leaves
nothing. Its logits equal the base model's with the adapter applied.
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import check_model_files, is_quantized, resolve_model, tensor_index
from .errors import UserError
from .families import load_spec
from .files import refuse_existing
from .locks import output_lock
from .tuning.adapter import check_adapter, read_adapter


def fuse(model, adapter_path, save_path, backend: str = "auto", device: str | None = None) -> Path:
    """Write ``model`` with the adapter's gates into the new folder ``save_path`` (locked while written)."""
    folder = resolve_model(model)
    out = Path(save_path).expanduser()
    if out.resolve() == folder.resolve():
        raise UserError(f"--save-path {out} is the base model's own folder; give a new folder")
    if adapter_path is None:
        raise UserError("fuse needs --adapter-path (the router adapter to fuse)")
    with output_lock(out, "--save-path"):
        refuse_existing(out, "--save-path")
        weights, config = read_adapter(adapter_path)  # checked before a large model is loaded
        check_adapter(weights, config, load_spec(folder), Path(adapter_path))
        check_model_files(folder)
        return _fused(folder, adapter_path, out, backend, device)


def _fused(folder: Path, adapter_path, out: Path, backend: str, device: str | None) -> Path:
    import moe_local

    from .backends import resolve_backend

    name = resolve_backend(backend)
    if name == "torch":
        if is_quantized(tensor_index(folder)):
            raise UserError(f"{folder} is a quantized MLX model: quantized MLX models fuse with --backend mlx")
        device = device or "cpu"  # the weights are written from host memory anyway
    loaded = moe_local.load(folder, backend=name, adapter_path=adapter_path, device=device)
    return loaded.save(out)
