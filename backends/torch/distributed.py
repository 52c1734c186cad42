"""torch.distributed for data-parallel runs under torchrun: the process group (NCCL on CUDA, gloo on
the CPU) behind ``moe_local.distributed.Local``'s operations, and how a failing rank stops every rank.

When WORLD_SIZE > 1, :func:`session` opens a process group: NCCL when the ranks run on CUDA (rank r
on ``cuda:LOCAL_RANK``), gloo on the CPU. moe_local/distributed.py says which records a rank owns.

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

from moe_local.distributed import LOCAL, Local, RankError, RankFailed, launched
from moe_local.errors import UserError


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
                out[i] = flat[at : at + size].reshape(arrays[i].shape)
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
        if isinstance(error, dist.DistError):  # the group itself broke (a peer died): nothing to agree on
            return error, False
        try:
            group.check(error)
        except RankFailed as shared:
            error = shared
        except Exception:  # the exchange failed too (a peer is gone): report our own error
            return error, False
    if not group.is_main:  # rank 0 prints the error; this rank's own traceback on request, as the CLI does
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
        raise UserError(
            f"--device {device}: under torchrun each rank runs on cuda:LOCAL_RANK; give --device cuda "
            "(or leave it out) and pick the GPUs with CUDA_VISIBLE_DEVICES"
        )
    if device != "cpu":
        raise UserError(f"--device {device}: runs under torchrun take cpu or cuda")
    return device


def select_cuda(device: str | None) -> None:
    """Make ``device`` the current CUDA device (Triton launches its kernels on the current one)."""
    if device is None or not str(device).startswith("cuda"):
        return
    import torch

    from .loaded import check_device

    index = check_device(device).index
    if index is not None:
        torch.cuda.set_device(index)


@contextlib.contextmanager
def session(device: str | None = None):
    """``(group, device)`` for a command's body: the process group under torchrun, else ``(LOCAL, device)``.

    Under torchrun the body's errors are settled across ranks on the way out (module docstring), and a
    rank that finishes waits at a last check, so a late failure elsewhere still ends every rank.
    """
    if not launched():
        select_cuda(device)
        yield LOCAL, device
        return
    import torch.distributed as dist

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
    agreed = False  # every rank is alive and past its last collective
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
    except Exception:  # a peer is gone: nothing left to wait for
        pass


__all__ = ["Group", "rank_device", "select_cuda", "session"]
