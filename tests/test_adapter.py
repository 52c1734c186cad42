"""Adapters are applied only when they fit: every value finite, tensors exactly the router tensors of the
layers the config lists, a base-model fingerprint. Every reader refuses the others with exit 2 and one
line: fuse, generate, chat, eval, serve (its ``--adapter`` folders, swapped in per request) and
``moe_local.load``."""

import io
import sys

import numpy as np
import pytest

import moe_local
from moe_local.errors import UserError

from helpers import adapter_variant, gate_name, make_adapter, poisoned, run_cli, run_main, write_task

BAD = {
    "nan": (dict(change_weights=poisoned(np.nan)), "holds NaN or infinite values"),
    "inf": (dict(change_weights=poisoned(-np.inf)), "holds NaN or infinite values"),
    "gate of an unlisted layer": (
        dict(change_weights=lambda w: {**w, gate_name(1): next(iter(w.values())).copy()}),
        f"holds {gate_name(1)}, which is not a router of its layers",
    ),
    "no tensors": (dict(change_weights=lambda w: {}), "lacks model.layers."),
    "no layers": (dict(change_config=lambda c: c.update(layers=[])), "must list the tuned layers"),
    "no fingerprint": (dict(change_config=lambda c: c.pop("fingerprint")), "has no base-model fingerprint"),
}


@pytest.fixture(scope="module")
def adapters(qwen3_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    good = make_adapter(qwen3_dir, root / "good", layers=1)  # layer 3; layer 1 is an MoE layer it does not list
    return {name: adapter_variant(good, root / name.replace(" ", "-"), **kw) for name, (kw, _) in BAD.items()}


@pytest.mark.parametrize("command", ["fuse", "generate", "chat", "eval"])
@pytest.mark.parametrize("case", list(BAD))
def test_every_command_refuses_an_adapter_that_does_not_fit(
    case, command, adapters, qwen3_dir, tmp_path, capsys, monkeypatch
):
    adapter = adapters[case]
    argv = [command, "--model", qwen3_dir, "--adapter-path", adapter, "--backend", "torch"]
    if command == "fuse":
        argv += ["--save-path", tmp_path / "fused"]
    elif command == "generate":
        argv += ["--prompt", "hi", "--max-tokens", 2]
    elif command == "chat":
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hi\n"), encoding="utf-8"))
        argv += ["--max-tokens", 2]
    else:
        argv += ["--data", write_task(tmp_path, 4)]
    code, out, err = run_main(capsys, *argv)
    assert code == 2 and BAD[case][1] in err and len(err.strip().splitlines()) == 1, err
    assert out == ""  # nothing was generated, evaluated or reported
    assert not (tmp_path / "fused").exists()


@pytest.mark.slow
def test_serve_refuses_an_adapter_that_does_not_fit_before_serving(adapters, qwen3_dir):
    """In a process of its own on a free port: a server that started serving would time out the test."""
    for case in ("nan", "gate of an unlisted layer", "no tensors"):  # read with the adapter; checked on the model
        words = BAD[case][1]
        result = run_cli("serve", "--model", qwen3_dir, "--port", 0, "--adapter", f"x={adapters[case]}", timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and words in lines[0], (case, result.stderr)


@pytest.mark.parametrize("case", list(BAD))
def test_load_refuses_an_adapter_that_does_not_fit(case, adapters, qwen3_dir):
    with pytest.raises(UserError, match=BAD[case][1].split("(")[0]):
        moe_local.load(qwen3_dir, backend="torch", adapter_path=adapters[case])
