"""Adapters are applied only when they fit: every value finite, tensors exactly the router weights of the
layers the config lists, a base-model fingerprint. Every reader refuses the others with exit 2 and one
line: fuse, generate, chat, eval and ``moe_local.load``."""

import io
import json
import shutil
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import moe_local
from moe_local.errors import UserError

from helpers import gate_name, make_adapter, run_main, write_task


def variant(adapter, out, change_weights=None, change_config=None):
    """A copy of ``adapter`` with its tensors and/or its config changed (real files, as a user's would be)."""
    shutil.copytree(adapter, out)
    weights = load_file(str(out / "adapters.safetensors"))
    if change_weights:
        weights = change_weights(weights)
        save_file(weights, str(out / "adapters.safetensors"))
    if change_config:
        config = json.loads((out / "adapter_config.json").read_text())
        change_config(config["moe_local"])
        (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def poisoned(value):
    def change(weights):
        name = sorted(weights)[0]
        weights[name] = weights[name].copy()
        weights[name][1, 2] = value
        return weights

    return change


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
    return {name: variant(good, root / name.replace(" ", "-"), **kw) for name, (kw, _) in BAD.items()}


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


@pytest.mark.parametrize("case", list(BAD))
def test_load_refuses_an_adapter_that_does_not_fit(case, adapters, qwen3_dir):
    with pytest.raises(UserError, match=BAD[case][1].split("(")[0]):
        moe_local.load(qwen3_dir, backend="torch", adapter_path=adapters[case])
