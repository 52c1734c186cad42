"""``moe-local eval``: multiple-choice accuracy, per task, with the oracle-routing bound and its control,
and C3PO's test-time re-mixing toward a routing bank."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import click

from moe_local.errors import UserError
from moe_local.files import atomic_write_text

from .options import (
    ConfigCommand,
    adapter_option,
    backend_option,
    device_option,
    model_option,
    prompt_options,
    seed_option,
    task_data_options,
)
from .prepare import load_data


def read_report(path: Path) -> list[dict]:
    """The rows of an existing report ([] when there is none); anything else at ``path`` is refused."""
    if not path.exists():
        return []
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError):
        old = None
    if not isinstance(old, list) or not all(isinstance(r, dict) and "method" in r for r in old):
        raise UserError(f"{path} exists and is not a moe-local report; give a new file")
    return old


def append_report(path: Path, rows: list[dict]) -> None:
    """Write the rows as a JSON list; an existing report of rows is extended, anything else refused."""
    atomic_write_text(path, json.dumps(read_report(path) + rows, indent=2) + "\n")


def read_c3po(c3po: bool, bank, data, embeddings, settings: tuple, asked: dict):
    """(records, prompting, a :class:`C3PO` or None) with C3PO's inputs checked before the model loads:
    the bank, the records' embeddings (count and dimension), the prompts the bank was recorded with."""
    from moe_local.tuning.bank import read_bank
    from moe_local.tuning.c3po import C3PO
    from moe_local.tuning.data import read_task

    if c3po != (bank is not None):
        raise UserError("--c3po and --bank go together: C3PO re-mixes toward a routing bank")
    if not c3po:
        return (*read_task(data, **asked), None)
    records, prompting, emb = load_data(data, embeddings, True, **asked)
    the_bank = read_bank(bank)
    theirs = the_bank.meta.get("prompting") or {"format": "mc", "shots": 0}
    if (theirs["format"], theirs["shots"]) != (prompting.format, prompting.shots):
        raise UserError(
            f"the routing bank {bank} was recorded with {theirs['format']} prompts and {theirs['shots']} "
            f"examples, this evaluation asks {prompting.format} with {prompting.shots}: give --format and "
            "--num-fewshot as for `prepare`"
        )
    return records, prompting, C3PO(the_bank, emb, *settings)


@click.command(cls=ConfigCommand)
@model_option
@backend_option
@device_option
@adapter_option
@task_data_options
@prompt_options
@click.option(
    "--layers",
    type=click.IntRange(min=1),
    default=None,
    help="Oracle offsets on the last N MoE layers (an adapter's own layers when one is given) "
    "[default: 5, or every MoE layer when the model has fewer].",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Samples per forward pass (per process).",
)
@click.option("--oracle", is_flag=True, help="Also report oracle routing accuracy and its wrong-label control.")
@click.option(
    "--oracle-steps", type=click.IntRange(min=0), default=20, show_default=True, help="Adam steps per sample."
)
@click.option(
    "--oracle-lr",
    type=click.FloatRange(min=0, min_open=True),
    default=0.1,
    show_default=True,
    help="Adam learning rate of the offsets.",
)
@click.option(
    "--report",
    default=None,
    type=click.Path(dir_okay=False),
    help="JSON report file (rows are appended to an existing report).",
)
@click.option(
    "--c3po",
    is_flag=True,
    help="Also report C3PO: each sample's routing re-mixed toward its successful neighbours in --bank.",
)
@click.option(
    "--bank",
    default=None,
    type=click.Path(file_okay=False),
    help="The routing bank C3PO re-mixes toward (`moe-local prepare` on the reference data).",
)
@click.option(
    "--embeddings",
    default=None,
    type=click.Path(dir_okay=False),
    help="The evaluated records' task embeddings for C3PO (.npy); default: the data path with .npy.",
)
@click.option("--c3po-k", type=click.IntRange(min=1), default=3, show_default=True, help="Neighbours per sample.")
@click.option(
    "--c3po-sigma",
    type=click.FloatRange(min=0, min_open=True),
    default=0.4,
    show_default=True,
    help="Gaussian kernel width (unit-norm embedding distances).",
)
@click.option(
    "--c3po-alpha",
    type=click.FloatRange(min=0, max=1, min_open=True),
    default=1.0,
    show_default=True,
    help="Share of the neighbours' routing in the re-mix (1: the kernel regression itself).",
)
@seed_option
def eval_(
    model,
    backend,
    device,
    adapter_path,
    data,
    layers,
    batch_size,
    oracle,
    oracle_steps,
    oracle_lr,
    report,
    c3po,
    bank,
    embeddings,
    c3po_k,
    c3po_sigma,
    c3po_alpha,
    seed,
    **asked,
):
    """Accuracy of the base model or an adapter on task data, overall and per task."""
    import moe_local
    from moe_local.distributed import session
    from moe_local.locks import output_lock
    from moe_local.tuning.adapter import check_adapter, read_adapter
    from moe_local.tuning.bank import check_bank_model
    from moe_local.tuning.evaluate import evaluate, format_result

    # under torchrun each rank scores its share of the file
    with session(device, backend) as (dist, device), contextlib.ExitStack() as held:

        def check_report():  # the report is rank 0's: locked and refused before any work, not after it
            held.enter_context(output_lock(Path(report), "--report"))
            read_report(Path(report))

        if report is not None:
            dist.on_main(check_report)
        records, prompting, remix = read_c3po(c3po, bank, data, embeddings, (c3po_k, c3po_sigma, c3po_alpha), asked)
        layers = layers if remix is None else tuple(remix.bank.layers)
        method, weights = "base", None
        if adapter_path is not None:  # read once: its layers and method here, its gates for the evaluation
            weights, config = read_adapter(adapter_path)
            method = config["moe_local"].get("method", "adapter")
            if c3po and list(layers) != config["moe_local"]["layers"]:
                raise UserError(
                    f"the routing bank {bank} covers layers {list(layers)}, the adapter "
                    f"{config['moe_local']['layers']}: C3PO re-mixes the layers the adapter tunes"
                )
            layers = tuple(config["moe_local"]["layers"])
        loaded = moe_local.load(model, backend=backend, device=device)
        if adapter_path is not None:
            check_adapter(weights, config, loaded.spec, Path(adapter_path))
        if remix is not None:
            check_bank_model(remix.bank, loaded.spec, bank)
        result = evaluate(
            loaded,
            records,
            layers,
            batch_size,
            router_weights=weights,
            oracle=oracle,
            oracle_steps=oracle_steps,
            oracle_lr=oracle_lr,
            seed=seed,
            dist=dist,
            data_file=data,
            prompting=prompting,
            c3po=remix,
        )
        if dist.is_main:
            for line in format_result(result, method):
                click.echo(line)
            if report is not None:
                split = Path(data).stem + (f"/{asked['split']}" if asked["split"] else "")
                append_report(Path(report), result.rows(model, split, method, seed, loaded.backend))
                click.echo(f"wrote {report}")


eval_.name = "eval"
