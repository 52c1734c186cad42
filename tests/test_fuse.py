"""``moe-local fuse``: the fused folder loads in transformers and mlx-lm with the logits of base + adapter."""

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

import moe_local
from moe_local.chat import Conversation, prompt_ids
from moe_local.checkpoint import tensor_index
from moe_local.cli import main
from moe_local.fuse import fuse

import checkpoints
from helpers import BACKENDS, hf_reference, make_adapter, mlx_lm_greedy, rel

IDS = np.random.default_rng(0).integers(0, 128, size=(2, 9))


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def mlx_lm_logits(folder, ids):
    mx = pytest.importorskip("mlx.core")
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(folder))
    return np.array(model(mx.array(ids)).astype(mx.float32)), model


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["qwen3", "olmoe"])
def test_fused_folder_is_base_plus_adapter_in_transformers_and_mlx_lm(
    family, backend, qwen3_dir, olmoe_dir, tmp_path, capsys
):
    """Fused by either backend: the same ordinary folder, read by transformers, mlx-lm and both backends."""
    base = qwen3_dir if family == "qwen3" else olmoe_dir
    adapter = make_adapter(base, tmp_path / "adapter")
    out = tmp_path / "fused"
    code, stdout, _ = run(
        ["fuse", "--model", str(base), "--adapter-path", str(adapter), "--save-path", str(out), "--backend", backend],
        capsys,
    )
    assert code == 0 and "fused model written to" in stdout
    with torch.no_grad():
        expected = hf_reference(base, family, adapter)(input_ids=torch.as_tensor(IDS)).logits.numpy()
        fused_hf = hf_reference(out, family)(input_ids=torch.as_tensor(IDS)).logits.numpy()
    assert rel(fused_hf, expected) <= 1e-5
    assert rel(moe_local.load(base, backend="torch", adapter_path=adapter).logits(IDS), expected) <= 1e-5
    assert rel(moe_local.load(out, backend="torch").logits(IDS), expected) <= 1e-5
    assert rel(mlx_lm_logits(out, IDS)[0], expected) <= 1e-5
    if backend == "mlx":
        assert rel(moe_local.load(out, backend="mlx").logits(IDS), expected) <= 1e-5
    assert rel(moe_local.load(base, backend="torch").logits(IDS), expected) > 1e-3  # the adapter matters
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts"] == config["num_local_experts"] == 8
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).is_file()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_grove_folder_keeps_the_grove_format(backend, grove_dir, tmp_path):
    adapter = make_adapter(grove_dir, tmp_path / "adapter")
    out = fuse(grove_dir, adapter, tmp_path / "fused", backend=backend)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GroveMoeForCausalLM"] and config["model_type"] == "grove_moe"
    assert (config["grove_experts_per_group"], config["grove_scale"], config["grove_adjugate_intermediate_size"]) == (
        2,
        0.05,
        16,
    )
    names = set(tensor_index(out))
    assert set(tensor_index(grove_dir)) == names  # chunk_experts.J.* and expert_bias included
    expected = moe_local.load(grove_dir, backend=backend, adapter_path=adapter).logits(IDS)
    np.testing.assert_array_equal(moe_local.load(out, backend=backend).logits(IDS), expected)
    if backend == "mlx":  # the torch backend reads what MLX wrote (there is no other Grove reader)
        assert rel(moe_local.load(out, backend="torch").logits(IDS), expected) <= 1e-4


def test_fuse_refusals_are_one_line_and_leave_nothing(qwen3_dir, olmoe_dir, tmp_path, capsys):
    adapter = make_adapter(qwen3_dir, tmp_path / "adapter")
    foreign = make_adapter(olmoe_dir, tmp_path / "foreign")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    for save, adapter_path, message in [
        (busy, adapter, "exists and is not empty"),
        (qwen3_dir, adapter, "the base model's own folder"),
        (tmp_path / "out", foreign, "was made for another model"),
        (tmp_path / "out", tmp_path / "nowhere", "adapter folder not found"),
    ]:
        code, _, err = run(
            ["fuse", "--model", str(qwen3_dir), "--adapter-path", str(adapter_path), "--save-path", str(save)], capsys
        )
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (busy / "notes.txt").read_text() == "mine"


def test_a_failed_write_leaves_nothing(qwen3_dir, tmp_path, monkeypatch):
    import moe_local.checkpoint.write as checkpoint

    adapter = make_adapter(qwen3_dir, tmp_path / "adapter")
    real = checkpoint._save_tensors

    def save_then_fail(*args, **kwargs):  # the disk fills up after the weights are written
        real(*args, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint, "_save_tensors", save_then_fail)
    with pytest.raises(OSError):
        fuse(qwen3_dir, adapter, tmp_path / "fused", backend="torch")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A 4-bit MLX model as mlx_lm.convert writes it (gates at 8 bits, recorded per layer in config.json)."""
    pytest.importorskip("mlx_lm")
    from mlx_lm import convert

    root = tmp_path_factory.mktemp("quantized")
    base = checkpoints.make_qwen3_moe(root / "base", spelling="both")
    convert(str(base), mlx_path=str(root / "q4"), quantize=True, q_group_size=32, q_bits=4)
    return base, root / "q4"


def test_fusing_a_quantized_mlx_model_on_torch_names_the_mlx_backend(quantized, tmp_path):
    base, q4 = quantized
    adapter = make_adapter(base, tmp_path / "adapter")
    with pytest.raises(moe_local.UserError, match="quantized MLX models fuse with --backend mlx"):
        fuse(q4, adapter, tmp_path / "fused", backend="torch")
    assert not (tmp_path / "fused").exists()


def test_fused_quantized_mlx_folder_keeps_its_format_with_float_gates(quantized, tmp_path, capsys):
    """``moe-local fuse --backend mlx`` on a quantized base: the tuned gates float (no .scales, so mlx-lm
    keeps them float), everything else as quantized as before, logits equal to the quantized base + adapter."""
    pytest.importorskip("moe_local.backends.mlx")
    import mlx.nn as nn

    base, q4 = quantized
    adapter = make_adapter(base, tmp_path / "adapter")
    out = tmp_path / "fused"
    code, stdout, err = run(
        ["fuse", "--model", str(q4), "--adapter-path", str(adapter), "--save-path", str(out), "--backend", "mlx"],
        capsys,
    )
    assert code == 0 and "fused model written to" in stdout, err
    index = tensor_index(out)
    tuned = json.loads((adapter / "adapter_config.json").read_text())["moe_local"]["layers"]
    for layer in tuned:
        assert f"model.layers.{layer}.mlp.gate.scales" not in index
        assert index[f"model.layers.{layer}.mlp.gate.weight"][1] in ("F32", "BF16", "F16")
    assert {n for n in tensor_index(q4) if n.endswith(".scales")} - {n for n in index if n.endswith(".scales")} == {
        f"model.layers.{layer}.mlp.gate.scales" for layer in tuned
    }
    logits, model = mlx_lm_logits(out, IDS)
    assert all(type(model.model.layers[i].mlp.gate) is nn.Linear for i in tuned)
    tuned_model = moe_local.load(q4, backend="mlx", adapter_path=adapter)
    expected = tuned_model.logits(IDS)
    assert rel(logits, expected) <= 1e-4
    # Served by mlx-lm, the fused folder answers what the quantized base + adapter answers here.
    from mlx_lm import load as mlx_lm_load

    ids = prompt_ids(tuned_model, "What is 3 plus 4?")
    chat = Conversation(tuned_model, max_tokens=16)
    "".join(chat.complete(ids, eos_ids=()))  # no end token: exactly 16 tokens to compare
    assert len(chat.answer_ids) == 16
    assert chat.answer_ids == mlx_lm_greedy(mlx_lm_load(str(out)), ids, set(), 16)


def test_files_linked_out_of_the_model_folder_are_refused_and_links_inside_are_copied(qwen3_dir, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    model = tmp_path / "model"
    shutil.copytree(qwen3_dir, model)
    adapter = make_adapter(qwen3_dir, tmp_path / "adapter")
    # a link inside the folder is read and copied as a regular file
    (model / "sub").mkdir()
    (model / "tokenizer.json").rename(model / "sub" / "tokenizer.json")
    (model / "tokenizer.json").symlink_to(Path("sub") / "tokenizer.json")
    code, _, err = run(
        ["fuse", "--model", str(model), "--adapter-path", str(adapter), "--save-path", str(tmp_path / "ok")], capsys
    )
    assert code == 0, err
    assert not (tmp_path / "ok" / "tokenizer.json").is_symlink()
    assert (tmp_path / "ok" / "tokenizer.json").read_bytes() == (model / "sub" / "tokenizer.json").read_bytes()
    # a tokenizer file or a template linked to a file elsewhere is neither copied nor read
    for name in ("tokenizer.json", "chat_template.jinja"):
        (elsewhere / name).write_bytes((model / name).read_bytes())
        (model / name).unlink()
        (model / name).symlink_to(elsewhere / name)
        message = f"{model / name} is a link to {elsewhere / name}, outside the model folder"
        for argv in (
            ["fuse", "--model", str(model), "--adapter-path", str(adapter), "--save-path", str(tmp_path / "fused")],
            ["generate", "--model", str(model), "--prompt", "hi", "--max-tokens", "2"],
        ):
            code, out, err = run(argv, capsys)
            assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
            assert out == ""
        assert not (tmp_path / "fused").exists()
        (model / name).unlink()
        shutil.copy(elsewhere / name, model / name)


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_a_fused_folder_follows_the_umask(umask, qwen3_dir, tmp_path):
    adapter = make_adapter(qwen3_dir, tmp_path / "adapter")
    old = os.umask(umask)
    try:
        out = fuse(qwen3_dir, adapter, tmp_path / "fused", backend="torch")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.iterdir()]}
    assert modes == {name: 0o777 & ~umask if name == "fused" else 0o666 & ~umask for name in modes}
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(modes)
