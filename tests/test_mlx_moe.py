"""The MLX MoE block against a direct numpy transcription of the routing rules and Grove's formula."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mlx_lm")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from moe_local.backends.mlx.moe import SORT_MIN_ROWS, MoEBlock  # noqa: E402
from moe_local.families.grove_moe import ROUTER as GROVE_ROUTER  # noqa: E402
from moe_local.spec import GroveSpec, MoESpec, RouterSpec  # noqa: E402

H, I, IA = 32, 32, 32
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def make_block(top_k=3, experts=8, grove=True, norm=False, seed=0) -> MoEBlock:
    spec = MoESpec(
        layer=0,
        num_experts=experts,
        top_k=top_k,
        expert_size=I,
        router=GROVE_ROUTER if grove else RouterSpec(renormalize=norm),
        grove=GroveSpec(experts_per_group=2, adjugate_size=IA, scale=0.05) if grove else None,
    )
    block = MoEBlock(spec, H)
    rng = np.random.default_rng(seed)
    params = {
        name: mx.array(0.3 * rng.standard_normal(p.shape).astype(np.float32))
        for name, p in tree_flatten(block.parameters())
    }
    block.load_weights(list(params.items()))
    return block


def swiglu_np(x, gate, up, down):
    g, u = x @ gate.T, x @ up.T
    return (g / (1 + np.exp(-g)) * u) @ down.T


def formula(block: MoEBlock, x: np.ndarray) -> np.ndarray:
    """Token by token, in float64: the routing rules and y = Σ w_i E_i + λ Σ_g (Σ_{i∈g} w_i) A_g."""
    p = {k: np.array(v, dtype=np.float64) for k, v in tree_flatten(block.parameters())}
    spec = block.spec
    out = np.zeros_like(x, dtype=np.float64)
    for t, xt in enumerate(x.astype(np.float64)):
        logits = p["gate.weight"] @ xt
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        score = 1 / (1 + np.exp(-logits)) if spec.grove else probs
        chosen = np.argsort(-score)[: spec.top_k]
        w = probs[chosen]
        if spec.router.renormalize:
            w = w / w.sum()
        for e, wi in zip(chosen, w):
            out[t] += wi * swiglu_np(xt, *(p[f"switch_mlp.{n}.weight"][e] for n in PROJECTIONS))
        if spec.grove:
            groups = chosen // spec.grove.experts_per_group
            for g in np.unique(groups):
                a = swiglu_np(xt, *(p[f"chunk_experts.{n}.weight"][g] for n in PROJECTIONS))
                out[t] += spec.grove.scale * w[groups == g].sum() * a
    return out


def run(block, x, impl="grouped", adjugate="auto") -> np.ndarray:
    block.impl, block.adjugate = impl, adjugate
    return np.array(block(mx.array(x)))


TOKENS = [1, 5, 40]  # 40 tokens x 3 slots = 120 rows: sorted by expert


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("adjugate", ["per-slot", "per-group"])
def test_grove_block_matches_formula(tokens, adjugate):
    block = make_block()
    x = np.random.default_rng(tokens).standard_normal((tokens, H)).astype(np.float32)
    expected = formula(block, x)
    for impl in ("grouped", "reference"):
        np.testing.assert_allclose(run(block, x, impl, adjugate), expected, rtol=1e-4, atol=1e-5)


def test_every_group_twice():
    """k = E: every token selects both experts of every group, so per-group halves the adjugate rows."""
    block = make_block(top_k=8)
    x = np.random.default_rng(3).standard_normal((SORT_MIN_ROWS, H)).astype(np.float32)
    expected = formula(block, x)
    for adjugate in ("per-slot", "per-group"):
        np.testing.assert_allclose(run(block, x, adjugate=adjugate), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("tokens", TOKENS)
def test_softmax_block_matches_formula(tokens, norm):
    block = make_block(grove=False, norm=norm, top_k=2)
    x = np.random.default_rng(tokens).standard_normal((tokens, H)).astype(np.float32)
    np.testing.assert_allclose(run(block, x), formula(block, x), rtol=1e-4, atol=1e-5)


def test_quantized_block_matches_reference():
    block = make_block()
    nn.quantize(block, group_size=32, bits=4)
    x = np.random.default_rng(5).standard_normal((40, H)).astype(np.float32)
    reference = run(block, x, "reference")
    for adjugate in ("per-slot", "per-group"):
        np.testing.assert_allclose(run(block, x, adjugate=adjugate), reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tokens", [5, 40])
def test_gate_gradients_agree_across_strategies(tokens):
    block = make_block()
    block.freeze()
    block.gate.unfreeze()
    block.train()
    x = mx.array(np.random.default_rng(7).standard_normal((tokens, H)).astype(np.float32))
    target = mx.array(np.random.default_rng(8).standard_normal((tokens, H)).astype(np.float32))
    grads = {}
    for impl, adjugate in (("reference", "auto"), ("grouped", "per-slot"), ("grouped", "per-group")):
        block.impl, block.adjugate = impl, adjugate
        _, g = nn.value_and_grad(block, lambda b: ((b(x) - target) ** 2).sum())(block)
        grads[(impl, adjugate)] = np.array(g["gate"]["weight"])
    reference = grads.pop(("reference", "auto"))
    assert np.abs(reference).max() > 0
    for g in grads.values():
        assert np.abs(g - reference).max() <= 1e-5 * np.abs(reference).max()


def test_per_group_falls_back_under_compile():
    """mx.compile forbids the host read that counts (token, group) rows: the block runs per-slot there."""
    block = make_block()
    x = mx.array(np.random.default_rng(9).standard_normal((40, H)).astype(np.float32))
    block.adjugate = "per-group"
    eager = np.array(block(x))
    compiled = np.array(mx.compile(block)(x))
    np.testing.assert_allclose(compiled, eager, rtol=1e-4, atol=1e-5)
