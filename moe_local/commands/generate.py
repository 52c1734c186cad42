"""``moe-local generate``: one streamed answer to one prompt, then a footer line on stderr."""

from __future__ import annotations

import click

from .options import (
    ConfigCommand,
    adapter_option,
    backend_option,
    device_option,
    model_option,
    seed_option,
    stdin_lines,
)


def sampling_options(f):
    """--max-tokens, --temp, --top-p (mlx-lm's names and defaults); shared with ``chat``."""
    f = click.option(
        "--top-p",
        type=float,
        default=1.0,
        show_default=True,
        help="Nucleus sampling: keep the most likely tokens up to this probability mass.",
    )(f)
    f = click.option("--temp", type=float, default=0.0, show_default=True, help="Sampling temperature; 0 is greedy.")(f)
    return click.option(
        "--max-tokens", "-n", type=int, default=256, show_default=True, help="The most tokens to generate per answer."
    )(f)


@click.command(cls=ConfigCommand)
@model_option
@adapter_option
@click.option("--prompt", "-p", required=True, help="The message to answer ('-' reads it from standard input).")
@sampling_options
@seed_option
@click.option("--ignore-chat-template", is_flag=True, help="Feed the prompt as is, without the chat template.")
@backend_option
@device_option
def generate(model, adapter_path, prompt, max_tokens, temp, top_p, seed, ignore_chat_template, backend, device):
    """Answer one prompt, streaming the text; the footer line (stderr) gives tokens, tokens/s,
    prompt tokens/s and peak memory."""
    import moe_local
    from moe_local.chat import check_sampling

    check_sampling(max_tokens, temp, top_p)  # before the model loads
    if prompt == "-":
        prompt = "".join(stdin_lines())
    m = moe_local.load(model, backend=backend, adapter_path=adapter_path, device=device)
    answer = m.stream(
        prompt, max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed, chat_template=not ignore_chat_template
    )
    for piece in answer:
        click.echo(piece, nl=False)
    click.echo()
    click.echo(answer.stats.footer(), err=True)
