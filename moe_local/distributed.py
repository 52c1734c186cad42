"""Data-parallel runs under torchrun, seen from the loops: which records a rank owns, and collectives
that end the whole run with one error when any rank fails.

``torchrun --nproc-per-node N -m moe_local tune ...`` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT set. :func:`session` then opens the torch backend's process
group (backends/torch/distributed.py: NCCL on CUDA, gloo on the CPU, and how a failing rank stops
every rank); without those variables a command runs as one process through :data:`LOCAL`, whose
operations do nothing, so the one-process path is the code it always was.

Sharding. Rank r owns records r, r+N, r+2N, ... for the whole run: it computes their bank rows and
holds their prefix cache, which is never sent anywhere (only the bank rows are summed across ranks).
A tune step takes the global batch one process would take (same seed, same order) and each rank runs
the records of it that it owns — possibly none. The ownership cannot follow the batch, or the cache
would have to travel; the price is that per-step shard sizes vary around B/N (hypergeometric), so a
step waits for the rank with the most records: with B=32 over 8 ranks the largest shard averages
about 7 instead of 4, with B=256 about 40 instead of 32. Bigger global batches even this out.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np

from .errors import UserError


def launched() -> bool:
    """Whether this process is one of several started by torchrun (or anything that sets its variables)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class Local:
    """One process: it owns every record and every collective is the identity."""

    rank = 0
    world = 1
    device = None
    backend = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owned(self, n: int) -> np.ndarray:
        """The record indices this rank runs, ascending."""
        return np.arange(self.rank, n, self.world)

    def shard(self, index) -> np.ndarray:
        """The entries of ``index`` (record indices of a global batch) this rank owns, in their order."""
        index = np.asarray(index)
        return index if self.world == 1 else index[index % self.world == self.rank]

    def sum(self, arrays: list) -> list:
        """Element-wise sums over the ranks of numpy arrays (shapes and dtypes alike on every rank)."""
        return list(arrays)

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        return obj

    def on_main(self, fn):
        """``fn()`` run on rank 0 only (files are rank 0's), its result on every rank, its error on every rank."""
        return self.broadcast(fn() if self.is_main else None)

    def check(self, error: BaseException | None = None) -> None:
        """A point every rank passes; raises :class:`RankFailed` on all of them if any gives an error."""


LOCAL = Local()


class RankFailed(Exception):
    """Some rank failed; every rank holds the same description of the lowest failing rank's error."""

    def __init__(self, rank: int, kind: str, type_name: str, message: str, own: BaseException | None):
        super().__init__(f"rank {rank}: {type_name}: {message}")
        self.rank, self.kind, self.type_name, self.message, self.own = rank, kind, type_name, message, own

    @property
    def code(self) -> int:
        return 2 if self.kind == "user" else 1


class RankError(RuntimeError):
    """Rank 0's stand-in for another rank's unexpected error (its message names the rank and type)."""


@contextlib.contextmanager
def session(device: str | None = None, backend: str = "auto"):
    """``(group, device)`` for a command's body: the torch backend's process group under torchrun, else
    ``(LOCAL, device)`` (on torch, ``device`` becomes the current CUDA device: Triton launches there)."""
    from .backends import backend_module, resolve_backend

    name = resolve_backend(backend)
    if name != "torch":
        if launched():
            raise UserError("runs under torchrun use the torch backend: give --backend torch")
        yield LOCAL, device
        return
    with backend_module("torch").distributed.session(device) as opened:
        yield opened


__all__ = ["LOCAL", "Local", "RankError", "RankFailed", "launched", "session"]
