"""Spec parsing, checkpoint reading and writing, and one-line errors for bad folders."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import moe_local
from moe_local.checkpoint import write_weights
from moe_local.families import load_spec, spec_from_config

import checkpoints
from helpers import run_cli


def test_both_spellings_give_the_same_spec(tmp_path):
    v4 = load_spec(checkpoints.make_qwen3_moe(tmp_path / "v4", spelling="v4", tokenizer=False, rope_theta=5e5))
    v5 = load_spec(checkpoints.make_qwen3_moe(tmp_path / "v5", spelling="v5", tokenizer=False, rope_theta=5e5))
    assert v4 == v5
    assert v4.rope_theta == 5e5 and v4.moe[0].num_experts == 8


def test_layer_layout_from_sparse_step_and_mlp_only_layers():
    base = dict(checkpoints.QWEN3, model_type="qwen3_moe", num_hidden_layers=6)
    assert spec_from_config(dict(base, decoder_sparse_step=2)).moe_layers == (1, 3, 5)
    spec = spec_from_config(dict(base, mlp_only_layers=[0, 4]))
    assert spec.moe_layers == (1, 2, 3, 5) and spec.dense_layers == (0, 4)
    assert spec.last_moe_layers(2) == (3, 5)
    olmoe = spec_from_config(dict(checkpoints.OLMOE, model_type="olmoe"))
    assert olmoe.moe_layers == (0, 1, 2, 3) and olmoe.head_dim == 16


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model_type": "llama"}, "model_type 'llama' is not supported"),
        ({"num_local_experts": 4}, "inconsistent 'num_experts'=8, 'num_local_experts'=4"),
        ({"hidden_size": None}, "has no 'hidden_size'"),
        ({"num_experts_per_tok": 9}, "'num_experts_per_tok' (9) exceeds"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "RoPE type 'yarn' is not supported"),
        ({"num_hidden_layers": "4"}, "'num_hidden_layers' must be an integer"),
        ({"mlp_only_layers": [0, 1, 2, 3]}, "no layer is an MoE layer"),
    ],
)
def test_bad_configs_name_the_key(change, message):
    config = {**checkpoints.QWEN3, "model_type": "qwen3_moe", **change}
    with pytest.raises(moe_local.UserError) as e:
        spec_from_config(config)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_grove_adjugate_size_from_tensors_or_config():
    config = dict(checkpoints.QWEN3, architectures=["GroveMoeForCausalLM"], model_type="grove_moe")
    shapes = {"model.layers.0.mlp.chunk_experts.0.gate_proj.weight": (24, 64)}
    assert spec_from_config(config, shapes).moe[0].grove.adjugate_size == 24
    assert (
        spec_from_config(dict(config, grove_adjugate_intermediate_size=12, grove_scale=0.1)).moe[0].grove.scale == 0.1
    )
    with pytest.raises(moe_local.UserError, match="no adjugate experts for layer 0"):
        spec_from_config(config, {"model.layers.0.mlp.gate.weight": (8, 64)})
    with pytest.raises(moe_local.UserError, match="no checkpoint tensors"):
        spec_from_config(config, {})


def test_written_folder_loads_in_transformers_and_mlx_lm(qwen3_dir, tmp_path):
    import mlx.core as mx
    from mlx_lm.utils import load_model
    from transformers import AutoModelForCausalLM

    ours = moe_local.load(qwen3_dir, backend="torch")
    out = ours.save(tmp_path / "written")
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts"] == config["num_local_experts"] == 8
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert (out / "tokenizer.json").is_file()
    ids = np.random.default_rng(0).integers(0, 128, size=(1, 9))
    expected = ours.logits(ids)
    hf = AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    with torch.no_grad():
        np.testing.assert_allclose(
            hf(torch.as_tensor(ids)).logits.numpy(), expected, rtol=0, atol=1e-5 * np.abs(expected).max()
        )
    mlx_model, _ = load_model(out)
    mlx_logits = np.array(mlx_model(mx.array(ids)).astype(mx.float32))
    np.testing.assert_allclose(mlx_logits, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_write_refuses_a_non_empty_folder(qwen3_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(moe_local.UserError, match="not empty"):
        moe_local.load(qwen3_dir, backend="torch").save(tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_sharded_weights_load_through_the_index(qwen3_dir, tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((qwen3_dir / name).read_bytes())
    write_weights(folder, load_file(str(qwen3_dir / "model.safetensors")), max_shard_bytes=200_000)
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    ids = np.arange(8)[None]
    np.testing.assert_array_equal(
        moe_local.load(folder, backend="torch").logits(ids), moe_local.load(qwen3_dir, backend="torch").logits(ids)
    )


def _broken_copy(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_bytes((src / "config.json").read_bytes())
    state = load_file(str(src / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing-config", "has no config.json"),
        ("unknown-type", "model_type 'gpt2' is not supported"),
        ("missing-tensor", "lacks tensor model.layers.1.mlp.experts.3.up_proj.weight"),
        ("misshaped-tensor", "tensor model.layers.1.self_attn.q_proj.weight has shape (64, 32)"),
        ("not-json", "is not valid JSON"),
        ("truncated", "model.safetensors is truncated"),
    ],
)
def test_bad_folders_exit_2_with_one_line(case, message, qwen3_dir, tmp_path):
    folder = tmp_path / case
    if case == "missing-config":
        folder.mkdir()
    elif case in ("unknown-type", "not-json"):
        folder.mkdir()
        text = "{not json" if case == "not-json" else json.dumps({"model_type": "gpt2"})
        (folder / "config.json").write_text(text)
    elif case == "truncated":  # a copy cut short: the header is whole, the data is not
        shutil.copytree(qwen3_dir, folder)
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "missing-tensor":
        _broken_copy(qwen3_dir, folder, lambda s: s.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    else:
        _broken_copy(
            qwen3_dir, folder, lambda s: s.update({"model.layers.1.self_attn.q_proj.weight": torch.zeros(64, 32)})
        )
    # info reads only headers; the python API loads the weights too
    with pytest.raises(moe_local.UserError) as e:
        moe_local.load(folder, backend="torch")
    assert message in str(e.value)
    result = run_cli("info", "--model", folder)
    if case in ("missing-tensor", "misshaped-tensor"):
        return  # info does not load weights
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_info_describes_a_grove_model(grove_dir):
    result = run_cli("info", "--model", grove_dir)
    assert result.returncode == 0, result.stderr
    assert "family:       grove_moe" in result.stdout
    assert "4 groups of 2 experts, one adjugate of size 16 each, scale 0.05" in result.stdout
    assert "backend:      torch" in result.stdout
    spec = load_spec(grove_dir)
    counts = spec.parameter_counts()
    # top-2 over 4 groups: one adjugate when both experts share a group, two otherwise
    assert counts["active_max"] - counts["active_min"] == 4 * 3 * 64 * 16


def test_cli_usage_errors_exit_2_with_one_line(tmp_path):
    for argv, message in [
        (["info", "--bogus"], "moe-local: error: No such option '--bogus' (see 'moe-local info --help')"),
        (["nonsense"], "moe-local: error: No such command 'nonsense' (see 'moe-local --help')"),
    ]:
        result = run_cli(*argv)
        assert result.returncode == 2 and result.stderr == message + "\n", result.stderr
    (tmp_path / "c.yaml").write_text("modle: x\n")
    result = run_cli("info", "-c", tmp_path / "c.yaml")
    assert result.returncode == 2 and "unknown key 'modle'" in result.stderr


def test_yaml_config_sets_defaults_and_flags_win(grove_dir, qwen3_dir, tmp_path):
    (tmp_path / "c.yaml").write_text(f"model: {grove_dir}\n")
    assert "grove_moe" in run_cli("info", "-c", tmp_path / "c.yaml").stdout
    assert "qwen3_moe" in run_cli("info", "-c", tmp_path / "c.yaml", "--model", qwen3_dir).stdout


@pytest.mark.parametrize("family", ["qwen3", "olmoe"])
def test_keys_left_out_of_config_take_transformers_defaults(family, tmp_path):
    """rope_theta, rms_norm_eps and max_position_embeddings missing: the model transformers builds."""
    from transformers import AutoModelForCausalLM

    make = checkpoints.make_olmoe if family == "olmoe" else checkpoints.make_qwen3_moe
    folder = make(tmp_path / family, seed=2, tokenizer=False)
    config = json.loads((folder / "config.json").read_text())
    for key in ("rope_theta", "rope_parameters", "rms_norm_eps", "max_position_embeddings"):
        config.pop(key, None)
    (folder / "config.json").write_text(json.dumps(config))
    ids = np.arange(1, 30)[None] % 128
    ref = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        expected = ref(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(
        moe_local.load(folder, backend="torch").logits(ids), expected, rtol=0, atol=1e-5 * np.abs(expected).max()
    )
