"""``moe-local embed``: task embeddings for task data with a local sentence-transformers model."""

from __future__ import annotations

import io
from pathlib import Path

import click
import numpy as np

from moe_local.errors import UserError
from moe_local.files import atomic_write_bytes
from moe_local.tuning.data import embedding_text, read_records
from moe_local.tuning.embeddings import compute_embeddings, default_embeddings_path

from .options import ConfigCommand, task_data_options


@click.command(cls=ConfigCommand)
@task_data_options
@click.option(
    "--out",
    default=None,
    type=click.Path(dir_okay=False),
    help="Output .npy [records, D] float32; default: the data path with .npy.",
)
@click.option(
    "--embedder",
    default=None,
    type=click.Path(file_okay=False),
    help="A local sentence-transformers model folder; default: the offline all-MiniLM-L6-v2 package.",
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Texts per encoder batch."
)
@click.option("--device", default=None, help="torch device for the encoder (default cpu).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def embed(data, split, fields, limit, out, embedder, batch_size, device, overwrite):
    """Embed each record's question and choices (the prompt without its final 'Answer:')."""
    out = Path(out) if out else default_embeddings_path(data, split)
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    if out.suffix != ".npy":
        raise UserError(f"--out must end in .npy, got {out}")
    records = read_records(data, split, fields, limit)
    array = compute_embeddings([embedding_text(r) for r in records], embedder, batch_size, "auto", device=device)
    buffer = io.BytesIO()
    np.save(buffer, array.astype(np.float32), allow_pickle=False)
    atomic_write_bytes(out, buffer.getvalue())
    click.echo(f"wrote {out}: {array.shape[0]} x {array.shape[1]} float32")
