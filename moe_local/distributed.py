"""Data-parallel runs under torchrun: the process group, which records a rank owns, and collectives
that end the whole run with one error when any rank fails.

``torchrun --nproc-per-node N -m moe_local tune ...`` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT set. When WORLD_SIZE > 1, :func:`session` opens a process
group: NCCL when the ranks run on CUDA (rank r on ``cuda:LOCAL_RANK``), gloo on the CPU. Without
those variables a command runs as one process through :data:`LOCAL`, whose operations do nothing,
so the one-process path is the code it always was.

Sharding. Rank r owns records r, r+N, r+2N, ... for the whole run: it computes their bank rows and
holds their prefix cache, which is never sent anywhere (only the bank rows are summed across ranks).
A tune step takes the global batch one process would take (same seed, same order) and each rank runs
the records of it that it owns — possibly none. The ownership cannot follow the batch, or the cache
would have to travel; the price is that per-step shard sizes vary around B/N (hypergeometric), so a
step waits for the rank with the most records: with B=32 over 8 ranks the largest shard averages
about 7 instead of 4, with B=256 about 40 instead of 32. Bigger global batches even this out.

Failures. A rank that raises must not leave the others waiting in a collective. Every collective here
begins with an all-reduce of one integer, an error flag. A failing rank's exception reaches
:func:`session`, which sends flag 1 into that same all-reduce — whichever collective the others
have reached, it starts with it — so every rank learns that a rank failed, gathers who and why, and
leaves: rank 0 raises the lowest failing rank's error (the CLI prints it once, one line, exit 2 for a
user error and 1 otherwise), the other ranks exit silently with the same code. A rank that dies
without a word (killed, a segfault) breaks the group instead; torchrun then stops the others.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import traceback

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


class Group(Local):
    """A torch.distributed process group (gloo or NCCL) seen through the operations the loops use."""

    def __init__(self, rank: int, world: int, device: str, backend: str):
        import torch

        self.rank, self.world, self.backend = rank, world, backend
        self.device = device
        # Where collective buffers live: NCCL only moves CUDA tensors, gloo moves CPU tensors.
        self.comm = torch.device(device if backend == "nccl" else "cpu")

    def check(self, error: BaseException | None = None) -> None:
        import torch
        import torch.distributed as dist

        flag = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=self.comm)
        dist.all_reduce(flag)
        if int(flag.item()) == 0:
            return
        mine = None if error is None else _describe(error)
        everyone = [None] * self.world
        dist.all_gather_object(everyone, mine)
        rank, (kind, type_name, message) = next((r, d) for r, d in enumerate(everyone) if d is not None)
        raise RankFailed(rank, kind, type_name, message, error)

    def sum(self, arrays: list) -> list:
        import torch
        import torch.distributed as dist

        self.check()
        arrays = [np.asarray(a) for a in arrays]
        out: list = [None] * len(arrays)
        # One all-reduce per dtype: the arrays of a dtype travel as one flat buffer.
        for dtype in dict.fromkeys(a.dtype for a in arrays):
            members = [i for i, a in enumerate(arrays) if a.dtype == dtype]
            flat = np.concatenate([arrays[i].reshape(-1) for i in members])
            buffer = torch.from_numpy(flat).to(self.comm)
            dist.all_reduce(buffer)
            flat = buffer.cpu().numpy()
            at = 0
            for i in members:
                size = arrays[i].size
                out[i] = flat[at:at + size].reshape(arrays[i].shape)
                at += size
        return out

    def broadcast(self, obj):
        import torch.distributed as dist

        self.check()
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self.comm)
        return box[0]


def _describe(error: BaseException) -> tuple[str, str, str]:
    kind = "user" if isinstance(error, UserError) else "other"
    lines = str(error).splitlines()
    return kind, type(error).__name__, lines[0] if lines else ""


def _settle(group: Group, error: BaseException) -> tuple[BaseException, bool]:
    """What this rank raises once ``error`` ended its part of the run (see the module docstring), and
    whether the ranks agreed on it (all of them alive)."""
    import torch.distributed as dist

    if not isinstance(error, RankFailed):
        if isinstance(error, dist.DistError):   # the group itself broke (a peer died): nothing to agree on
            return error, False
        try:
            group.check(error)
        except RankFailed as shared:
            error = shared
        except Exception:   # the exchange failed too (a peer is gone): report our own error
            return error, False
    if not group.is_main:   # rank 0 prints the error; this rank's own traceback on request, as the CLI does
        if os.environ.get("MOE_LOCAL_DEBUG") and error.own is not None:
            traceback.print_exception(error.own)
        return SystemExit(error.code), True
    if error.rank == group.rank and error.own is not None:
        return error.own, True
    if error.kind == "user":
        return UserError(error.message), True
    return RankError(f"on rank {error.rank}: {error.type_name}: {error.message}"), True


def rank_device(device: str | None, local_rank: int) -> str:
    """The device of this rank: ``cuda:LOCAL_RANK`` when CUDA is asked for or available, else the CPU."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return f"cuda:{local_rank}"
    if device.startswith("cuda:"):
        raise UserError(f"--device {device}: under torchrun each rank runs on cuda:LOCAL_RANK; give --device cuda "
                        "(or leave it out) and pick the GPUs with CUDA_VISIBLE_DEVICES")
    if device != "cpu":
        raise UserError(f"--device {device}: runs under torchrun take cpu or cuda")
    return device


def select_cuda(device: str | None) -> None:
    """Make ``device`` the current CUDA device (Triton launches its kernels on the current one)."""
    if device is None or not str(device).startswith("cuda"):
        return
    import torch

    from .backends.torch.loaded import check_device

    index = check_device(device).index
    if index is not None:
        torch.cuda.set_device(index)


@contextlib.contextmanager
def session(device: str | None = None, backend: str = "auto"):
    """``(group, device)`` for a command's body: the process group under torchrun, else ``(LOCAL, device)``.

    Under torchrun the body's errors are settled across ranks on the way out (module docstring), and a
    rank that finishes waits at a last check, so a late failure elsewhere still ends every rank.
    """
    if not launched():
        select_cuda(device)
        yield LOCAL, device
        return
    import torch.distributed as dist

    from .backends import resolve_backend

    if resolve_backend(backend) != "torch":
        raise UserError("runs under torchrun use the torch backend: give --backend torch")
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UserError(f"WORLD_SIZE is set but {', '.join(missing)} is not: start data-parallel runs with torchrun")
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = rank_device(device, local)
    select_cuda(device)
    kind = "nccl" if device.startswith("cuda") else "gloo"
    # Ranks meet at collectives after loading the model and after the bank pass; on a slow disk that wait
    # can pass NCCL's default 10 minutes. A rank that dies is caught by torchrun, not by this timeout.
    dist.init_process_group(kind, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=60))
    group = Group(rank, world, device, kind)
    agreed = False   # every rank is alive and past its last collective
    try:
        yield group, device
        group.check()
        agreed = True
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # noqa: B902 - every other error is settled across the ranks
        settled, agreed = _settle(group, e)
        raise settled from None
    finally:
        if agreed:
            _wait_for_peers(kind)
        dist.destroy_process_group()


def _wait_for_peers(kind: str) -> None:
    """Ranks close their connections together: a rank that closes while a peer's gloo threads still read
    from it can make that peer abort at exit ("terminate called without an active exception")."""
    import torch.distributed as dist

    try:
        if kind == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
        else:
            dist.barrier()
    except Exception:   # a peer is gone: nothing left to wait for
        pass


__all__ = ["LOCAL", "Group", "Local", "RankError", "RankFailed", "launched", "rank_device", "select_cuda", "session"]
