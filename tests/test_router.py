"""Both backends' routers (``backends/*/router.py``) against routers nobody here wrote.

Each case is a family's router config (the config.json fields that decide routing) and the
:class:`RouterSpec` the family maps it to. The references are transformers' own router classes
(``transformers/models/<family>/modeling_<family>.py``), mlx-lm's own MoE blocks
(``mlx_lm/models/<family>.py``) and, for GroveMoE (no library class), a numpy transcription of its
rule. Everything runs in float32 on random weights from a fixed seed, for 7 tokens and for 1.

Routings are compared as sets of (expert, weight) per token: the order of the k within a token
differs between implementations (``torch.topk`` sorts, ``argpartition`` does not), so each token's
pairs are sorted by expert id first.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from moe_local.backends.torch import router as torch_router  # noqa: E402
from moe_local.families import grove_moe  # noqa: E402
from moe_local.spec import RouterSpec  # noqa: E402

HIDDEN = 16
TOKENS = 7
RTOL, ATOL = 1e-5, 1e-6


# -- cases --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    family: str  # transformers' and mlx-lm's module name
    config: dict  # config.json fields that decide the routing
    rule: RouterSpec  # what moe_local routes this family with
    wrong: tuple = ()  # near-miss rules the references must tell apart from `rule`
    references: tuple = ("transformers", "mlx-lm")
    selection_bias: tuple | None = None  # (low, high) of DeepSeek's e_score_correction_bias
    seed: int = 0

    @property
    def experts(self) -> int:
        c = self.config
        return c.get("num_experts") or c.get("num_local_experts") or c["n_routed_experts"]

    @property
    def k(self) -> int:
        return self.config["num_experts_per_tok"]


def softmax_case(id, family, experts, k, rule, wrong, experts_key="num_experts", seed=0, **config):
    return Case(id, family, {experts_key: experts, "num_experts_per_tok": k, **config}, rule, wrong, seed=seed)


DEEPSEEK_V3 = RouterSpec(
    scoring="sigmoid", selection_bias=True, groups=4, groups_kept=2, renormalize=True, scaling=2.5, float32_logits=True
)

CASES = [
    softmax_case(
        "qwen3_moe-norm",
        "qwen3_moe",
        16,
        4,
        RouterSpec(renormalize=True),
        (RouterSpec(renormalize=False),),
        norm_topk_prob=True,
        seed=1,
    ),
    softmax_case(
        "qwen3_moe-no-norm",
        "qwen3_moe",
        12,
        3,
        RouterSpec(renormalize=False),
        (RouterSpec(renormalize=True),),
        norm_topk_prob=False,
        seed=2,
    ),
    softmax_case(
        "olmoe-no-norm",
        "olmoe",
        16,
        8,
        RouterSpec(renormalize=False),
        (RouterSpec(renormalize=True),),
        norm_topk_prob=False,
        seed=3,
    ),
    softmax_case(
        "olmoe-norm",
        "olmoe",
        8,
        2,
        RouterSpec(renormalize=True),
        (RouterSpec(renormalize=False),),
        norm_topk_prob=True,
        seed=4,
    ),
    # transformers: softmax -> top-k -> renormalise; mlx-lm: top-k of the logits -> softmax over the k.
    # The two orders are the same function, so each rule must match both libraries.
    softmax_case(
        "mixtral-score-topk",
        "mixtral",
        8,
        2,
        RouterSpec(order="score-topk", renormalize=True),
        (RouterSpec(renormalize=False),),
        experts_key="num_local_experts",
        seed=5,
    ),
    softmax_case(
        "mixtral-topk-score",
        "mixtral",
        8,
        2,
        RouterSpec(order="topk-score"),
        (RouterSpec(renormalize=False),),
        experts_key="num_local_experts",
        seed=5,
    ),
    softmax_case(
        "qwen2_moe-no-norm",
        "qwen2_moe",
        12,
        4,
        RouterSpec(renormalize=False),
        (RouterSpec(renormalize=True),),
        norm_topk_prob=False,
        seed=6,
    ),
    # mlx-lm's Qwen2MoeSparseMoeBlock has no norm_topk_prob (it never renormalises): transformers only.
    replace(
        softmax_case(
            "qwen2_moe-norm",
            "qwen2_moe",
            12,
            4,
            RouterSpec(renormalize=True),
            (RouterSpec(renormalize=False),),
            norm_topk_prob=True,
            seed=7,
        ),
        references=("transformers",),
    ),
    Case(
        "deepseek_v3",
        "deepseek_v3",
        dict(
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
        ),
        DEEPSEEK_V3,
        wrong=(
            replace(DEEPSEEK_V3, selection_bias=False),  # bias ignored
            replace(DEEPSEEK_V3, groups=1, groups_kept=1),  # no group limit
            replace(DEEPSEEK_V3, scaling=1.0),
            replace(DEEPSEEK_V3, renormalize=False),
            replace(DEEPSEEK_V3, scoring="softmax"),
        ),
        selection_bias=(0.0, 0.5),
        seed=8,
    ),
    Case(
        "deepseek_v3-no-norm",
        "deepseek_v3",
        dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
        ),
        RouterSpec(scoring="sigmoid", selection_bias=True, groups=2, groups_kept=1, float32_logits=True),
        wrong=(RouterSpec(scoring="sigmoid", selection_bias=True, groups=2, groups_kept=1, renormalize=True),),
        selection_bias=(0.0, 0.5),
        seed=9,
    ),
    Case(
        "deepseek_v3-one-group",
        "deepseek_v3",  # n_group 1 (Kimi-K2's layout)
        dict(
            n_routed_experts=12,
            num_experts_per_tok=3,
            n_group=1,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.827,
        ),
        RouterSpec(scoring="sigmoid", selection_bias=True, renormalize=True, scaling=2.827, float32_logits=True),
        wrong=(RouterSpec(scoring="sigmoid", renormalize=True, scaling=2.827),),
        selection_bias=(0.0, 0.5),
        seed=10,
    ),
    softmax_case(
        "gpt_oss",
        "gpt_oss",
        16,
        4,
        RouterSpec(order="topk-score", bias=True),
        (
            RouterSpec(order="topk-score"),  # router bias dropped
            RouterSpec(bias=True),
        ),  # softmax over all experts
        experts_key="num_local_experts",
        seed=11,
    ),
    Case(
        "grove_moe",
        "grove_moe",
        dict(num_experts=16, num_experts_per_tok=4),
        grove_moe.ROUTER,
        wrong=(replace(grove_moe.ROUTER, renormalize=False),),
        references=("numpy",),
        seed=12,
    ),
]
CASE_IDS = [c.id for c in CASES]
WITH_REFERENCE = [pytest.param(c, r, id=f"{c.id}-{r}") for c in CASES for r in c.references]
SIZES = [pytest.param(TOKENS, id="T7"), pytest.param(1, id="T1")]


@dataclass
class Data:
    x: np.ndarray  # [T, H]
    weight: np.ndarray  # [E, H]
    bias: np.ndarray | None = None  # [E], the router's bias (gpt-oss)
    selection_bias: np.ndarray | None = None  # [E], DeepSeek's e_score_correction_bias

    def logits(self) -> np.ndarray:
        z = self.x @ self.weight.T
        return (z if self.bias is None else z + self.bias).astype(np.float32)

    def first(self, tokens: int) -> Data:
        return replace(self, x=self.x[:tokens])


def make_data(case: Case, tokens: int = TOKENS) -> Data:
    rng = np.random.default_rng(case.seed)
    x = rng.standard_normal((TOKENS, HIDDEN)).astype(np.float32)
    weight = (rng.standard_normal((case.experts, HIDDEN)) / np.sqrt(HIDDEN)).astype(np.float32)
    bias = rng.standard_normal(case.experts).astype(np.float32) if case.rule.bias else None
    sel = None
    if case.selection_bias:
        sel = rng.uniform(*case.selection_bias, case.experts).astype(np.float32)
    return Data(x, weight, bias, sel).first(tokens)


# -- comparing ----------------------------------------------------------------------------------


def by_expert(idx, weights):
    """Each token's (expert, weight) pairs sorted by expert id, as numpy."""
    idx, weights = np.asarray(idx).astype(np.int64), np.asarray(weights, dtype=np.float64)
    order = np.argsort(idx, axis=-1)
    return np.take_along_axis(idx, order, -1), np.take_along_axis(weights, order, -1)


def same_routing(got, want) -> bool:
    (gi, gw), (wi, ww) = by_expert(*got), by_expert(*want)
    return gi.shape == wi.shape and (gi == wi).all() and np.allclose(gw, ww, rtol=RTOL, atol=ATOL)


def assert_same_routing(got, want, what: str) -> float:
    """Asserts equal (expert, weight) sets per token; returns the largest weight difference."""
    (gi, gw), (wi, ww) = by_expert(*got), by_expert(*want)
    assert gi.shape == wi.shape, f"{what}: shapes {gi.shape} != {wi.shape}"
    np.testing.assert_array_equal(gi, wi, err_msg=f"{what}: different experts chosen")
    np.testing.assert_allclose(gw, ww, rtol=RTOL, atol=ATOL, err_msg=f"{what}: different weights")
    return float(np.abs(gw - ww).max())


# -- ours ---------------------------------------------------------------------------------------


def torch_router_module(case: Case, d: Data, rule: RouterSpec) -> torch_router.Router:
    r = torch_router.Router(case.experts, HIDDEN, rule)
    with torch.no_grad():
        r.weight.copy_(torch.from_numpy(d.weight))
        if rule.bias:
            r.bias.copy_(torch.from_numpy(d.bias))
        if rule.selection_bias:
            r.e_score_correction_bias.copy_(torch.from_numpy(d.selection_bias))
    return r


def ours_torch(case: Case, d: Data, rule: RouterSpec | None = None):
    """moe_local's torch routing of x: Router (weight, bias, selection bias) then route()."""
    rule = rule or case.rule
    r = torch_router_module(case, d, rule)
    with torch.no_grad():
        idx, w = torch_router.route(r(torch.from_numpy(d.x)), rule, case.k, r.e_score_correction_bias)
    assert idx.shape == w.shape == (d.x.shape[0], case.k) and w.dtype == torch.float32
    return idx.numpy(), w.numpy()


def ours_mlx(case: Case, d: Data, rule: RouterSpec | None = None):
    mx = pytest.importorskip("mlx.core")
    from moe_local.backends.mlx import router as mlx_router

    rule = rule or case.rule
    logits = mx.array(d.x) @ mx.array(d.weight).T
    if rule.bias:
        logits = logits + mx.array(d.bias)
    sel = mx.array(d.selection_bias) if rule.selection_bias else None
    idx, w = mlx_router.route(logits, rule, case.k, sel)
    assert idx.shape == w.shape == (d.x.shape[0], case.k) and w.dtype == mx.float32
    return np.array(idx), np.array(w)


# -- references ---------------------------------------------------------------------------------

TRANSFORMERS = {  # family -> (config class, router class in modeling_<family>.py)
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeTopKRouter"),
    "olmoe": ("OlmoeConfig", "OlmoeTopKRouter"),
    "mixtral": ("MixtralConfig", "MixtralTopKRouter"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeTopKRouter"),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3TopkRouter"),  # computes the grouped top-k itself
    "gpt_oss": ("GptOssConfig", "GptOssTopKRouter"),
}


def transformers_router(case: Case, d: Data):
    transformers = pytest.importorskip("transformers")
    config_class, router_class = TRANSFORMERS[case.family]
    modeling = importlib.import_module(f"transformers.models.{case.family}.modeling_{case.family}")
    r = getattr(modeling, router_class)(getattr(transformers, config_class)(hidden_size=HIDDEN, **case.config))
    with torch.no_grad():
        r.weight.copy_(torch.from_numpy(d.weight))
        if getattr(r, "bias", None) is not None:
            r.bias.copy_(torch.from_numpy(d.bias))
        if hasattr(r, "e_score_correction_bias"):
            r.e_score_correction_bias.copy_(torch.from_numpy(d.selection_bias))
    return r


def run_transformers(case: Case, d: Data):
    """transformers' router returns (router_logits, weights [T, k], expert ids [T, k])."""
    with torch.no_grad():
        _, weights, idx = transformers_router(case, d)(torch.from_numpy(d.x))
    return idx.numpy(), weights.float().numpy()


MLX_LM = {  # family -> (block class in mlx_lm/models/<family>.py, its gate, its experts)
    "qwen3_moe": ("Qwen3MoeSparseMoeBlock", "gate", "switch_mlp"),
    "olmoe": ("OlmoeSparseMoeBlock", "gate", "switch_mlp"),
    "mixtral": ("MixtralSparseMoeBlock", "gate", "switch_mlp"),
    "qwen2_moe": ("Qwen2MoeSparseMoeBlock", "gate", "switch_mlp"),
    "gpt_oss": ("MLPBlock", "router", "experts"),
}
MLX_LM_ARGS = dict(
    model_type="test",
    hidden_size=HIDDEN,
    num_hidden_layers=1,
    intermediate_size=8,
    moe_intermediate_size=8,
    shared_expert_intermediate_size=8,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=8,
    rms_norm_eps=1e-6,
    vocab_size=32,
    rope_theta=1e4,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    tie_word_embeddings=False,
    max_position_embeddings=64,
    norm_topk_prob=False,
)


def run_mlx_lm(case: Case, d: Data):
    """mlx-lm's own block, with its experts swapped for a probe that records the chosen ids and
    returns unit vectors, so that the block's output is the weights in the order of the ids."""
    mx = pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    models = importlib.import_module(f"mlx_lm.models.{case.family}")
    args = models.ModelArgs.from_dict({**MLX_LM_ARGS, "model_type": case.family, **case.config})
    x = mx.array(d.x)
    if case.family == "deepseek_v3":  # MoEGate returns (ids, weights) itself
        gate = models.MoEGate(args)
        gate.weight = mx.array(d.weight)
        gate.e_score_correction_bias = mx.array(d.selection_bias)
        idx, weights = gate(x)
        return np.array(idx), np.array(weights)

    block_class, gate_name, experts_name = MLX_LM[case.family]
    block = getattr(models, block_class)(args)
    getattr(block, gate_name).weight = mx.array(d.weight)
    if "bias" in getattr(block, gate_name):
        getattr(block, gate_name).bias = mx.array(d.bias)
    chosen = []

    def probe(x, idx):  # [..., H], [..., k] -> [..., k, H]: slot j is the unit vector e_j
        chosen.append(idx)
        return mx.broadcast_to(mx.eye(case.k, x.shape[-1]), (*idx.shape, x.shape[-1]))

    setattr(block, experts_name, probe)
    if case.family == "qwen2_moe":
        block.shared_expert = lambda x: mx.zeros_like(x)
    y = block(x[None])  # [1, T, H]: y[..., j] is the weight of the j-th chosen expert
    (idx,) = chosen
    return np.array(idx).reshape(-1, case.k), np.array(y).reshape(-1, HIDDEN)[:, : case.k]


def run_grove_numpy(case: Case, d: Data):
    """GroveMoE, transcribed: sel = top-k(sigmoid(z)); w = softmax(z)[sel] / sum."""
    z = d.logits().astype(np.float64)
    sel = np.argsort(-1.0 / (1.0 + np.exp(-z)), axis=-1, kind="stable")[:, : case.k]
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    w = np.take_along_axis(p, sel, -1)
    return sel, w / w.sum(-1, keepdims=True)


REFERENCES = {"transformers": run_transformers, "mlx-lm": run_mlx_lm, "numpy": run_grove_numpy}
OURS = {"torch": ours_torch, "mlx": ours_mlx}


# -- against the references ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", OURS)
@pytest.mark.parametrize("tokens", SIZES)
@pytest.mark.parametrize("case, reference", WITH_REFERENCE)
def test_route_matches_reference(case, reference, tokens, backend):
    d = make_data(case, tokens)
    want = REFERENCES[reference](case, d)
    assert_same_routing(OURS[backend](case, d), want, f"{case.id}: {backend} vs {reference}")


@pytest.mark.parametrize("case, reference", WITH_REFERENCE)
def test_wrong_rule_is_told_apart(case, reference):
    """Every near-miss rule gives a routing the reference rejects, so the comparison above can fail."""
    assert case.wrong, f"{case.id} has no near-miss rule"
    d = make_data(case)
    want = REFERENCES[reference](case, d)
    for wrong in case.wrong:
        assert not same_routing(ours_torch(case, d, wrong), want), f"{case.id}: {wrong} passes as {reference}"


@pytest.mark.parametrize("tokens", SIZES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_torch_and_mlx_agree(case, tokens):
    mx = pytest.importorskip("mlx.core")
    from moe_local.backends.mlx import router as mlx_router

    d = make_data(case, tokens)
    z = d.logits()
    t = torch_router.route(
        torch.from_numpy(z), case.rule, case.k, None if d.selection_bias is None else torch.from_numpy(d.selection_bias)
    )
    m = mlx_router.route(
        mx.array(z), case.rule, case.k, None if d.selection_bias is None else mx.array(d.selection_bias)
    )
    assert_same_routing((t[0].numpy(), t[1].numpy()), (np.array(m[0]), np.array(m[1])), f"{case.id}: torch vs mlx")


def test_mixtral_orders_are_one_function():
    """Mixtral's two libraries use the two orders; each rule must match both (to ~1e-6)."""
    score_topk, topk_score = (c for c in CASES if c.family == "mixtral")
    d = make_data(score_topk)
    refs = [run_transformers(score_topk, d), run_mlx_lm(score_topk, d)]
    for rule in (score_topk.rule, topk_score.rule):
        for backend, ours in OURS.items():
            got = ours(score_topk, d, rule)
            for ref in refs:
                assert assert_same_routing(got, ref, f"mixtral {rule.order} on {backend}") < 1e-6


def test_router_logits_match_transformers():
    """moe_local's Router (weight + bias) computes the logits transformers' routers do."""
    for case in CASES:
        if "transformers" not in case.references:
            continue
        d = make_data(case)
        with torch.no_grad():
            want = transformers_router(case, d)(torch.from_numpy(d.x))[0]
            got = torch_router_module(case, d, case.rule)(torch.from_numpy(d.x))
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=f"{case.id}: router logits differ")
    gpt = next(c for c in CASES if c.family == "gpt_oss")
    d = make_data(gpt)
    with torch.no_grad():
        without_bias = torch_router_module(gpt, d, RouterSpec(order="topk-score"))(torch.from_numpy(d.x))
        with_bias = torch_router_module(gpt, d, gpt.rule)(torch.from_numpy(d.x))
    torch.testing.assert_close(
        with_bias - without_bias, torch.from_numpy(d.bias).expand_as(with_bias), rtol=RTOL, atol=ATOL
    )


# -- DeepSeek-V3's selection bias and group limit -----------------------------------------------


def chosen_sets(idx) -> list[frozenset]:
    return [frozenset(int(e) for e in row) for row in np.asarray(idx)]


def test_selection_bias_changes_the_choice_not_the_weights():
    case = CASES[CASE_IDS.index("deepseek_v3")]
    d = make_data(case)
    biased = ours_torch(case, d)
    unbiased = ours_torch(case, replace(d, selection_bias=np.zeros_like(d.selection_bias)))
    assert chosen_sets(biased[0]) != chosen_sets(unbiased[0]), "the bias should move some token's experts"
    assert_same_routing(biased, run_transformers(case, d), "deepseek_v3 biased vs transformers")
    # the weights are the unbiased sigmoid scores of the chosen experts
    z = d.logits().astype(np.float64)
    s = np.take_along_axis(1 / (1 + np.exp(-z)), biased[0].astype(np.int64), -1)
    np.testing.assert_allclose(biased[1], case.rule.scaling * s / s.sum(-1, keepdims=True), rtol=RTOL, atol=ATOL)


def test_group_limit_changes_the_choice():
    case = CASES[CASE_IDS.index("deepseek_v3")]
    d = make_data(case)
    limited = ours_torch(case, d)
    free = ours_torch(case, d, replace(case.rule, groups=1, groups_kept=1))
    assert chosen_sets(limited[0]) != chosen_sets(free[0]), "the group limit should move some token's experts"
    # every chosen expert lies in one of the token's best groups (by the sum of the two highest biased scores)
    groups, kept = case.rule.groups, case.rule.groups_kept
    per_group = case.experts // groups
    z = d.logits().astype(np.float64)
    choice = (1 / (1 + np.exp(-z)) + d.selection_bias).reshape(TOKENS, groups, per_group)
    best = np.argsort(-np.sort(choice, -1)[..., -2:].sum(-1), -1)[:, :kept]
    for token, experts in enumerate(chosen_sets(limited[0])):
        assert {e // per_group for e in experts} <= set(best[token].tolist())
    for reference in case.references:
        assert_same_routing(limited, REFERENCES[reference](case, d), f"deepseek_v3 vs {reference}")


@pytest.mark.parametrize("backend", OURS)
def test_negative_selection_bias_keeps_the_group_limit(backend):
    """A constant shift of e_score_correction_bias changes nothing in transformers; here a shift
    that makes the biased scores negative."""
    case = CASES[CASE_IDS.index("deepseek_v3")]
    d = make_data(case)
    shifted = replace(d, selection_bias=d.selection_bias - 2.0)
    want = run_transformers(case, shifted)
    assert_same_routing(want, run_transformers(case, d), "transformers is shift-invariant")
    assert_same_routing(OURS[backend](case, shifted), want, f"deepseek_v3 shifted bias: {backend} vs transformers")


# -- the routing distribution -------------------------------------------------------------------


@pytest.mark.parametrize("backend", OURS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_routing_distribution(case, backend):
    d = make_data(case)
    z = d.logits()
    if backend == "torch":
        dist = torch_router.routing_distribution(torch.from_numpy(z), case.rule).numpy()
    else:
        mx = pytest.importorskip("mlx.core")
        from moe_local.backends.mlx import router as mlx_router

        dist = np.array(mlx_router.routing_distribution(mx.array(z), case.rule))
    z = z.astype(np.float64)
    softmax = np.exp(z - z.max(-1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
    sigmoid = 1 / (1 + np.exp(-z))
    sigmoid /= sigmoid.sum(-1, keepdims=True)  # without DeepSeek's selection bias
    want, other = (softmax, sigmoid) if case.rule.scoring == "softmax" else (sigmoid, softmax)
    assert dist.shape == z.shape and dist.dtype == np.float32
    np.testing.assert_allclose(dist, want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(dist.sum(-1), 1.0, rtol=0, atol=1e-5)
    assert not np.allclose(dist, other, rtol=RTOL, atol=ATOL)


# -- invalid rules ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        dict(order="topk-score", scoring="sigmoid"),
        dict(order="topk-score", selection_bias=True),
        dict(order="topk-score", groups=4, groups_kept=2),
        dict(scoring="relu"),
        dict(order="score-then-topk"),
        dict(selection="bias"),
        dict(groups=4, groups_kept=5),
        dict(groups=4, groups_kept=0),
        dict(groups=0, groups_kept=0),
    ],
    ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()),
)
def test_invalid_rules_are_rejected(fields):
    with pytest.raises(ValueError):
        RouterSpec(**fields)


def test_topk_score_rejects_a_selection():
    with pytest.raises(ValueError):
        RouterSpec(order="topk-score", selection="sigmoid")


def test_valid_rules_are_accepted():
    for c in CASES:
        assert RouterSpec(**{f: getattr(c.rule, f) for f in c.rule.__dataclass_fields__}) == c.rule
