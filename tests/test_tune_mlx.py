"""RoMA on the MLX backend: its step against mlx-lm's whole forward pass and against the torch backend,
router adapters across backends (float and mlx-lm-quantized models), and the tune loop on MLX."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlx_lm")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx_lm.convert import convert  # noqa: E402
from mlx_lm.models.switch_layers import QuantizedSwitchLinear  # noqa: E402
from mlx_lm.utils import load_model  # noqa: E402

import moe_local  # noqa: E402
from moe_local.tuning import data, roma, tune  # noqa: E402
from moe_local.tuning import folder as tune_folder  # noqa: E402
from moe_local.tuning.adapter import read_adapter  # noqa: E402
from moe_local.tuning.prepare import prepare  # noqa: E402

import checkpoints  # noqa: E402
from helpers import answerable_records, recorded_routing, reference_scores, rel, unit_rows  # noqa: E402

SMALL = dict(layers=2, lr=1e-2, batch_size=4, lam_warmup=3, log_every=1)
IDS = np.random.default_rng(2).integers(0, 128, (2, 12))
MASK = np.concatenate([np.zeros((1, 12), np.int64), np.ones((1, 12), np.int64)])
MASK[0, 4:] = 1  # row 0 left-padded by 4


def _step_inputs(m, n=6, seed=3):
    """A batch with a shorter sample of fewer choices (padding, MISSING_SCORE), its neighbour targets,
    and gate weights moved off the model's own."""
    records = answerable_records(m, n, seed)
    records[3] = data.Record("Which is larger, 7 or 9? Think about it.", ("7", "9"), 1, None, 4)
    layers = m.spec.last_moe_layers(2)
    bank = prepare(m, records, unit_rows(n, seed=seed), layers, progress="off")
    nb = roma.neighbours(bank.embeddings, bank.correct, 3, 0.4)
    batch = data.make_batch(data.encode_records(m.tokenizer, records), np.arange(n))
    assert batch.mask.min() == 0  # some rows are padded
    targets, w = roma.neighbour_targets(bank.routing, nb, batch.index)
    rng = np.random.default_rng(0)
    weights = {
        i: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32)
        for i, v in zip(layers, m.get_router_weights(layers).values())
    }
    return records, layers, batch, targets, w, weights


def _suffix_step(m, batch, layers, weights, targets, w, start):
    def loss_fn(scores, routing, onehot, targets, weights):
        return tune._step_loss(
            scores, routing, onehot, targets, weights, lam=0.8, ce_weight=1.0, global_batch=batch.size
        )

    loss, _, grads = m.suffix_value_and_grad(
        m.prefix_hidden(batch, start),
        batch,
        start,
        layers,
        loss_fn,
        {"onehot": batch.answer_onehot(), "targets": targets, "weights": w},
        router_weights=weights,
    )
    return loss, grads


def _mlx_full_model_step(m, batch, layers, weights, targets, w, lam=0.8):
    """Reference: the whole mlx-lm model call (``MLXModel.logits``'s path: BatchKVCache for left padding)
    differentiated by ``mx.value_and_grad``, the tuned gates float ``nn.Linear`` layers holding the given
    weights, routing read from the gates during the call, scores from the full logits."""
    saved = {i: m.moe_block(i).gate for i in layers}

    def loss(gates):
        for i in layers:
            linear = nn.Linear(m.spec.hidden_size, gates[i].shape[0], bias=False)
            linear.weight = gates[i]
            m.moe_block(i).gate = linear
        with recorded_routing(m, layers) as captured:
            ids, caches = m.as_batch(batch.ids, batch.mask)
            logp = nn.log_softmax(m.model(ids, cache=caches).astype(mx.float32), axis=-1)
        scores = reference_scores(batch, logp, mx.stack, mx.array)
        seq, T = batch.sample_seq, batch.ids.shape[1]
        rows = mx.array((seq * T + batch.prompt_pos[seq]).astype(np.int32))
        routing = mx.stack([captured[i][0][rows] for i in layers], axis=1)
        value, _, _ = roma.roma_loss(
            scores, routing, mx.array(batch.answer_onehot()), mx.array(targets), mx.array(w), lam, 1.0, batch.size
        )
        return value

    try:
        value, grads = mx.value_and_grad(loss)({i: mx.array(weights[i]) for i in layers})
        return value.item(), {i: np.array(grads[i]) for i in layers}
    finally:
        for i in layers:
            m.moe_block(i).gate = saved[i]


def _check_step(loss, grads, ref_loss, ref_grads, layers, rel_tol=1e-4):
    assert loss == pytest.approx(ref_loss, rel=rel_tol)
    for i in layers:
        assert np.abs(ref_grads[i]).max() > 0
        assert rel(grads[i], ref_grads[i]) <= rel_tol, i


# -- the step ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["qwen3_dir", "olmoe_dir", "grove_dir"])
def test_mlx_prefix_cached_step_equals_full_model_and_torch_steps(fixture, request):
    folder = request.getfixturevalue(fixture)
    m = moe_local.load(str(folder), backend="mlx")
    assert not m.model.training  # gradients through gather_mm need no training mode here
    _, layers, batch, targets, w, weights = _step_inputs(m)
    ref_loss, ref_grads = _mlx_full_model_step(m, batch, layers, weights, targets, w)
    cached = _suffix_step(m, batch, layers, weights, targets, w, layers[0])
    _check_step(*cached, ref_loss, ref_grads, layers)
    full = _suffix_step(m, batch, layers, weights, targets, w, 0)  # what --prefix-cache full runs
    _check_step(*full, ref_loss, ref_grads, layers)
    t = moe_local.load(str(folder), backend="torch")
    _check_step(*_suffix_step(t, batch, layers, weights, targets, w, layers[0]), *cached, layers)


def test_mlx_oracle_offsets_gradient_equals_torch(olmoe_dir):
    from moe_local.tuning.evaluate import _ce_loss

    out = []
    for backend in ("mlx", "torch"):
        m = moe_local.load(str(olmoe_dir), backend=backend)
        _, layers, batch, _, _, _ = _step_inputs(m)
        offsets = np.random.default_rng(1).standard_normal((batch.size, 2, 8)).astype(np.float32)
        loss, aux, grad = m.suffix_value_and_grad(
            m.prefix_hidden(batch, layers[0]),
            batch,
            layers[0],
            layers,
            _ce_loss,
            {"onehot": batch.answer_onehot()},
            offsets=offsets,
            wrt="offsets",
        )
        scores, routing = m.suffix_scores(m.prefix_hidden(batch, layers[0]), batch, layers[0], layers, offsets=offsets)
        np.testing.assert_array_equal(scores, aux["scores"])
        out.append((loss, grad, routing))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-5)
    assert np.abs(out[1][1]).max() > 0 and rel(out[0][1], out[1][1]) <= 1e-4
    np.testing.assert_allclose(out[0][2], out[1][2], atol=1e-5)


def test_hidden_host_round_trip_is_exact(olmoe_dir):
    m = moe_local.load(str(olmoe_dir), backend="mlx")
    batch = data.make_batch(data.encode_records(m.tokenizer, answerable_records(m, 2)), np.arange(2))
    for h in m.prefix_hidden(batch, 2):
        host = m.hidden_to_host(h)
        assert host.dtype == np.float32 and host.shape == tuple(h.shape)
        assert mx.array_equal(m.hidden_from_host(host), h).item()
    bf16 = mx.array(np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)).astype(mx.bfloat16)
    m.model.model.norm.weight = m.model.model.norm.weight.astype(mx.bfloat16)  # MLXModel.dtype reads it
    host = m.hidden_to_host(bf16)
    assert host.dtype == np.int16
    back = m.hidden_from_host(host)
    assert back.dtype == mx.bfloat16 and mx.array_equal(back, bf16).item()


# -- adapters across backends -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """An OLMoE float folder, its mlx-lm-quantized copy, and adapters tuned on torch, MLX and quantized MLX."""
    root = tmp_path_factory.mktemp("cross")
    folder = checkpoints.make_olmoe(root / "model", spelling="both")
    quantized = root / "q"
    convert(str(folder), str(quantized), quantize=True, q_group_size=32, q_bits=4)
    settings = tune.TuneSettings(epochs=1, **{**SMALL, "lr": 0.1})
    adapters = {}
    records = answerable_records(moe_local.load(str(folder), backend="mlx"), 8)
    for name, path, backend in (("torch", folder, "torch"), ("mlx", folder, "mlx"), ("mlx-q", quantized, "mlx")):
        m = moe_local.load(str(path), backend=backend)
        tune.tune(m, records, unit_rows(8), settings, root / name, progress="off")
        adapters[name] = root / name
    return folder, quantized, adapters


@pytest.mark.parametrize("adapter", ["torch", "mlx", "mlx-q"])
def test_adapter_gives_the_same_logits_on_both_backends(tuned, adapter):
    folder, _, adapters = tuned
    a = adapters[adapter]
    t = moe_local.load(str(folder), backend="torch", adapter_path=a)
    m = moe_local.load(str(folder), backend="mlx", adapter_path=a)
    base = moe_local.load(str(folder), backend="torch").logits(IDS, MASK)
    ours = t.logits(IDS, MASK)
    assert np.abs(ours - base)[MASK == 1].max() > 1e-3  # the adapter changes the model
    np.testing.assert_allclose(m.logits(IDS, MASK)[MASK == 1], ours[MASK == 1], atol=1e-4)


@pytest.mark.parametrize("adapter", ["torch", "mlx", "mlx-q"])
def test_adapter_on_a_quantized_copy_equals_mlx_lm_with_float_gates(tuned, adapter):
    """mlx-lm cannot take a float gate through --adapter-path on a quantized model (its gate is a
    QuantizedLinear); the reference is mlx-lm's own model with float gates put in by hand."""
    _, quantized, adapters = tuned
    m = moe_local.load(str(quantized), backend="mlx", adapter_path=adapters[adapter])
    assert isinstance(m.moe_block(3).switch_mlp.down_proj, QuantizedSwitchLinear)
    theirs, _ = load_model(Path(quantized))
    base = np.array(theirs(mx.array(IDS)))
    weights, _ = read_adapter(adapters[adapter])
    for name, w in weights.items():
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
        linear.weight = mx.array(w)
        theirs.model.layers[int(name.split(".")[2])].mlp.gate = linear
    expected = np.array(theirs(mx.array(IDS)))
    assert np.abs(expected - base).max() > 1e-3
    np.testing.assert_allclose(m.logits(IDS), expected, atol=1e-4)


def test_quantized_step_equals_full_model_step(tuned):
    """Live fp32 routers through gather_qmm: the prefix-cached step on the quantized copy equals the whole
    quantized model differentiated by mx.value_and_grad."""
    _, quantized, _ = tuned
    m = moe_local.load(str(quantized), backend="mlx")
    assert isinstance(m.moe_block(3).gate, nn.QuantizedLinear)
    _, layers, batch, targets, w, weights = _step_inputs(m)
    ref_loss, ref_grads = _mlx_full_model_step(m, batch, layers, weights, targets, w)
    _check_step(*_suffix_step(m, batch, layers, weights, targets, w, layers[0]), ref_loss, ref_grads, layers)
    assert isinstance(m.moe_block(3).gate, nn.QuantizedLinear)  # the model's own gates are untouched


def test_tune_on_mlx_equals_tune_on_torch(tuned, tmp_path):
    """The whole loop (bank, neighbours, batches, AdamW) on the two backends: the same losses, and the
    same adapter up to float rounding."""
    folder, _, adapters = tuned
    a, _ = read_adapter(adapters["torch"])
    b, _ = read_adapter(adapters["mlx"])
    base = moe_local.load(str(folder), backend="mlx").get_router_weights([2, 3])
    for name in a:
        assert np.abs(a[name] - base[name]).max() > 1e-2
        np.testing.assert_allclose(b[name], a[name], atol=1e-4)
    rows = [[r["loss"] for r in tune_folder.metrics_upto(adapters[n], 10**9)] for n in ("torch", "mlx")]
    np.testing.assert_allclose(rows[1], rows[0], rtol=1e-5)
