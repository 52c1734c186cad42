"""Data-parallel tune and eval: two gloo processes on the CPU against one process; the memory figures
of docs/full_runs.md.

Real processes, started the way torchrun starts them (torchrun itself for the tune run; for eval
and the failure, the same environment variables set by hand, so that each rank's exit code and
output can be read). Every launch has a deadline: a hang fails the test instead of stalling it.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

import moe_local
from moe_local.tuning import data as data_rules

from helpers import answerable, run_main, task_records, unit_rows, write_jsonl

DEADLINE_S = 240  # generous: a busy 2-core host; a healthy two-rank run takes about 20 s
ENV = {
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# Seven records in global batches of three: 3, 3, 1 per epoch, so shards are uneven and the last
# batch leaves one rank with nothing.
TUNE = [
    "--backend",
    "torch",
    "--layers",
    "2",
    "--epochs",
    "2",
    "--batch-size",
    "3",
    "--lr",
    "0.01",
    "--lam-warmup",
    "2",
    "--log-every",
    "1",
    "--save-every",
    "2",
]
UNTIMED = ("samples_per_s", "peak_mem_gb")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def library_lines(text: str) -> list[str]:
    """Output lines without transformers' warning about the fixture config's eos_token_id."""
    return [line for line in text.splitlines() if line.strip() and not line.startswith("[transformers]")]


def torchrun(*args, n: int = 2) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(n),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "moe_local",
        *map(str, args),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=DEADLINE_S)


def launch(folder, *args, n: int = 2) -> list[tuple[int, str, str]]:
    """``moe-local ARGS`` as N ranks with torchrun's variables: (exit code, stdout, stderr) per rank."""
    port = str(free_port())
    procs, files = [], []
    for rank in range(n):
        out, err = open(folder / f"rank{rank}.out", "w+"), open(folder / f"rank{rank}.err", "w+")
        env = {
            **ENV,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(n),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        procs.append(
            subprocess.Popen([sys.executable, "-m", "moe_local", *map(str, args)], env=env, stdout=out, stderr=err)
        )
        files.append((out, err))
    deadline = time.monotonic() + DEADLINE_S
    try:
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the ranks of `moe-local {' '.join(map(str, args))}` did not finish in {DEADLINE_S} s")
    results = []
    for code, (out, err) in zip(codes, files):
        out.seek(0)
        err.seek(0)
        results.append((code, out.read(), err.read()))
        out.close()
        err.close()
    return results


@pytest.fixture(scope="module")
def task(olmoe_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    m = moe_local.load(str(olmoe_dir), backend="torch")
    path = write_jsonl(folder / "train.jsonl", answerable(m, task_records(7, seed=3)))
    np.save(path.with_suffix(".npy"), unit_rows(7, seed=3))
    write_jsonl(folder / "val.jsonl", answerable(m, task_records(5, seed=6)))
    return folder


def _metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_tune_like_one(olmoe_dir, task, tmp_path, capsys):
    args = ["tune", "--model", olmoe_dir, "--data", task / "train.jsonl", *TUNE]
    code, _, err = run_main(capsys, *args, "--adapter-path", tmp_path / "one")
    assert code == 0, err
    # The two ranks keep their prefix caches in files of their own (exact bytes, so the same steps).
    r = torchrun(*args, "--adapter-path", tmp_path / "two", "--prefix-cache", "disk")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes" in r.stdout and r.stdout.count("step 6/6") == 1  # rank 0 alone prints

    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())  # no cache files left
    a, b = load_file(str(one / "adapters.safetensors")), load_file(str(two / "adapters.safetensors"))
    assert sorted(a) == sorted(b)
    base = moe_local.load(str(olmoe_dir), backend="torch").get_router_weights([2, 3])
    for name in a:
        assert np.abs(a[name] - base[name]).max() > 1e-3  # the steps moved the routers
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-6)
    assert json.loads((two / "adapter_config.json").read_text()) == json.loads(
        (one / "adapter_config.json").read_text()
    )
    rows_one, rows_two = _metrics(one), _metrics(two)
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one] == list(range(1, 7))
    for x, y in zip(rows_one, rows_two):
        assert set(x) == set(y)
        for key in ("step", "lr", "lam", "acc"):  # counts and schedules: exact
            assert y[key] == x[key], key
        for key in set(x) - set(UNTIMED) - {"step", "lr", "lam", "acc"}:
            np.testing.assert_allclose(y[key], x[key], rtol=1e-5, err_msg=key)
    # the bank gathered from the ranks' rows is the one-process bank
    bank_one, bank_two = load_file(str(one / "bank/bank.safetensors")), load_file(str(two / "bank/bank.safetensors"))
    np.testing.assert_array_equal(bank_two["correct"], bank_one["correct"])
    np.testing.assert_array_equal(bank_two["embeddings"], bank_one["embeddings"])
    np.testing.assert_allclose(bank_two["routing"], bank_one["routing"], rtol=0, atol=1e-6)
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]


@pytest.mark.slow
def test_two_processes_evaluate_like_one(olmoe_dir, task, tmp_path, capsys):
    args = [
        "eval",
        "--model",
        olmoe_dir,
        "--data",
        task / "val.jsonl",
        "--backend",
        "torch",
        "--layers",
        "2",
        "--oracle",
        "--oracle-steps",
        "2",
        "--batch-size",
        "2",
    ]
    code, out_one, err = run_main(capsys, *args, "--report", tmp_path / "one.json")
    assert code == 0, err
    ranks = launch(tmp_path, *args, "--report", tmp_path / "two.json")
    assert [r[0] for r in ranks] == [0, 0], ranks[0][2][-3000:] + ranks[1][2][-3000:]
    # overall, per task, oracle: the same lines (then "wrote REPORT")
    assert library_lines(ranks[0][1])[:-1] == library_lines(out_one)[:-1] and len(library_lines(out_one)) > 3
    assert ranks[1][1] == "" and library_lines(ranks[1][2]) == []  # rank 1 prints nothing
    rows_one, rows_two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert rows_two == rows_one
    assert [r["n"] for r in rows_two] == [5, 5, 5] and 0 < rows_two[0]["accuracy"] < 1


@pytest.mark.slow
def test_a_failing_rank_stops_every_rank_with_its_error(olmoe_dir, task, tmp_path, capsys):
    """Record 1 (rank 1's) holds a token whose embedding row is NaN: only rank 1's shard fails, after the
    common validation, and the run ends on both ranks with rank 1's one-line error."""
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file

    model = tmp_path / "model"
    shutil.copytree(olmoe_dir, model)
    tokenizer = moe_local.load(str(olmoe_dir), backend="torch").tokenizer
    (bad_token,) = tokenizer("Q", add_special_tokens=False)["input_ids"]
    rows = [json.loads(line) for line in (task / "train.jsonl").read_text().splitlines()]
    rows[1]["question"] = "What is Q plus 4?"
    records = [data_rules.parse_record(r, "t", i + 1) for i, r in enumerate(rows)]
    tokens = [
        {t for s in e.sequences for t in s} | {t for c in e.cand_tokens for t in c}
        for e in data_rules.encode_records(tokenizer, records)
    ]
    assert [bad_token in t for t in tokens] == [i == 1 for i in range(7)]  # the poisoned token is rank 1's alone
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    shutil.copy(task / "train.npy", tmp_path / "train.npy")
    state = load_torch(str(model / "model.safetensors"))
    state["model.embed_tokens.weight"][bad_token] = float("nan")
    save_file(state, str(model / "model.safetensors"), metadata={"format": "pt"})

    args = ["tune", "--model", model, "--data", data, *TUNE]
    code, _, err_one = run_main(capsys, *args, "--adapter-path", tmp_path / "one")
    assert code == 2 and f"{data}:2: the model's scores for this record are NaN" in err_one
    ranks = launch(tmp_path, *args, "--adapter-path", tmp_path / "two")
    assert [r[0] for r in ranks] == [2, 2], ranks
    assert library_lines(ranks[0][2]) == library_lines(err_one)  # rank 0 reports rank 1's error, once
    assert library_lines(ranks[1][1] + ranks[1][2]) == []  # rank 1 exits with it silently
    assert not (tmp_path / "two" / "adapters.safetensors").exists()


def test_ranks_split_every_global_batch_between_them():
    from moe_local.backends.torch.distributed import Group
    from moe_local.distributed import LOCAL

    ranks = [Group(r, 3, "cpu", "gloo") for r in range(3)]
    owned = [g.owned(10) for g in ranks]
    assert sorted(np.concatenate(owned).tolist()) == list(range(10)) and [len(o) for o in owned] == [4, 3, 3]
    batch = np.array([7, 2, 9, 4, 0])
    shards = [g.shard(batch) for g in ranks]
    assert [s.tolist() for s in shards] == [[9, 0], [7, 4], [2]]  # in the batch's order
    assert all(set(s) <= set(o) for s, o in zip(shards, owned))  # a rank runs only records it owns
    assert LOCAL.shard(batch) is batch and LOCAL.owned(4).tolist() == [0, 1, 2, 3]


def test_device_rules_under_torchrun():
    import torch

    from moe_local.backends.torch.distributed import rank_device, select_cuda
    from moe_local.errors import UserError

    assert rank_device("cuda", 3) == "cuda:3" and rank_device("cpu", 3) == "cpu"
    assert rank_device(None, 1) == ("cuda:1" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="CUDA_VISIBLE_DEVICES"):
        rank_device("cuda:1", 0)  # each rank's GPU is its LOCAL_RANK
    with pytest.raises(UserError, match="cpu or cuda"):
        rank_device("mps", 0)
    select_cuda("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            select_cuda("cuda:0")


# The published config.json of the two models docs/full_runs.md sizes (the keys the spec reads, as
# released: allenai/OLMoE-1B-7B-0924 and Qwen/Qwen3-30B-A3B).
OLMOE_1B_7B = {
    "architectures": ["OlmoeForCausalLM"],
    "model_type": "olmoe",
    "torch_dtype": "bfloat16",
    "hidden_size": 2048,
    "intermediate_size": 1024,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "norm_topk_prob": False,
    "vocab_size": 50304,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "clip_qkv": None,
    "attention_bias": False,
    "hidden_act": "silu",
}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "torch_dtype": "bfloat16",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "sliding_window": None,
    "use_sliding_window": False,
    "attention_bias": False,
    "hidden_act": "silu",
}


def full_runs_memory_row(name: str, config: dict) -> str:
    """The docs/full_runs.md table row of a model, from moe_local.sizing (what `moe-local info` prints)."""
    from moe_local.families import spec_from_config
    from moe_local.sizing import estimate_memory

    spec = spec_from_config(config)
    counts = spec.parameter_counts()
    gib = lambda n: f"{n / 1024**3:.2f} GiB"  # noqa: E731
    m32, m8 = estimate_memory(spec, tune_batch=32), estimate_memory(spec, tune_batch=8)
    return (
        f"| {name} | {counts['total'] / 1e9:.2f}B ({counts['active_min'] / 1e9:.2f}B) | {gib(m32.weights)} | "
        f"{gib(m32.chat)} | {gib(m32.tune)} | {gib(m8.tune)} |"
    )


def test_full_runs_doc_memory_figures():
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "full_runs.md").read_text()
    for name, config in (("OLMoE-1B-7B", OLMOE_1B_7B), ("Qwen3-30B-A3B", QWEN3_30B_A3B)):
        assert full_runs_memory_row(name, config) in doc
