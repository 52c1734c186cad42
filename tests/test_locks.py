"""Output locks with real processes: a second run on a folder another run is writing exits 2 naming it, a
killed run leaves no stale lock and its temporary folder goes with the next run, and outputs the user
cannot write are refused before any work."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import moe_local
from moe_local.checkpoint import BUILTIN_MODELS
from moe_local.tuning import tune
from moe_local.tuning.data import read_records

SUITE = BUILTIN_MODELS["tiny"].parent / "suite"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
SMALL = dict(layers=2, epochs=1, lr=1e-2, batch_size=16, lam_warmup=0)


def suite_task(folder: Path, n: int = 40) -> Path:
    """The first ``n`` records of the embedded suite's train split, with their embeddings beside them."""
    path = folder / "d.jsonl"
    path.write_text("".join((SUITE / "train.jsonl").read_text().splitlines(keepends=True)[:n]))
    np.save(folder / "d.npy", np.load(SUITE / "train.npy")[:n])
    return path


def suite_adapter(folder: Path) -> tuple[Path, Path]:
    """(8 records of the suite, an adapter tuned on them in-process at ``folder/A``)."""
    data = suite_task(folder, 8)
    adapter = folder / "A"
    tune.tune(
        moe_local.load("tiny", backend="torch"),
        read_records(data),
        np.load(folder / "d.npy"),
        tune.TuneSettings(**SMALL),
        adapter,
        progress="off",
    )
    return data, adapter


def start(argv, cwd, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "moe_local", *map(str, argv)],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def wait_until(ready, proc, timeout=240) -> None:
    t0 = time.time()
    while not ready():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() - t0 < timeout, "the first run never got going"
        time.sleep(0.2)


def finished(procs) -> list[tuple[int, str]]:
    """(exit code, stderr) of each process, once all have ended."""
    errs = [p.communicate(timeout=300)[1] for p in procs]
    return [(p.returncode, err) for p, err in zip(procs, errs)]


def files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_second_tune_on_a_running_folder_exits_2_and_a_killed_run_leaves_nothing_stale(tmp_path):
    data = suite_task(tmp_path)
    records = read_records(data)
    emb = np.load(tmp_path / "d.npy")
    model = moe_local.load("tiny", backend="torch")
    out = tmp_path / "A"
    tune.tune(model, records, emb, tune.TuneSettings(**SMALL), out, progress="off")
    before = files(out)
    args = ["tune", "--data", data, "--adapter-path", out, "--layers", 2, "--backend", "torch"]
    first = start([*args, "--epochs", 5000, "--save-every", 1, "--overwrite"], tmp_path)
    try:
        wait_until(lambda: any(tmp_path.glob(".A.partial-*/checkpoints/step-*")), first)
        seconds = [start([*args, "--epochs", 1, *extra], tmp_path) for extra in ([], ["--overwrite"], ["--resume"])]
        results = finished(seconds)
        assert first.poll() is None  # the first run was alive all along
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    for code, err in results:
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"is in use by another moe-local run (PID {first.pid}: moe-local tune --data" in err, err
    assert files(out) == before  # the killed --overwrite run left the old adapter as it was
    assert len(list(tmp_path.glob(".A.partial-*"))) == 1  # and its own folder beside it
    # the next run takes the folder (the lock died with the killed process) and clears what it left
    result = tune.tune(model, records, emb, tune.TuneSettings(**SMALL, seed=1), out, overwrite=True, progress="off")
    assert result.steps == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A", "d.jsonl", "d.npy"]


HOLD = """
import contextlib, sys, time
from moe_local.locks import output_lock
with contextlib.ExitStack() as stack:
    for path in sys.argv[1:]:
        stack.enter_context(output_lock(path))
    print("held", flush=True)
    time.sleep(300)
"""


@pytest.mark.slow
def test_prepare_fuse_and_eval_refuse_an_output_another_process_holds(tmp_path):
    data, adapter = suite_adapter(tmp_path)
    outputs = [tmp_path / "B", tmp_path / "F", tmp_path / "r.json"]
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, *map(str, outputs)], env=ENV, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        results = finished(
            [
                start(["prepare", "--data", data, "--bank", outputs[0], "--layers", 2], tmp_path),
                start(["fuse", "--adapter-path", adapter, "--save-path", outputs[1]], tmp_path),
                start(["eval", "--data", data, "--report", outputs[2]], tmp_path),
            ]
        )
    finally:
        holder.kill()
        holder.wait()
    for (code, err), flag in zip(results, ["bank folder", "--save-path", "--report"]):
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"{flag} " in err and f"is in use by another moe-local run (PID {holder.pid}:" in err, err
    assert not any(p.exists() for p in outputs)


# Root writes into read-only folders: as root the commands run without that power (the capabilities
# that override permission bits), as any other user they run as they are.
AS_A_USER = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"] if os.getuid() == 0 else []


@pytest.mark.slow
def test_outputs_the_user_cannot_write_are_refused_before_any_work(tmp_path):
    data, adapter = suite_adapter(tmp_path)
    (tmp_path / "ro").mkdir(mode=0o555)
    cases = [
        (["tune", "--data", data, "--adapter-path", "ro/A", "--layers", 2], "adapter path ro/A"),
        (["fuse", "--adapter-path", adapter, "--save-path", "ro/F"], "--save-path ro/F"),
        (["eval", "--data", data, "--report", "ro/r.json"], "--report ro/r.json"),
        (["prepare", "--data", data, "--bank", "ro/B", "--layers", 2], "bank folder ro/B"),
    ]
    procs = [
        subprocess.Popen(
            [*AS_A_USER, sys.executable, "-m", "moe_local", *map(str, argv)],
            cwd=tmp_path,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv, _ in cases
    ]
    results = [(*p.communicate(timeout=300), p.returncode) for p in procs]
    os.chmod(tmp_path / "ro", 0o755)
    for (out, err, code), (_, what) in zip(results, cases):
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"cannot write {what}: ro is read-only for this user" in err, err
        assert out == ""  # nothing ran: no progress, no metrics
    assert list((tmp_path / "ro").iterdir()) == []


# -- the lock's own edges, in one process ---------------------------------------------------------


def test_a_file_system_without_locks_is_a_one_line_refusal_and_leaves_no_lock_file(tmp_path, monkeypatch):
    import errno
    import fcntl

    from moe_local import locks
    from moe_local.errors import UserError

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(UserError, match="does not support file locks"):
        with locks.output_lock(tmp_path / "out", "--save-path"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_another_thread_is_refused_as_another_run(tmp_path):
    import threading

    from moe_local import locks
    from moe_local.errors import UserError

    held, done, seen = threading.Event(), threading.Event(), []

    def holder():
        with locks.output_lock(tmp_path / "out"):
            held.set()
            done.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(30)
        with pytest.raises(UserError, match="in use by another moe-local run"):
            with locks.output_lock(tmp_path / "out"):
                seen.append("entered")
        with locks.output_lock(tmp_path / "other"):  # reentrant within a thread, other paths free
            with locks.output_lock(tmp_path / "other"):
                seen.append("nested")
    finally:
        done.set()
        thread.join()
    assert seen == ["nested"]


def test_a_lock_file_this_user_cannot_write_is_taken_read_only(tmp_path, monkeypatch):
    """Another user's killed run left its lock file (0644, theirs): the folder is writable, so the lock is
    taken through a read-only descriptor and the file removed at the end (simulated: root writes anyway)."""
    from moe_local import locks

    lock = locks.lock_path(tmp_path / "out")
    lock.write_text('{"pid": 1, "command": "moe-local tune (killed)"}')
    real_open = os.open

    def theirs(path, flags, *args):
        if Path(path) == lock and flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", theirs)
    with locks.output_lock(tmp_path / "out"):
        assert lock.exists()
    assert not lock.exists()
