"""``moe-local fuse``: write base model + router adapter as one ordinary model folder."""

from __future__ import annotations

import click

from .options import ConfigCommand, backend_option, device_option, model_option


@click.command(cls=ConfigCommand)
@model_option
@click.option(
    "--adapter-path", type=click.Path(file_okay=False), required=True, help="The router adapter folder to fuse."
)
@click.option(
    "--save-path",
    type=click.Path(),
    required=True,
    help="A new folder for the fused model (refused if it exists and is not empty).",
)
@backend_option
@device_option
def fuse(model, adapter_path, save_path, backend, device):
    """Fuse a router adapter into its base model: config with both spellings, safetensors (sharded above
    5 GB), tokenizer files; loadable by transformers, mlx-lm, vLLM and the rest. Quantized MLX models
    keep their format with float gates (--backend mlx)."""
    from moe_local.checkpoint import tensor_index
    from moe_local.fuse import fuse as fuse_model

    out = fuse_model(model, adapter_path, save_path, backend=backend, device=device)
    size = sum(p.stat().st_size for p in out.iterdir() if p.suffix == ".safetensors")
    click.echo(f"fused model written to {out} ({len(tensor_index(out))} tensors, {size / 1e9:.2f} GB)")
