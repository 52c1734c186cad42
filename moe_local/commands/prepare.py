"""``moe-local prepare``: one base-model pass over the reference set -> the routing bank."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from .options import ConfigCommand, backend_option, device_option, model_option, prompt_options, task_data_options


def data_options(f):
    """The reference data, how it is asked, and its embeddings (prepare, tune)."""
    f = click.option(
        "--embeddings",
        default=None,
        type=click.Path(dir_okay=False),
        help="Task embeddings (.npy [records, D]); default: the data path with .npy.",
    )(f)
    return task_data_options(prompt_options(f))


# The options data_options adds besides --data and --embeddings, as load_data takes them.
ASKED = ("split", "fields", "limit", "format", "num_fewshot")


def load_data(data, embeddings, need_embeddings=True, **asked):
    """(records, prompting, unit-row embeddings or None) with one-line errors; ``asked``: ASKED's options."""
    from moe_local.tuning.data import read_task
    from moe_local.tuning.embeddings import default_embeddings_path, load_embeddings

    records, prompting = read_task(data, **asked)
    split, limited = asked.get("split"), asked.get("limit") is not None
    if embeddings is None and not need_embeddings and not default_embeddings_path(data, split).is_file():
        return records, prompting, None
    return records, prompting, load_embeddings(embeddings, len(records), data, split, limited)


@click.command(cls=ConfigCommand)
@model_option
@backend_option
@device_option
@data_options
@click.option(
    "--layers",
    type=click.IntRange(min=1),
    default=None,
    help="Tune the last N MoE layers [default: 5, or every MoE layer when the model has fewer].",
)
@click.option("--bank", required=True, type=click.Path(), help="Output folder for the routing bank.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Samples per forward pass (per process).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing bank.")
def prepare(model, backend, device, data, embeddings, layers, bank, batch_size, overwrite, **asked):
    """Record which reference samples the base model answers correctly and their routing (the bank)."""
    import moe_local
    from moe_local.distributed import session
    from moe_local.locks import output_lock
    from moe_local.tuning.bank import check_bank_folder, write_bank
    from moe_local.tuning.prepare import prepare as run_prepare

    bank = Path(bank)
    # under torchrun each rank runs its share of the records
    with session(device, backend) as (dist, device), contextlib.ExitStack() as held:

        def claim():  # the output is rank 0's: locked and checked before any work
            held.enter_context(output_lock(bank, "bank folder"))
            check_bank_folder(bank, overwrite)

        dist.on_main(claim)
        records, prompting, emb = load_data(data, embeddings, True, **asked)
        loaded = moe_local.load(model, backend=backend, device=device)
        result = run_prepare(loaded, records, emb, layers, batch_size, data_file=data, dist=dist, prompting=prompting)
        if dist.is_main:
            write_bank(bank, result)
            click.echo(
                f"wrote {bank}: {len(records)} samples, {int(result.correct.sum())} answered correctly, "
                f"layers {result.layers}"
            )
