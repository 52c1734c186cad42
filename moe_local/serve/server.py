"""Starting and stopping the server: the listening socket, the model, uvicorn, the ready line, Ctrl-C.

The order makes every user mistake a one-line error before anything is served: the ``--adapter``
options are parsed and the folders read, the port is bound (a port in use fails here, before a long
model load; it only starts listening once uvicorn runs), the model loads and the adapters' fingerprints
are checked. Then uvicorn serves on that socket until Ctrl-C: the first one cancels the running and
waiting jobs (their streams end with an error event), uvicorn closes the connections and returns, and
the command exits 130 as every interrupted command does.
"""

from __future__ import annotations

import asyncio
import copy
import errno
import socket
import sys

import uvicorn

import moe_local

from ..errors import UserError
from .adapters import RouterAdapters, parse_adapter_options, read_adapters
from .app import create_app
from .jobs import Worker
from .prompts import ServedModel


def bind(host: str, port: int) -> socket.socket:
    """A socket bound (not yet listening) to ``host:port``; port 0 picks a free one."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UserError(f"--host {host}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restarts reuse the port
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use (choose another with --port)") from None
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def log_config() -> dict:
    """uvicorn's logging, with the server's own logger (moe_local.serve) printed the same way."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["moe_local.serve"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


class Server(uvicorn.Server):
    """uvicorn's server that prints the ready line once it listens and stops the model's work on Ctrl-C."""

    def __init__(self, config: uvicorn.Config, worker: Worker, ready: str):
        super().__init__(config)
        self.worker, self.ready, self.loop = worker, ready, None

    async def startup(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        if self.started:
            print(self.ready, file=sys.stderr, flush=True)

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        if self.loop is not None:  # in a signal handler: the queue's lock is taken on the loop, not here
            self.loop.call_soon_threadsafe(self.worker.shutdown)


def run(model, adapters, backend, host, port, queue_size, max_tokens, device=None) -> None:
    """``moe-local serve``: serve ``model`` and its named adapters until interrupted."""
    folders = read_adapters(parse_adapter_options(adapters, model))
    sock = bind(host, port)
    worker = None
    try:
        loaded = moe_local.load(model, backend=backend, device=device)
        router_adapters = RouterAdapters(loaded, folders)
        _ = loaded.tokenizer  # loaded now, not by two threads at once later
        served = ServedModel(loaded, str(model), router_adapters.names, max_tokens)
        worker = Worker(loaded, router_adapters, queue_size)
        app = create_app(served, worker, loaded.backend)
        config = uvicorn.Config(app, lifespan="off", log_config=log_config(), timeout_graceful_shutdown=5)
        names = f" and adapters {', '.join(served.adapters)}" if served.adapters else ""
        ready = f"moe-local: serving {served.name}{names} ({loaded.backend}) at {url(sock)} (Ctrl-C stops)"
        worker.start()
        Server(config, worker, ready).run(sockets=[sock])
    finally:
        if worker is not None:
            worker.shutdown()
            worker.join(timeout=10)
        sock.close()
