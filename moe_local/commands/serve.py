"""``moe-local serve``: an OpenAI-compatible HTTP server for a model and its named router adapters."""

from __future__ import annotations

import importlib.util
import signal

import click

from moe_local.errors import UserError

from .options import ConfigCommand, backend_option, device_option, model_option


@click.command(cls=ConfigCommand)
@model_option
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    metavar="NAME=PATH",
    help="A router adapter folder served under NAME (repeatable); a request's 'model' picks it.",
)
@backend_option
@device_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0 picks a free port.")
@click.option(
    "--queue-size",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Requests that may wait for the model; one more is answered 503 with Retry-After.",
)
@click.option(
    "--max-tokens",
    "-n",
    type=click.IntRange(min=1),
    default=512,
    show_default=True,
    help="The most tokens per answer when a request does not say (capped by the context).",
)
def serve(model, adapters, backend, device, host, port, queue_size, max_tokens):
    """Serve the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models, /health) for one
    model; each request's 'model' names the base model (as given to --model) or an --adapter, whose
    router gates are swapped in for that request only. Requests run one at a time in arrival order."""
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"moe-local serve needs {' and '.join(missing)}: pip install 'moe-local[serve]'")
    from moe_local.serve.server import run

    if hasattr(signal, "SIGPIPE"):  # a client gone mid-answer must not end the server (cli.py sets SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    run(model, adapters, backend, host, port, queue_size, max_tokens, device=device)
