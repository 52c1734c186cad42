"""The torch backend against transformers' eager implementations (code nobody here wrote)."""

import numpy as np
import pytest
import torch

import moe_local
from moe_local.backends.torch.moe import expert_rows
from moe_local.backends.torch.router import route

import checkpoints
from helpers import recorded_routing, rel

RTOL = 1e-5


def hf_eager(folder, family):
    from transformers import OlmoeForCausalLM, Qwen3MoeForCausalLM

    cls = OlmoeForCausalLM if family == "olmoe" else Qwen3MoeForCausalLM
    return cls.from_pretrained(str(folder), attn_implementation="eager", experts_implementation="eager").eval()


def hf_logits(model, ids, mask=None, positions=None):
    with torch.no_grad():
        return model(
            input_ids=torch.as_tensor(ids),
            attention_mask=None if mask is None else torch.as_tensor(mask),
            position_ids=None if positions is None else torch.as_tensor(positions),
        ).logits.numpy()


CASES = {
    "qwen3-norm-on": dict(family="qwen3", norm_topk_prob=True),
    "qwen3-norm-off": dict(family="qwen3", norm_topk_prob=False),
    "qwen3-sparse-step-2": dict(family="qwen3", decoder_sparse_step=2),
    "qwen3-mlp-only-layers": dict(family="qwen3", mlp_only_layers=[0, 2]),
    "qwen3-top-1": dict(family="qwen3", num_experts_per_tok=1),
    "qwen3-v4-spelling": dict(family="qwen3", spelling="v4"),
    "qwen3-tied": dict(family="qwen3", tie_word_embeddings=True),
    "olmoe-norm-off": dict(family="olmoe"),
    "olmoe-norm-on": dict(family="olmoe", norm_topk_prob=True),
    "olmoe-top-1": dict(family="olmoe", num_experts_per_tok=1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_transformers_eager(case, tmp_path):
    kwargs = dict(CASES[case])
    family = kwargs.pop("family")
    make = checkpoints.make_olmoe if family == "olmoe" else checkpoints.make_qwen3_moe
    folder = make(tmp_path / case, seed=3, tokenizer=False, **kwargs)
    ours = moe_local.load(folder, backend="torch")
    ref = hf_eager(folder, "olmoe" if family == "olmoe" else "qwen3")
    ids = np.random.default_rng(0).integers(0, 128, size=(2, 11))
    assert rel(ours.logits(ids), hf_logits(ref, ids)) <= RTOL
    assert rel(ours.logits(ids[0, :1]), hf_logits(ref, ids[:1, :1])) <= RTOL  # one token


def test_left_padded_batch_matches_each_row_alone(qwen3_dir):
    ours = moe_local.load(qwen3_dir, backend="torch")
    ref = hf_eager(qwen3_dir, "qwen3")
    rng = np.random.default_rng(1)
    long, short = rng.integers(0, 128, 12), rng.integers(0, 128, 5)
    ids = np.zeros((2, 12), dtype=np.int64)
    mask = np.zeros((2, 12), dtype=np.int64)
    ids[0], mask[0] = long, 1
    ids[1, -5:], mask[1, -5:] = short, 1
    batch = ours.logits(ids, mask)
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    reference = hf_logits(ref, ids, mask, positions)
    assert rel(batch[:, -5:], reference[:, -5:]) <= RTOL
    assert rel(batch[0], hf_logits(ref, long[None])[0]) <= RTOL
    assert rel(batch[1, -5:], hf_logits(ref, short[None])[0]) <= RTOL
    assert np.isfinite(batch).all()


def test_an_expert_no_token_picks(tmp_path):
    """Top-1 over 8 experts with 3 tokens leaves experts without rows; the grouped path skips them."""
    folder = checkpoints.make_qwen3_moe(tmp_path / "m", seed=5, tokenizer=False, num_experts_per_tok=1)
    ours = moe_local.load(folder, backend="torch")
    ids = np.array([[5, 17, 99]])
    block = ours.moe_block(0)
    with recorded_routing(ours, [0]) as seen:
        logits = ours.logits(ids)
    idx, weights = route(torch.log(seen[0][0]), block.spec.router, block.spec.top_k)
    counts = expert_rows(idx, weights, 8)[2]
    assert 0 in counts
    assert rel(logits, hf_logits(hf_eager(folder, "qwen3"), ids)) <= RTOL


def test_reference_impl_equals_grouped(qwen3_dir, olmoe_dir):
    ids = np.random.default_rng(2).integers(0, 128, size=(3, 9))
    for folder in (qwen3_dir, olmoe_dir):
        grouped = moe_local.load(folder, backend="torch").logits(ids)
        reference = moe_local.load(folder, backend="torch", moe_impl="reference").logits(ids)
        assert rel(grouped, reference) <= RTOL


def test_bfloat16_runs_close_to_float32(qwen3_dir):
    ids = np.random.default_rng(3).integers(0, 128, size=(1, 8))
    full = moe_local.load(qwen3_dir, backend="torch").logits(ids)
    half = moe_local.load(qwen3_dir, backend="torch", dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    assert rel(half.logits(ids), full) < 0.1


def test_router_weights_round_trip(qwen3_dir):
    m = moe_local.load(qwen3_dir, backend="torch")
    weights = m.get_router_weights()
    assert sorted(weights) == [f"model.layers.{i}.mlp.gate.weight" for i in m.spec.moe_layers]
    assert all(w.dtype == np.float32 and w.shape == (8, 64) for w in weights.values())
    ids = np.arange(10)[None]
    before = m.logits(ids)
    changed = {k: v * 3 for k, v in weights.items()}
    m.set_router_weights(changed)
    assert not np.allclose(m.logits(ids), before)
    m.set_router_weights(weights)
    np.testing.assert_array_equal(m.logits(ids), before)
    with pytest.raises(moe_local.UserError, match="shape"):
        m.set_router_weights({"model.layers.1.mlp.gate.weight": np.zeros((4, 64), np.float32)})
    with pytest.raises(moe_local.UserError, match="not an MoE layer"):
        m.set_router_weights({"model.layers.0.mlp.gate.weight": np.zeros((8, 64), np.float32)})


def test_parameter_count_matches_transformers(qwen3_dir, olmoe_dir):
    for folder, family in ((qwen3_dir, "qwen3"), (olmoe_dir, "olmoe")):
        spec = moe_local.load(folder, backend="torch").spec
        expected = sum(p.numel() for p in hf_eager(folder, family).parameters())
        assert spec.parameter_counts()["total"] == expected
