"""C3PO (``eval --c3po``): the kernel-regression re-mix against a direct numpy computation, and the
candidate scores against transformers' own model routed by that re-mix at the last prompt token."""

import json

import numpy as np
import pytest
import torch

import moe_local
from moe_local.errors import UserError
from moe_local.tuning import data
from moe_local.tuning.c3po import C3PO
from moe_local.tuning.evaluate import evaluate
from moe_local.tuning.prepare import prepare
from moe_local.tuning.tasks import Prompting

import checkpoints
from helpers import run_cli, task_records, unit_rows

SUITE = "moe_local/assets/suite"


def numpy_targets(bank, queries, k, sigma):
    """r̂ = Σ_j w_j r_j over each query's k nearest successful bank rows, w = softmax(-d²/2σ²)."""
    success = np.flatnonzero(bank.correct)
    out = []
    for q in queries.astype(np.float64):
        d2 = ((bank.embeddings[success].astype(np.float64) - q) ** 2).sum(1)
        near = np.argsort(d2, kind="stable")[:k]
        w = np.exp(-(d2[near] - d2[near].min()) / (2 * sigma**2))
        out.append(((w / w.sum())[:, None, None] * bank.routing[success[near]]).sum(0))
    return np.array(out)


class Forced(torch.nn.Module):
    """transformers' router (Qwen3-MoE, OLMoE, Mixtral: ``(logits, weights, experts)``) with one token's
    routing imposed: r' = (1-α) r + α r̂ from its own distribution r there, then the top-k of r' with their
    weights renormalised where the router renormalises (Mixtral always); every other token routed by the
    gate itself. ``seen`` keeps the r' of each call."""

    def __init__(self, gate, row: int, target: np.ndarray, alpha: float, seen: list):
        super().__init__()
        self.gate, self.row, self.alpha, self.seen = gate, row, alpha, seen
        self.target = torch.from_numpy(np.asarray(target, np.float32))

    def forward(self, h):
        logits, weights, index = self.gate(h)
        mixed = (1 - self.alpha) * torch.softmax(logits[self.row].float(), -1) + self.alpha * self.target
        top, chosen = torch.topk(mixed, self.gate.top_k)
        if getattr(self.gate, "norm_topk_prob", True):
            top = top / top.sum()
        weights, index = weights.clone(), index.clone()
        weights[self.row], index[self.row] = top.to(weights.dtype), chosen
        self.seen.append(mixed)
        return logits, weights, index


def hf_routed(hf, tokenizer, record, layers, target, alpha, format):
    """(candidate scores, r' [layers, E]) of ``record`` — lm-eval's way: one sequence per request, its
    continuation's summed log-probs — by transformers' model re-mixed toward ``target`` at the last
    context token."""
    blocks = [hf.model.layers[i].mlp for i in layers]
    gates = [b.gate for b in blocks]
    seen = [[] for _ in layers]
    out = []
    try:
        for context, continuation in data.requests(record, format)[0]:
            trimmed = context.rstrip()  # lm-eval: the context's trailing space starts the continuation
            continuation = context[len(trimmed) :] + continuation
            ctx = tokenizer(trimmed, add_special_tokens=False)["input_ids"]
            whole = tokenizer(trimmed + continuation, add_special_tokens=False)["input_ids"]
            for b, g, t, s in zip(blocks, gates, target, seen):
                b.gate = Forced(g, len(ctx) - 1, t, alpha, s)
            with torch.no_grad():
                logp = torch.log_softmax(hf(torch.tensor([whole])).logits[0].float(), -1)
            out.append(sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
    finally:
        for b, g in zip(blocks, gates):
            b.gate = g
    return out, np.stack([s[0].numpy() for s in seen])


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    return checkpoints.make_mixtral(tmp_path_factory.mktemp("mixtral"))


# (model fixture, α, format): renormalised top-k (qwen3, dense layers between), plain top-k (olmoe), top-k
# then softmax (mixtral); α = 0.3 tells (1-α) r + α r̂ from α r + (1-α) r̂; rc: a sequence per choice.
CASES = [("qwen3_dir", 1.0, "mc"), ("qwen3_dir", 0.3, "mc"), ("olmoe_dir", 0.3, "mc"), ("mixtral_dir", 0.3, "mc")]
CASES += [("qwen3_dir", 0.3, "rc")]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize("fixture, alpha, format", CASES)
def test_c3po_matches_numpy_remix_and_transformers_routed_by_it(request, fixture, alpha, format, backend):
    from transformers import AutoModelForCausalLM

    folder = request.getfixturevalue(fixture)
    m = moe_local.load(str(folder), backend=backend)
    layers = tuple(m.spec.moe_layers[-2:])
    prompting = Prompting(format=format)
    reference = [data.parse_record(r, "ref", i + 1) for i, r in enumerate(task_records(40, seed=3))]
    bank = prepare(m, reference, unit_rows(40, seed=3), layers, progress="off", prompting=prompting)
    assert 0 < bank.correct.sum() < len(reference)  # neighbours are chosen among the successful only
    records = [data.parse_record(r, "t", i + 1) for i, r in enumerate(task_records(4, seed=4))]
    emb = unit_rows(4, seed=4)
    c3po = C3PO(bank, emb, k=3, sigma=0.5, alpha=alpha)
    result = evaluate(m, records, layers, batch_size=2, c3po=c3po, progress="off", prompting=prompting)

    hf = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
    targets = numpy_targets(bank, emb, 3, 0.5)
    np.testing.assert_allclose(c3po.targets(np.arange(len(records))), targets, atol=1e-6)
    for b, r in enumerate(records):
        want, remixed = hf_routed(hf, m.tokenizer, r, layers, targets[b], alpha, format)
        np.testing.assert_allclose(result.c3po_routing[b], remixed, atol=2e-6)
        np.testing.assert_allclose(result.c3po_scores[b, : len(r.choices)], want, atol=1e-4)
    if alpha == 1.0:
        np.testing.assert_allclose(result.c3po_routing, targets, atol=2e-6)
    # the re-mix changed the routing and, through it, the scores
    assert not np.allclose(result.c3po_scores, result.scores, atol=1e-3)
    assert result.c3po_seconds_per_sample > 0


def test_c3po_settings_and_dimensions_are_checked():
    from moe_local.tuning.bank import Bank

    bank = Bank(np.ones(2, np.uint8), np.full((2, 1, 4), 0.25, np.float32), unit_rows(2, 4), {})
    with pytest.raises(UserError, match="dimensions"):
        C3PO(bank, unit_rows(3, 8))
    with pytest.raises(UserError, match="alpha"):
        C3PO(bank, unit_rows(3, 4), alpha=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_eval_c3po_cli_writes_its_row(tmp_path, backend):
    bank = tmp_path / "bank"
    prep = run_cli(
        "prepare", "--model", "tiny", "--backend", backend, "--data", f"{SUITE}/train.jsonl", "--limit", "200",
        "--layers", "2", "--bank", bank,
    )  # fmt: skip
    assert prep.returncode == 0, prep.stderr
    report = tmp_path / "report.json"
    args = ["eval", "--model", "tiny", "--backend", backend, "--data", f"{SUITE}/test_unseen.jsonl", "--limit", "24"]
    out = run_cli(*args, "--c3po", "--bank", bank, "--report", report)
    assert out.returncode == 0, out.stderr
    assert "c3po: accuracy" in out.stdout and "ms per sample" in out.stdout
    base, c3po = json.loads(report.read_text())
    assert (base["method"], c3po["method"]) == ("base", "c3po")
    assert c3po["n"] == 24 and c3po["seconds_per_sample"] > 0 and c3po["base_seconds_per_sample"] > 0
    assert set(base) | {"seconds_per_sample", "base_seconds_per_sample"} == set(c3po)


def test_eval_c3po_refusals(tmp_path):
    eval_args = ["eval", "--model", "tiny", "--data", f"{SUITE}/test_unseen.jsonl", "--limit", "8"]
    alone = run_cli(*eval_args, "--c3po")
    assert alone.returncode == 2 and "--c3po and --bank go together" in alone.stderr
    assert len(alone.stderr.strip().splitlines()) == 1
    # a bank made for another model
    other = checkpoints.make_mixtral(tmp_path / "mixtral")
    bank = tmp_path / "bank"
    prep = run_cli(
        "prepare", "--model", other, "--data", f"{SUITE}/train.jsonl", "--limit", "16", "--layers", "1",
        "--bank", bank, "--embeddings", f"{SUITE}/train.npy",
    )  # fmt: skip
    assert prep.returncode == 0, prep.stderr
    foreign = run_cli(*eval_args, "--c3po", "--bank", bank)
    assert foreign.returncode == 2 and "made for another model" in foreign.stderr
    # sigmoid-scored routers: no routing C3PO could impose
    sigmoid = checkpoints.make_deepseek_v3(tmp_path / "v3")
    bank = tmp_path / "bank_v3"
    prep = run_cli(
        "prepare", "--model", sigmoid, "--data", f"{SUITE}/train.jsonl", "--limit", "16", "--layers", "1",
        "--bank", bank,
    )  # fmt: skip
    assert prep.returncode == 0, prep.stderr
    refused = run_cli(
        "eval", "--model", sigmoid, "--data", f"{SUITE}/test_unseen.jsonl", "--limit", "8", "--c3po", "--bank", bank
    )
    assert refused.returncode == 2 and "softmax routers" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_eval_c3po_inputs_that_do_not_fit_the_bank(tmp_path):
    from moe_local.checkpoint import BUILTIN_MODELS

    from helpers import make_adapter

    bank, rc_bank = tmp_path / "bank", tmp_path / "rc_bank"
    train = ("--model", "tiny", "--data", f"{SUITE}/train.jsonl", "--limit", "16", "--layers", "2")
    assert run_cli("prepare", *train, "--bank", bank).returncode == 0
    assert run_cli("prepare", *train, "--bank", rc_bank, "--format", "rc").returncode == 0
    eval_args = ["eval", "--model", "tiny", "--data", f"{SUITE}/test_unseen.jsonl", "--limit", "8", "--c3po"]

    def refused(*args, message):
        out = run_cli(*eval_args, *args)
        assert out.returncode == 2 and message in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1

    refused("--bank", rc_bank, message="recorded with rc prompts")
    wide = tmp_path / "wide.npy"
    np.save(wide, unit_rows(8, d=16))
    refused("--bank", bank, "--embeddings", wide, message="dimensions")
    adapter = make_adapter(BUILTIN_MODELS["tiny"], tmp_path / "adapter", layers=1)
    refused("--bank", bank, "--adapter-path", adapter, message="C3PO re-mixes the layers the adapter tunes")


def test_a_bank_with_no_successful_sample_is_refused():
    from moe_local.tuning.bank import Bank

    bank = Bank(np.zeros(2, np.uint8), np.full((2, 1, 4), 0.25, np.float32), unit_rows(2, 4), {})
    with pytest.raises(UserError, match="no sample the base model answers correctly"):
        C3PO(bank, unit_rows(3, 4))
