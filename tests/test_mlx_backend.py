"""MLX backend: logits against mlx-lm's own models and the torch backend, left padding, router weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlx_lm")

import mlx.core as mx  # noqa: E402
from mlx_lm.models.cache import BatchKVCache  # noqa: E402
from mlx_lm.utils import load_model as mlx_lm_load_model  # noqa: E402

import moe_local  # noqa: E402
from moe_local.backends import auto_backend  # noqa: E402
from moe_local.errors import UserError  # noqa: E402

import checkpoints  # noqa: E402
from helpers import both_spellings, gate_name, recorded_routing, rel  # noqa: E402

RNG = np.random.default_rng(0)
# 1 token (unsorted rows), 2x6 tokens (24 rows: unsorted), 2x40 tokens (160 rows: sorted by expert)
INPUTS = {
    "one": RNG.integers(0, 128, (1,)),
    "short": RNG.integers(0, 128, (2, 6)),
    "long": RNG.integers(0, 128, (2, 40)),
}


def mlx_lm_logits(folder: Path, ids) -> np.ndarray:
    model, _ = mlx_lm_load_model(Path(folder))
    ids = np.asarray(ids)
    return np.array(model(mx.array(ids.reshape(-1, ids.shape[-1]))))


CASES = {
    "qwen3-v4-dense-between": lambda d: checkpoints.make_qwen3_moe(d, spelling="v4", decoder_sparse_step=2),
    "qwen3-v5": lambda d: checkpoints.make_qwen3_moe(d, spelling="v5", seed=1),
    "olmoe": lambda d: checkpoints.make_olmoe(d, seed=2),
    "qwen3-no-norm-topk": lambda d: checkpoints.make_qwen3_moe(d, seed=3, norm_topk_prob=False),
    "qwen3-top1": lambda d: checkpoints.make_qwen3_moe(d, seed=4, num_experts_per_tok=1),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    folder = CASES[request.param](tmp_path_factory.mktemp(request.param))
    readable = both_spellings(folder, tmp_path_factory.mktemp("mlxlm") / "m")
    return folder, readable


@pytest.mark.parametrize("inputs", list(INPUTS))
def test_logits_match_mlx_lm_and_torch(case, inputs):
    folder, readable = case
    ids = INPUTS[inputs]
    ours = moe_local.load(str(folder), backend="mlx").logits(ids)
    assert ours.dtype == np.float32 and ours.shape == (*np.atleast_2d(ids).shape, 128)
    assert rel(ours, mlx_lm_logits(readable, ids)) <= 1e-5
    assert rel(ours, moe_local.load(str(folder), backend="torch").logits(ids)) <= 1e-4


def test_reference_impl_matches_grouped(qwen3_dir):
    ids = INPUTS["long"]
    grouped = moe_local.load(str(qwen3_dir), backend="mlx").logits(ids)
    reference = moe_local.load(str(qwen3_dir), backend="mlx", moe_impl="reference").logits(ids)
    assert rel(grouped, reference) <= 1e-5


def test_left_padded_rows_equal_rows_alone(olmoe_dir, tmp_path):
    m = moe_local.load(str(olmoe_dir), backend="mlx")
    lengths = [12, 5, 1, 9]
    rows = [RNG.integers(0, 128, n) for n in lengths]
    width = max(lengths)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    batch = m.logits(ids, mask)
    torch_batch = moe_local.load(str(olmoe_dir), backend="torch").logits(ids, mask)
    # mlx-lm's own model through the same left-padding caches its batched generation uses
    theirs, _ = mlx_lm_load_model(both_spellings(olmoe_dir, tmp_path / "m"))
    padding = (mask == 0).sum(1).tolist()
    assert rel(batch, np.array(theirs(mx.array(ids), cache=[BatchKVCache(padding) for _ in theirs.layers]))) <= 1e-5
    for i, r in enumerate(rows):
        alone = m.logits(r)[0]
        assert rel(batch[i, width - len(r) :], alone) <= 1e-5
        assert rel(batch[i, width - len(r) :], torch_batch[i, width - len(r) :]) <= 1e-4


@pytest.mark.parametrize("moe_impl", [None, "reference"])
@pytest.mark.parametrize("inputs", ["one", "long"])
def test_grove_matches_torch_grove_block(grove_dir, moe_impl, inputs):
    ids = INPUTS[inputs]
    ours = moe_local.load(str(grove_dir), backend="mlx", moe_impl=moe_impl).logits(ids)
    torch_reference = moe_local.load(str(grove_dir), backend="torch", moe_impl="reference").logits(ids)
    assert rel(ours, torch_reference) <= 1e-4


def test_grove_adjugate_strategies_agree(grove_dir):
    m = moe_local.load(str(grove_dir), backend="mlx")
    ids = INPUTS["long"]
    out = {}
    for strategy in ("per-slot", "per-group"):
        for layer in m.spec.moe_layers:
            m.moe_block(layer).adjugate = strategy
        out[strategy] = m.logits(ids)
    assert rel(out["per-slot"], out["per-group"]) <= 1e-5


def test_router_weights_round_trip(qwen3_dir):
    m = moe_local.load(str(qwen3_dir), backend="mlx")
    t = moe_local.load(str(qwen3_dir), backend="torch")
    weights = m.get_router_weights()
    assert sorted(weights) == sorted(gate_name(i) for i in m.spec.moe_layers)
    theirs = t.get_router_weights()
    for name, w in weights.items():
        assert w.dtype == np.float32
        np.testing.assert_array_equal(w, theirs[name])
    layer = m.spec.moe_layers[-1]
    new = {gate_name(layer): RNG.standard_normal(weights[gate_name(layer)].shape).astype(np.float32)}
    m.set_router_weights(new)
    t.set_router_weights(new)
    np.testing.assert_array_equal(m.get_router_weights([layer])[gate_name(layer)], new[gate_name(layer)])
    assert rel(m.logits(INPUTS["short"]), t.logits(INPUTS["short"])) <= 1e-4


def test_bad_input_is_a_user_error(qwen3_dir):
    m = moe_local.load(str(qwen3_dir), backend="mlx")
    with pytest.raises(UserError, match="left padding"):
        m.logits([[1, 2, 3]], attention_mask=[[1, 1, 0]])
    with pytest.raises(UserError, match="token ids"):
        m.logits([[1, 2, 999]])
    with pytest.raises(UserError, match="not an MoE layer"):
        m.set_router_weights({gate_name(0): np.zeros((8, 64), np.float32)})  # layer 0 is dense here
    with pytest.raises(UserError, match="shape"):
        m.set_router_weights({gate_name(1): np.zeros((8, 32), np.float32)})
    with pytest.raises(UserError, match="moe_impl"):
        moe_local.load(str(qwen3_dir), backend="mlx", moe_impl="triton")
    with pytest.raises(UserError, match="float32"):
        moe_local.load(str(qwen3_dir), backend="mlx", dtype="bfloat16", device="cpu")


def test_routing_distribution_is_float32_probabilities(olmoe_dir):
    m = moe_local.load(str(olmoe_dir), backend="mlx")
    layer = m.spec.moe_layers[-1]
    with recorded_routing(m, [layer]) as seen:
        m.logits(INPUTS["short"])
    (probs,) = seen[layer]
    assert probs.dtype == mx.float32 and probs.shape == (12, 8)
    np.testing.assert_allclose(np.array(probs.sum(-1)), 1.0, rtol=1e-5)


def test_stream_generate_runs_on_the_model(qwen3_dir, tmp_path):
    """mlx-lm's generation works on our model object and picks the tokens mlx-lm's own model picks."""
    from mlx_lm.generate import stream_generate
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    m = moe_local.load(str(qwen3_dir), backend="mlx")
    theirs, _ = mlx_lm_load_model(both_spellings(qwen3_dir, tmp_path / "m"))
    prompt = [5, 9, 20, 33]
    tokens = [
        [r.token for r in stream_generate(model, TokenizerWrapper(m.tokenizer), prompt, max_tokens=6)]
        for model in (m.model, theirs)
    ]
    assert len(tokens[0]) == 6 and tokens[0] == tokens[1]


def test_auto_backend_is_mlx_only_on_apple_silicon(monkeypatch):
    import moe_local.backends as backends

    monkeypatch.setattr(backends, "on_apple_silicon", lambda: False)
    assert auto_backend() == "torch"
    monkeypatch.setattr(backends, "on_apple_silicon", lambda: True)
    assert auto_backend() == "mlx"


@pytest.mark.parametrize(
    "make, drop",
    [
        (checkpoints.make_grove, "model.layers.1.mlp.chunk_experts.2.down_proj.weight"),
        (checkpoints.make_qwen3_moe, "model.layers.1.mlp.experts.3.up_proj.weight"),
        (checkpoints.make_olmoe, "lm_head.weight"),
    ],
)
def test_missing_tensor_is_a_user_error(tmp_path, make, drop):
    from safetensors.numpy import load_file, save_file

    folder = make(tmp_path / "m", tokenizer=False)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors[drop]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=drop.replace(".", r"\.")):
        moe_local.load(str(folder), backend="mlx")
