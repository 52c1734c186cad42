"""Qwen3-Next on both backends, where it differs from the families test_families.py covers: hybrid layers
(gated DeltaNet linear attention beside full attention) whose recurrent state cannot be cut back, so a
conversation's cache is reused when the new prompt extends it and rebuilt otherwise; the tuned suffix
starting on a linear-attention layer with left padding, against transformers' whole model; the
multi-token-prediction head carried through ``fuse`` byte for byte; the layer pattern mlx-lm can build.
Logits, generation, adapters, fuse and the CLI run in test_families.py (variants ``qwen3_next*``)."""

import json
import shutil

import numpy as np
import pytest
import torch

import moe_local
from moe_local.chat import eos_token_ids

import checkpoints
from helpers import BACKENDS, hf_reference, library_greedy, make_adapter, rel, run_main, unit_rows

LONG = np.array([3, 17, 42, 5, 99, 64, 12, 7, 120, 33])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return checkpoints.make_qwen3_next(tmp_path_factory.mktemp("qwen3_next") / "q", seed=4)


@pytest.fixture(scope="module")
def with_mtp(folder, tmp_path_factory):
    """The folder plus a multi-token-prediction head as the release stores it (``mtp.*``), which no
    library runs: transformers and mlx-lm drop it at load."""
    from safetensors.torch import load_file, save_file

    out = shutil.copytree(folder, tmp_path_factory.mktemp("mtp") / "q")
    state = load_file(str(out / "model.safetensors"))
    g = torch.Generator().manual_seed(9)
    state["mtp.fc.weight"] = torch.randn(64, 128, generator=g)
    state["mtp.norm.weight"] = torch.randn(64, generator=g)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_conversation_reuses_the_recurrent_cache_when_the_prompt_extends_it(backend, folder):
    """Turn two extends turn one: prefilled from the cache's end (nothing cut from a recurrent state).
    A third prompt that leaves what the cache holds: the cache is rebuilt, never trimmed. Every answer
    is the library's own greedy answer from scratch."""
    m = moe_local.load(str(folder), backend=backend)
    eos = eos_token_ids(m)
    conversation = m.chat(max_tokens=5)
    first = [int(i) for i in LONG[:6]]
    "".join(conversation.complete(first))
    assert conversation.answer_ids == library_greedy(backend, folder, None, first, eos, 5)
    held = list(conversation.tokens)
    assert len(held) >= len(first)
    second = held + [11, 13]
    "".join(conversation.complete(second))
    assert conversation.stats.cached_tokens == len(held)
    assert conversation.answer_ids == library_greedy(backend, folder, None, second, eos, 5)
    third = first[:3] + [21, 22, 23]
    "".join(conversation.complete(third))
    assert conversation.stats.cached_tokens == 0  # a recurrent state cannot go back to 3 tokens
    assert conversation.answer_ids == library_greedy(backend, folder, None, third, eos, 5)


def _transformers_step(folder, batch, layers, routers, inputs):
    """The loss's gradients in transformers' own whole model (left-padded, its own masks for linear
    attention): the tuned routers made float32 leaf parameters, the routing read from their logits."""
    from moe_local.backends.torch.model import positions_from_mask
    from moe_local.tuning import roma

    from helpers import reference_scores

    model = hf_reference(folder)
    params, logits_of = {}, {}
    for i in layers:
        gate = model.model.layers[i].mlp.gate
        gate.weight = torch.nn.Parameter(torch.tensor(routers[i]))
        params[i] = gate.weight
        gate.register_forward_hook(lambda mod, args, out, i=i: logits_of.__setitem__(i, out[0]))
    ids, mask = torch.tensor(batch.ids), torch.tensor(batch.mask)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits.float()
    scores = reference_scores(batch, torch.log_softmax(logits, -1), torch.stack, torch.tensor)
    seq, T = batch.sample_seq, batch.ids.shape[1]
    rows = seq * T + batch.prompt_pos[seq]
    routing = torch.stack([torch.softmax(logits_of[i][rows].float(), -1) for i in layers], 1)
    args = {k: torch.tensor(v) for k, v in inputs.items()}
    loss, _, _ = roma.roma_loss(scores, routing, args["onehot"], args["targets"], args["weights"], 0.8, 1.0, batch.size)
    loss.backward()
    return loss.item(), {i: p.grad.numpy() for i, p in params.items()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_tuned_suffix_runs_linear_attention_with_left_padding(backend, folder):
    """Two tuned layers: the prefix cache ends below layer 2, a linear-attention layer, so the suffix
    starts on a recurrent layer and runs left-padded rows of different lengths. Its loss and router
    gradients equal transformers' whole-model autograd."""
    from moe_local.tuning import data, roma
    from moe_local.tuning.prepare import prepare

    from helpers import answerable_records

    m = moe_local.load(str(folder), backend=backend)
    records = answerable_records(m, 6, seed=3)
    layers = m.spec.last_moe_layers(2)
    assert m.spec.layer_type(layers[0]) == "linear_attention"
    bank = prepare(m, records, unit_rows(6), layers, progress="off")
    batch = data.make_batch(data.encode_records(m.tokenizer, records), np.arange(6))
    assert len(set(batch.lengths.tolist())) > 1  # rows of different lengths: left padding in the batch
    targets, w = roma.neighbour_targets(
        bank.routing, roma.neighbours(bank.embeddings, bank.correct, 3, 0.4), batch.index
    )
    inputs = {"onehot": batch.answer_onehot(), "targets": targets, "weights": w}
    rng = np.random.default_rng(0)
    base = m.get_router_weights(layers)
    routers = {
        i: base[m.spec.names.router_weight(i)] + 0.05 * rng.standard_normal(base[m.spec.names.router_weight(i)].shape)
        for i in layers
    }
    routers = {i: r.astype(np.float32) for i, r in routers.items()}

    def loss_fn(scores, routing, onehot, targets, weights):
        loss, _, _ = roma.roma_loss(scores, routing, onehot, targets, weights, 0.8, 1.0, batch.size)
        return loss, {}

    hidden = m.prefix_hidden(batch, layers[0])
    loss, _, grads = m.suffix_value_and_grad(hidden, batch, layers[0], layers, loss_fn, inputs, router_weights=routers)
    ref_loss, ref_grads = _transformers_step(folder, batch, layers, routers, inputs)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for i in layers:
        assert np.abs(ref_grads[i]).max() > 0
        np.testing.assert_allclose(grads[i], ref_grads[i], atol=2e-5 * np.abs(ref_grads[i]).max(), rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuse_carries_the_mtp_head_and_writes_what_transformers_reads(backend, with_mtp, tmp_path):
    """Fused on either backend: every tensor but the tuned routers is the source's byte for byte (the
    MTP head, and on MLX the norms and convolutions mlx-lm's sanitize rewrites), and transformers' own
    model of the folder gives the tuned logits."""
    from safetensors.numpy import load_file

    adapter = make_adapter(with_mtp, tmp_path / "adapter", layers=2, scale=2.0)
    tuned_model = moe_local.load(str(with_mtp), backend=backend, adapter_path=adapter)
    tuned_model.save(tmp_path / "fused")
    before, after = (
        load_file(str(with_mtp / "model.safetensors")),
        load_file(str(tmp_path / "fused" / "model.safetensors")),
    )
    routers = load_file(str(adapter / "adapters.safetensors"))
    assert set(after) == set(before) and "mtp.fc.weight" in after
    for name in before:
        np.testing.assert_array_equal(after[name], routers.get(name, before[name]), err_msg=name)
    tuned = moe_local.load(str(with_mtp), backend="torch", adapter_path=adapter).logits(LONG)[0]
    with torch.no_grad():
        theirs = hf_reference(tmp_path / "fused")(torch.tensor(LONG[None])).logits[0].numpy()
    assert rel(theirs, tuned) <= 1e-5
    assert rel(tuned_model.logits(LONG)[0], tuned) <= 1e-5


def test_info_names_the_layer_kinds(folder, capsys):
    code, out, _ = run_main(capsys, "info", "--model", folder)
    assert code == 0
    assert "1 full attention: 3; 3 linear attention (a recurrent state, no KV cache): 0-2" in out
    assert "gated by sigmoid(shared_expert_gate(x))" in out


@pytest.mark.parametrize(
    "change, message",
    [
        ({"layer_types": ["linear_attention"] * 4}, "must hold a full-attention layer"),
        (
            {"layer_types": ["linear_attention", "full_attention", "linear_attention", "linear_attention"]},
            "a full-attention layer every 2 layers",
        ),
        ({"layer_types": None, "full_attention_interval": 0}, "'full_attention_interval' must be at least 1"),
        ({"linear_num_value_heads": 3}, "not a multiple of 'linear_num_key_heads'"),
    ],
)
def test_bad_configs_are_one_line_errors(change, message, folder, tmp_path, capsys):
    bad = shutil.copytree(folder, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config.update(change)
    (bad / "config.json").write_text(json.dumps(config))
    code, _, err = run_main(capsys, "info", "--model", bad)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
