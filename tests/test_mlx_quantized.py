"""MLX backend on folders quantized by mlx-lm: loading, logits, gates, router gradients through gather_qmm."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlx_lm")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx_lm.convert import convert  # noqa: E402
from mlx_lm.models.switch_layers import QuantizedSwitchLinear  # noqa: E402
from mlx_lm.utils import dequantize_model, load_model, quantize_model, save_config, save_model  # noqa: E402

import moe_local  # noqa: E402
from moe_local.backends.mlx.model import mlx_config  # noqa: E402
from moe_local.families import config_for_writing  # noqa: E402

import checkpoints  # noqa: E402
from helpers import rel  # noqa: E402

RNG = np.random.default_rng(1)
IDS = {"short": RNG.integers(0, 128, (2, 6)), "long": RNG.integers(0, 128, (2, 40))}
# The tiny models' smallest input dimension is 32 (the expert size), so group size 32.
GROUP, BITS = 32, 4
GATE_BITS = {"qwen3_moe": 8, "olmoe": BITS}  # mlx-lm's Qwen3-MoE predicate keeps gates at 8 bits


@pytest.fixture(scope="module", params=["qwen3_moe", "olmoe"])
def quantized(request, tmp_path_factory):
    """(family, folder written by mlx_lm.convert with quantize=True)."""
    make = {
        "qwen3_moe": lambda d: checkpoints.make_qwen3_moe(d, spelling="both", decoder_sparse_step=2),
        "olmoe": lambda d: checkpoints.make_olmoe(d, spelling="both"),
    }[request.param]
    src = make(tmp_path_factory.mktemp(request.param))
    dst = tmp_path_factory.mktemp("q") / "model"
    convert(str(src), str(dst), quantize=True, q_group_size=GROUP, q_bits=BITS)
    return request.param, dst


@pytest.mark.parametrize("inputs", list(IDS))
def test_quantized_folder_matches_mlx_lm(quantized, inputs):
    family, folder = quantized
    m = moe_local.load(str(folder), backend="mlx")
    block = m.moe_block(m.spec.moe_layers[0])
    assert isinstance(block.switch_mlp.down_proj, QuantizedSwitchLinear)
    assert isinstance(block.gate, nn.QuantizedLinear) and block.gate.bits == GATE_BITS[family]
    theirs, _ = load_model(Path(folder))
    expected = np.array(theirs(mx.array(IDS[inputs])))
    assert rel(m.logits(IDS[inputs]), expected) <= 1e-5


def test_quantized_gates_dequantize(quantized):
    _, folder = quantized
    m = moe_local.load(str(folder), backend="mlx")
    theirs, _ = load_model(Path(folder))
    for layer, w in m.get_router_weights().items():
        gate = theirs.model.layers[int(layer.split(".")[2])].mlp.gate
        expected = mx.dequantize(gate.weight, gate.scales, gate.biases, gate.group_size, gate.bits)
        assert w.dtype == np.float32
        np.testing.assert_array_equal(w, np.array(expected))


def router_grads(m, layers, ids) -> dict:
    """d(next-token cross-entropy)/d(gate) for the given layers, MoE blocks in training mode."""
    model = m.model
    model.freeze()
    for layer in layers:
        block = m.moe_block(layer)
        block.gate.unfreeze()
        block.train()
    tokens = mx.array(ids)

    def loss(model):
        logits = model(tokens[:, :-1])
        return nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="mean")

    _, grads = nn.value_and_grad(model, loss)(model)
    return {layer: np.array(grads["model"]["layers"][layer]["mlp"]["gate"]["weight"]) for layer in layers}


@pytest.mark.parametrize("inputs", list(IDS))
def test_router_gradients_through_gather_qmm_match_dequantized(quantized, inputs):
    _, folder = quantized
    q = moe_local.load(str(folder), backend="mlx")
    layers = q.spec.last_moe_layers(2)
    gates = q.get_router_weights(layers)
    q.set_router_weights(gates)  # float gates on the quantized model
    assert all(type(q.moe_block(i).gate) is nn.Linear for i in layers)
    assert isinstance(q.moe_block(layers[0]).switch_mlp.gate_proj, QuantizedSwitchLinear)

    d = moe_local.load(str(folder), backend="mlx")
    d.model = dequantize_model(d.model)
    assert not isinstance(d.moe_block(layers[0]).switch_mlp.gate_proj, QuantizedSwitchLinear)
    d.set_router_weights(gates)
    np.testing.assert_array_equal(q.logits(IDS[inputs]), q.logits(IDS[inputs]))  # deterministic

    ours, reference = router_grads(q, layers, IDS[inputs]), router_grads(d, layers, IDS[inputs])
    for layer in layers:
        assert np.abs(reference[layer]).max() > 0
        assert rel(ours[layer], reference[layer]) <= 1e-4


def test_quantized_grove_folder_loads(tmp_path):
    """A Grove model quantized with mlx-lm's quantize_model and saved loads back (adjugates quantized too)."""
    grove_dir = checkpoints.make_grove(tmp_path / "grove", adjugate_size=GROUP)
    m = moe_local.load(str(grove_dir), backend="mlx")
    config = config_for_writing(m.spec)
    model, qconfig = quantize_model(m.model, config, GROUP, BITS)
    out = tmp_path / "q"
    save_model(out, model)
    save_config(qconfig, out / "config.json")
    shutil.copy(grove_dir / "tokenizer.json", out / "tokenizer.json")
    assert json.loads((out / "config.json").read_text())["model_type"] == "grove_moe"
    loaded = moe_local.load(str(out), backend="mlx")
    block = loaded.moe_block(0)
    assert isinstance(block.chunk_experts.down_proj, QuantizedSwitchLinear) and block.gate.bits == 8
    ids = IDS["long"]
    assert rel(loaded.logits(ids), np.array(model(mx.array(ids)))) <= 1e-5
    assert mlx_config(loaded.spec)["model_type"] == "qwen3_moe"


def test_info_counts_a_quantized_folder_as_stored(quantized):
    from moe_local.checkpoint import weight_bytes
    from moe_local.commands.info import describe
    from moe_local.families import load_spec

    _, folder = quantized
    lines = "\n".join(describe(load_spec(folder), folder))
    assert "weights quantized (MLX)" in lines
    float_bytes = load_spec(folder).parameter_counts()["total"] * 4
    assert weight_bytes(folder) < 0.5 * float_bytes
    stored = weight_bytes(folder) / 1024**2
    assert f"weights {stored:.1f} MiB" in lines
