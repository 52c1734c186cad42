"""``moe-local demo``: prepare, tune (router and roma), evaluate and report on the embedded default."""

from __future__ import annotations

import click

from .options import ConfigCommand, backend_option, seed_option

MODELS = {"tiny": ("tiny",), "tiny-grove": ("tiny-grove",), "all": ("tiny", "tiny-grove")}


@click.command(cls=ConfigCommand)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="A new folder for the report and adapters [default: moe-local-demo-<date>-<time>].",
)
@backend_option
@click.option(
    "--model", type=click.Choice(list(MODELS)), default="all", show_default=True, help="Which built-in model(s) to run."
)
@seed_option
@click.option(
    "--progress",
    type=click.Choice(["auto", "bar", "lines", "off"]),
    default="auto",
    show_default=True,
    help="Progress display (bars on a terminal, plain lines otherwise).",
)
def demo(out, backend, model, seed, progress):
    """Show what RoMA does on the embedded tiny models, in a few minutes on a laptop CPU.

    For each model: one base pass (routing bank), router tuning with CE only and with RoMA, then
    accuracy of base / router / roma and the oracle bounds on held-out splits. Writes report.json,
    report.md, report.png and the adapters into a new folder.
    """
    from moe_local.demo import run_demo

    run_demo(out, backend=backend, models=MODELS[model], seed=seed, progress=progress, log=click.echo)
