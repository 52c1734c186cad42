"""``moe-local tune``: router tuning with RoMA (or CE only) -> an adapter folder."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from moe_local.tuning.tune import CACHE_MODES, METHODS, TuneSettings

from .options import ConfigCommand, backend_option, device_option, model_option
from .prepare import ASKED, data_options, load_data

D = TuneSettings()


@click.command(cls=ConfigCommand)
@model_option
@backend_option
@device_option
@data_options
@click.option(
    "--bank",
    default=None,
    type=click.Path(file_okay=False),
    help="A routing bank from `moe-local prepare`; default: made here, kept in ADAPTER_PATH/bank.",
)
@click.option("--adapter-path", required=True, type=click.Path(), help="Output adapter folder.")
@click.option(
    "--method",
    type=click.Choice(METHODS),
    default=D.method,
    show_default=True,
    help="roma: CE + λ·manifold; router: CE only, same loop.",
)
@click.option(
    "--layers",
    type=int,
    default=D.layers,
    help="Tune the last N MoE layers [default: 5, or every MoE layer when the model has fewer].",
)
@click.option("--k", type=int, default=D.k, show_default=True, help="Neighbours among successful samples.")
@click.option("--lam", type=float, default=D.lam, show_default=True, help="Weight λ of the manifold term.")
@click.option(
    "--sigma",
    type=float,
    default=D.sigma,
    show_default=True,
    help="Gaussian kernel width (unit-norm embedding distances).",
)
@click.option("--lr", type=float, default=D.lr, show_default=True, help="AdamW learning rate.")
@click.option("--weight-decay", type=float, default=D.weight_decay, show_default=True, help="AdamW weight decay.")
@click.option("--epochs", type=int, default=D.epochs, show_default=True)
@click.option(
    "--batch-size",
    type=int,
    default=D.batch_size,
    show_default=True,
    help="Samples per step (the global batch under torchrun).",
)
@click.option(
    "--lam-warmup",
    type=int,
    default=D.lam_warmup,
    show_default=True,
    help="Steps over which λ rises linearly from 0 (0: none).",
)
@click.option("--seed", type=click.IntRange(min=0), default=D.seed, show_default=True, help="Shuffling seed.")
@click.option("--log-every", type=int, default=D.log_every, show_default=True, help="Steps per metrics row.")
@click.option(
    "--save-every",
    type=int,
    default=D.save_every,
    show_default=True,
    help="Steps per checkpoint (also at each epoch's end).",
)
@click.option(
    "--prefix-cache",
    type=click.Choice(CACHE_MODES),
    default=D.prefix_cache,
    show_default=True,
    help="Frozen layers below the first tuned one: kept in memory, memory-mapped on disk, recomputed "
    "each step, or the full model run each step; auto = memory when within the budget.",
)
@click.option(
    "--cache-budget-gb",
    type=float,
    default=D.cache_budget_gb,
    show_default=True,
    help="Largest prefix cache kept in memory under --prefix-cache auto.",
)
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in ADAPTER_PATH.")
@click.option(
    "--overwrite", is_flag=True, help="Replace an adapter folder made by moe-local (once the new run has succeeded)."
)
def tune(model, backend, device, data, embeddings, bank, adapter_path, resume, overwrite, **hyper):
    """Fine-tune only the routers of the last MoE layers on a reference task set.

    Data parallel under torchrun: torchrun --nproc-per-node N -m moe_local tune ... --backend torch
    (--batch-size is the global batch)."""
    import moe_local
    from moe_local.distributed import session
    from moe_local.tuning.folder import check_output, claim, default_bank
    from moe_local.tuning.tune import tune as run_tune

    asked = {key: hyper.pop(key) for key in ASKED}  # the data options, not hyper-parameters
    settings = TuneSettings(**hyper)
    settings.check()
    with session(device, backend) as (dist, device), contextlib.ExitStack() as held:

        def fail_fast():  # rank 0 owns the output folder: it holds it from here to the end
            held.enter_context(claim(Path(adapter_path)))
            given, keep_bank = default_bank(Path(adapter_path), bank, overwrite)
            check_output(Path(adapter_path), resume, overwrite, keep_bank=keep_bank)
            return given

        bank = dist.on_main(fail_fast)
        records, prompting, emb = load_data(data, embeddings, bank is None, **asked)
        loaded = moe_local.load(model, backend=backend, device=device)
        result = run_tune(
            loaded,
            records,
            emb,
            settings,
            adapter_path,
            bank=bank,
            data_file=data,
            resume=resume,
            overwrite=overwrite,
            dist=dist,
            prompting=prompting,
        )
        if dist.is_main:
            ranks = f", {dist.world} processes" if dist.world > 1 else ""
            click.echo(
                f"wrote {adapter_path}: {settings.method}, layers {list(result.layers)}, {result.steps} steps"
                f"{ranks}, {result.samples_per_s:.1f} samples/s, peak {result.peak_mem_gb:.2f} GB"
            )
