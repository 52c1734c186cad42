"""``moe-local chat``: a REPL that streams answers over a KV cache kept across turns (mlx-lm's keys).

In a terminal: a prompt, ``q`` quits, ``r`` resets the conversation, ``h`` shows help, and a footer
line after each answer. With piped standard input (one message per line) only the answers are
printed, one after another, each followed by a newline.
"""

from __future__ import annotations

import sys

import click

from moe_local.errors import UserError

from .generate import sampling_options
from .options import (
    ConfigCommand,
    adapter_option,
    backend_option,
    device_option,
    model_option,
    seed_option,
    stdin_lines,
)

HELP = "Type a message and press enter. Commands: q quits, r resets the conversation, h shows this help."


def _messages(interactive: bool):
    """Lines from the terminal (with a prompt) or from the pipe; ends at end of input."""
    if not interactive:
        for line in stdin_lines():
            yield line.rstrip("\r\n")
        return
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            yield input(">> ")
        except EOFError:
            click.echo()
            return
        except UnicodeDecodeError:
            click.echo("moe-local: error: that line is not UTF-8 text; type it again", err=True)


def _answer(conversation, text: str, interactive: bool) -> None:
    try:
        for piece in conversation.ask(text):
            click.echo(piece, nl=False)
    except UserError as e:
        if not interactive:
            raise
        click.echo(f"moe-local: error: {e}", err=True)
        return
    except KeyboardInterrupt:
        if not interactive:
            raise
        click.echo("\n(interrupted; the turn is dropped)", err=True)
        return
    click.echo()
    if interactive:
        click.echo(conversation.stats.footer(), err=True)


@click.command(cls=ConfigCommand)
@model_option
@adapter_option
@sampling_options
@seed_option
@click.option("--system-prompt", default=None, help="A system message at the start of the conversation.")
@backend_option
@device_option
def chat(model, adapter_path, max_tokens, temp, top_p, seed, system_prompt, backend, device):
    """Chat with a model (and a router adapter): answers stream as they are generated, the conversation's
    KV cache is reused from turn to turn. q quits, r resets, h helps."""
    import moe_local
    from moe_local.chat import check_sampling

    check_sampling(max_tokens, temp, top_p)
    interactive = sys.stdin.isatty()
    m = moe_local.load(model, backend=backend, adapter_path=adapter_path, device=device)
    conversation = m.chat(system_prompt=system_prompt, max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed)
    if interactive:
        adapter = f" with adapter {adapter_path}" if adapter_path else ""
        click.echo(f"Chatting with {m.folder}{adapter} ({m.backend}). {HELP}", err=True)
    for text in _messages(interactive):
        command = text.strip()
        if not command:
            continue
        if command == "q":
            break
        if command == "r":
            conversation.reset()
            if interactive:
                click.echo("(conversation reset)", err=True)
            continue
        if command == "h":
            click.echo(HELP, err=True)
            continue
        _answer(conversation, text, interactive)
