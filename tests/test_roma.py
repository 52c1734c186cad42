"""RoMA: neighbours and weights, the bank, a regulariser that trains, and the prefix-cached step."""

import numpy as np
import pytest
import torch

import moe_local
from moe_local.errors import UserError
from moe_local.families import load_spec
from moe_local.tuning import data, roma, tune
from moe_local.tuning.bank import Bank, check_bank, check_bank_folder, read_bank, write_bank
from moe_local.tuning.prepare import prepare

from helpers import BACKENDS, answerable_records, recorded_routing, reference_scores, unit_rows

# -- neighbours -------------------------------------------------------------------------------


def _circle():
    c = np.sqrt(0.5)
    emb = np.array([[1, 0], [0, 1], [-1, 0], [0, -1], [1, 0], [c, c]], dtype=np.float32)
    correct = np.array([1, 1, 1, 1, 1, 0], dtype=np.uint8)
    return emb, correct


def test_neighbours_exclude_self_and_break_ties_by_lowest_index():
    emb, correct = _circle()
    nb = roma.neighbours(emb, correct, k=3, sigma=0.4)
    # sample 0: its twin 4 at distance 0 (itself excluded), then 1 and 3 tied at d² = 2 -> 1 first
    assert nb.index[0].tolist() == [4, 1, 3]
    assert nb.index[4].tolist() == [0, 1, 3]
    # sample 5 (not successful) is equidistant from 0, 1 and 4: index order
    assert nb.index[5].tolist() == [0, 1, 4]
    # sample 2: 1 and 3 tied (d² = 2), then 0 and 4 tied (d² = 4) -> 0
    assert nb.index[2].tolist() == [1, 3, 0]
    np.testing.assert_allclose(nb.dist2[0], [0, 2, 2], atol=1e-9)
    for i in range(len(emb)):
        assert i not in nb.index[i]


def test_gaussian_weights_exact():
    emb, correct = _circle()
    sigma = 0.4
    nb = roma.neighbours(emb, correct, k=3, sigma=sigma)
    for i in range(len(emb)):
        d2 = ((emb[i].astype(np.float64) - emb[nb.index[i]]) ** 2).sum(1)
        w = np.exp(-d2 / (2 * sigma**2))
        np.testing.assert_allclose(nb.weight[i], w / w.sum(), rtol=1e-6)
    np.testing.assert_allclose(nb.weight[5], [1 / 3] * 3, rtol=1e-6)  # equal distances, equal weights


def test_fewer_successful_samples_than_k():
    emb, _ = _circle()
    correct = np.array([1, 0, 0, 1, 0, 0], dtype=np.uint8)
    nb = roma.neighbours(emb, correct, k=3, sigma=0.4)
    assert nb.index[0].tolist() == [3, -1, -1] and nb.weight[0].tolist() == [1, 0, 0]
    assert nb.index[1].tolist() == [0, 3, -1]
    targets, weights = roma.neighbour_targets(np.zeros((6, 2, 4), np.float32), nb, [0, 1])
    assert targets.shape == (2, 3, 8) and weights[0].tolist() == [1, 0, 0]


def test_no_successful_sample_is_a_one_line_error():
    with pytest.raises(UserError, match="no successful sample for the neighbour search") as e:
        roma.neighbours(unit_rows(5), np.zeros(5, np.uint8), k=3, sigma=0.4)
    assert "\n" not in str(e.value)


def test_candidate_ce_matches_torch():
    scores = torch.tensor([[-1.0, -2.0, -0.5, data.MISSING_SCORE], [-3.0, -1.0, -2.0, -4.0]])
    answers = torch.tensor([2, 0])
    ref = torch.nn.functional.cross_entropy(scores, answers, reduction="none")
    onehot = torch.nn.functional.one_hot(answers, 4).float()
    torch.testing.assert_close(roma.candidate_ce(scores, onehot), ref, rtol=1e-6, atol=1e-7)


def test_manifold_term_formula():
    rng = np.random.default_rng(0)
    r = torch.tensor(rng.random((2, 3, 4)), dtype=torch.float32)
    targets = torch.tensor(rng.random((2, 2, 12)), dtype=torch.float32)
    w = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    got = roma.manifold_term(r, targets, w)
    want = [sum(w[i, j] * ((r[i].reshape(-1) - targets[i, j]) ** 2).sum() for j in range(2)) for i in range(2)]
    torch.testing.assert_close(got, torch.stack(want))


# -- the bank ---------------------------------------------------------------------------------


def test_bank_round_trip_and_checks(tmp_path, olmoe_dir, qwen3_dir):
    spec = load_spec(olmoe_dir)
    layers = spec.last_moe_layers(2)
    bank = Bank(
        np.array([1, 0, 1], np.uint8),
        np.random.default_rng(0).random((3, 2, 8), np.float32),
        unit_rows(3),
        {"fingerprint": spec.fingerprint(layers), "layers": list(layers), "data_sha256": "abc"},
    )
    write_bank(tmp_path / "bank", bank)
    back = read_bank(tmp_path / "bank")
    assert back.correct.dtype == np.uint8 and back.routing.dtype == np.float32 and back.embeddings.dtype == np.float32
    assert back.routing.shape == (3, 2, 8)
    np.testing.assert_array_equal(back.routing, bank.routing)
    check_bank(back, spec, layers, "abc", "b")
    with pytest.raises(UserError, match="other data"):
        check_bank(back, spec, layers, "xyz", "b")
    other = load_spec(qwen3_dir)
    with pytest.raises(UserError, match="another model"):
        check_bank(back, other, other.moe_layers, "abc", "b")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="not a routing bank"):
        write_bank(tmp_path / "mine", bank)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    with pytest.raises(UserError, match="pass --overwrite"):  # what `moe-local prepare` checks first
        check_bank_folder(tmp_path / "bank", overwrite=False)
    check_bank_folder(tmp_path / "bank", overwrite=True)
    with pytest.raises(UserError, match="is a file"):
        check_bank_folder(tmp_path / "mine" / "notes.txt")


# -- the regulariser trains -------------------------------------------------------------------


def _setup(folder, n=16, seed=0, backend="torch"):
    m = moe_local.load(str(folder), backend=backend)
    return m, answerable_records(m, n, seed), unit_rows(n, seed=seed)


def _mean_manifold(m, records, bank, layers, weights=None, k=3, sigma=0.4):
    """Σ_i Σ_j W_ij ||r_i - r_j||² / N with r_i from the given gate weights (None = the model's)."""
    nb = roma.neighbours(bank.embeddings, bank.correct, k, sigma)
    enc = data.encode_records(m.tokenizer, records)
    total = 0.0
    for batch in data.batches(enc, np.arange(len(records)), 8):
        _, routing = m.suffix_scores(
            m.prefix_hidden(batch, layers[0]), batch, layers[0], layers, router_weights=weights
        )
        targets, w = roma.neighbour_targets(bank.routing, nb, batch.index)
        total += roma.manifold_term(torch.tensor(routing), torch.tensor(targets), torch.tensor(w)).sum().item()
    return total / len(records)


def _bank_with_successes(m, records, emb, layers):
    bank = prepare(m, records, emb, layers, progress="off")
    assert bank.correct[::2].all()  # answerable() made every other sample the model's own answer
    return bank


@pytest.mark.parametrize("backend", BACKENDS)
def test_manifold_term_has_a_gradient_on_the_routers(backend, olmoe_dir):
    m, records, emb = _setup(olmoe_dir, n=8, backend=backend)
    layers = m.spec.last_moe_layers(2)
    bank = _bank_with_successes(m, records, emb, layers)
    nb = roma.neighbours(bank.embeddings, bank.correct, 3, 0.4)
    batch = data.make_batch(data.encode_records(m.tokenizer, records), np.arange(8))
    targets, w = roma.neighbour_targets(bank.routing, nb, batch.index)
    gates = {int(k.split(".")[2]): v for k, v in m.get_router_weights(layers).items()}

    def manifold_only(scores, routing, onehot, targets, weights):
        loss, ce, man = roma.roma_loss(
            scores, routing, onehot, targets, weights, lam=1.0, ce_weight=0.0, global_batch=8
        )
        return loss, {"manifold": man}

    hidden = m.prefix_hidden(batch, layers[0])
    _, aux, grads = m.suffix_value_and_grad(
        hidden,
        batch,
        layers[0],
        layers,
        manifold_only,
        {"onehot": batch.answer_onehot(), "targets": targets, "weights": w},
        router_weights=gates,
    )
    assert aux["manifold"].sum() > 0
    for layer in layers:
        assert np.isfinite(grads[layer]).all() and np.abs(grads[layer]).max() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_manifold_only_steps_reduce_the_manifold_term(backend, olmoe_dir, tmp_path):
    m, records, emb = _setup(olmoe_dir, n=16, backend=backend)
    layers = m.spec.last_moe_layers(2)
    bank = _bank_with_successes(m, records, emb, layers)
    settings = tune.TuneSettings(
        layers=2, lam=1.0, ce_weight=0.0, lr=1e-3, epochs=10, batch_size=16, lam_warmup=0, log_every=1
    )
    result = tune.tune(m, records, None, settings, tmp_path / "A", bank=bank, progress="off")
    before = _mean_manifold(m, records, bank, layers)
    after = _mean_manifold(
        m, records, bank, layers, {i: result.weights[f"model.layers.{i}.mlp.gate.weight"] for i in layers}
    )
    assert after < 0.9 * before, (before, after)
    assert result.metrics[-1]["manifold"] < result.metrics[0]["manifold"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_lambda_zero_roma_equals_router(backend, olmoe_dir, tmp_path):
    m, records, emb = _setup(olmoe_dir, n=12, backend=backend)
    common = dict(layers=2, lr=1e-2, epochs=2, batch_size=8, lam_warmup=0)
    a = tune.tune(m, records, emb, tune.TuneSettings(method="roma", lam=0.0, **common), tmp_path / "a", progress="off")
    b = tune.tune(m, records, emb, tune.TuneSettings(method="router", **common), tmp_path / "b", progress="off")
    for name in a.weights:
        assert not np.array_equal(a.weights[name], m.get_router_weights()[name])  # it trained
        np.testing.assert_array_equal(a.weights[name], b.weights[name])
    assert [r["loss"] for r in a.metrics] == [r["loss"] for r in b.metrics]


# -- the prefix-cached step equals a full-model step ------------------------------------------


def _full_model_step(m, batch, layers, weights, targets, w, lam):
    """Reference: transformers' whole forward pass with the tuned gates made fp32 leaf parameters,
    routing read from the gates during the call, scores computed from the full logits."""
    from moe_local.backends.torch.model import positions_from_mask

    saved, params = {}, {}
    for i in layers:
        gate = m.moe_block(i).gate
        saved[i] = gate.weight
        params[i] = torch.nn.Parameter(torch.tensor(weights[i]))
        gate.weight = params[i]
    try:
        with recorded_routing(m, layers) as captured:
            ids, mask = torch.tensor(batch.ids), torch.tensor(batch.mask)
            logits = m.model(
                input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False
            ).logits.float()
        scores = reference_scores(batch, torch.log_softmax(logits, -1), torch.stack, torch.tensor)
        seq, T = batch.sample_seq, batch.ids.shape[1]
        routing = torch.stack([captured[i][0][seq * T + batch.prompt_pos[seq]] for i in layers], 1)
        loss, _, _ = roma.roma_loss(
            scores,
            routing,
            torch.tensor(batch.answer_onehot()),
            torch.tensor(targets),
            torch.tensor(w),
            lam,
            1.0,
            batch.size,
        )
        loss.backward()
        return loss.item(), {i: params[i].grad.numpy() for i in layers}
    finally:
        for i in layers:
            m.moe_block(i).gate.weight = saved[i]


@pytest.mark.parametrize("fixture", ["qwen3_dir", "olmoe_dir", "grove_dir"])
def test_prefix_cached_step_equals_full_model_step(fixture, request):
    m, records, emb = _setup(request.getfixturevalue(fixture), n=6, seed=3)
    records[3] = data.Record(
        "Which is larger, 7 or 9? Think about it.", ("7", "9"), 1, None, 4
    )  # fewer choices, longer
    layers = m.spec.last_moe_layers(2)
    bank = _bank_with_successes(m, records, emb, layers)
    nb = roma.neighbours(bank.embeddings, bank.correct, 3, 0.4)
    batch = data.make_batch(data.encode_records(m.tokenizer, records), np.arange(len(records)))
    targets, w = roma.neighbour_targets(bank.routing, nb, batch.index)
    rng = np.random.default_rng(0)
    weights = {
        i: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32)
        for i, v in zip(layers, m.get_router_weights(layers).values())
    }
    ref_loss, ref_grads = _full_model_step(m, batch, layers, weights, targets, w, lam=0.8)

    # the cache is built in a different batch layout (one sample per batch) than the step uses
    cache = {}
    for single in data.batches(data.encode_records(m.tokenizer, records), np.arange(len(records)), 1):
        cache[int(single.index[0])] = m.prefix_hidden(single, layers[0])
    hidden = [h for i in range(len(records)) for h in cache[i]]

    def loss_fn(s, r, onehot, targets, weights):
        return tune._step_loss(s, r, onehot, targets, weights, lam=0.8, ce_weight=1.0, global_batch=batch.size)

    loss, _, grads = m.suffix_value_and_grad(
        hidden,
        batch,
        layers[0],
        layers,
        loss_fn,
        {"onehot": batch.answer_onehot(), "targets": targets, "weights": w},
        router_weights=weights,
    )
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for i in layers:
        assert np.abs(ref_grads[i]).max() > 0
        np.testing.assert_allclose(grads[i], ref_grads[i], atol=1e-5 * np.abs(ref_grads[i]).max(), rtol=1e-4)
