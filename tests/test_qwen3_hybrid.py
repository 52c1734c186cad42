"""Qwen3-Next and Qwen3.5-MoE on both backends, where they differ from the families test_families.py
covers: hybrid layers (gated DeltaNet linear attention beside full attention) whose recurrent state
cannot be cut back, so a conversation's cache is reused when the new prompt extends it and rebuilt
otherwise; the tuned suffix starting on a linear-attention layer with left padding, against transformers'
whole model; the tensors no model runs (the MTP head, Qwen3.5's vision tower) carried through ``fuse``
byte for byte; Qwen3.5's text-only folders; the layer pattern mlx-lm can build. Logits, generation,
adapters, fuse and the CLI run in test_families.py (variants ``qwen3_next*``, ``qwen3_5_moe``)."""

import json
import shutil

import numpy as np
import pytest
import torch

import moe_local
from moe_local.chat import eos_token_ids
from moe_local.families import load_spec

import checkpoints
from helpers import BACKENDS, hf_reference, library_greedy, make_adapter, rel, run_main, unit_rows, with_config

LONG = np.array([3, 17, 42, 5, 99, 64, 12, 7, 120, 33])
SHORT = LONG[3:]
FAMILIES = ["qwen3_next", "qwen3_5_moe"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid")
    return {f: checkpoints.FAMILY_MAKERS[f](root / f, seed=4) for f in FAMILIES}


@pytest.fixture(scope="module", params=FAMILIES)
def folder(request, folders):
    return folders[request.param]


@pytest.fixture(scope="module")
def with_mtp(folder, tmp_path_factory):
    """The folder plus a multi-token-prediction head as the releases store it (``mtp.*``), which no
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

    model = hf_reference(folder)  # Qwen3.5's release: transformers' text model of it
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


def _mlx_lm_step(folder, batch, layers, routers, inputs):
    """The same in mlx-lm's own whole model (Qwen3.5's ``qwen3_5_moe``: mlx-lm and transformers differ by
    up to 5e-5 relative on these checkpoints, so each backend is held to its own library), left padding
    as mlx-lm's batched generation pads: its batch caches, one per layer of its own cache's kind."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.cache import ArraysCache, BatchKVCache, make_prompt_cache
    from mlx_lm.utils import load_model

    from moe_local.tuning import roma

    from helpers import reference_scores

    model, _ = load_model(folder)
    blocks = {i: model.language_model.model.layers[i].mlp for i in layers}
    padding = (batch.mask.shape[1] - batch.lengths).tolist()
    seq, T = batch.sample_seq, batch.ids.shape[1]
    rows = mx.array((seq * T + batch.prompt_pos[seq]).astype(np.int32))
    args = {k: mx.array(np.asarray(v)) for k, v in inputs.items()}

    class Recording(nn.Module):
        def __init__(self, weight, sink):
            super().__init__()
            object.__setattr__(self, "_state", (weight, sink))

        def __call__(self, x):
            weight, sink = self._state
            logits = x @ weight.T
            sink.append(mx.softmax(logits.reshape(-1, logits.shape[-1])[rows], axis=-1))
            return logits

    def loss_of(weights):
        sinks = {i: [] for i in layers}
        for i in layers:
            blocks[i].gate = Recording(weights[i], sinks[i])
        caches = [
            ArraysCache(2, left_padding=padding) if isinstance(c, ArraysCache) else BatchKVCache(padding)
            for c in make_prompt_cache(model)
        ]
        logits = model(mx.array(batch.ids.astype(np.int32)), cache=caches).astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        scores = reference_scores(batch, logp, mx.stack, mx.array)
        routing = mx.stack([sinks[i][0] for i in layers], axis=1)
        loss, _, _ = roma.roma_loss(
            scores, routing, args["onehot"], args["targets"], args["weights"], 0.8, 1.0, batch.size
        )
        return loss

    loss, grads = mx.value_and_grad(loss_of)({i: mx.array(r) for i, r in routers.items()})
    return loss.item(), {i: np.array(g) for i, g in grads.items()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_tuned_suffix_runs_linear_attention_with_left_padding(backend, folder):
    """Two tuned layers: the prefix cache ends below layer 2, a linear-attention layer, so the suffix
    starts on a recurrent layer and runs left-padded rows of different lengths. Its loss and router
    gradients equal the library's whole-model autograd (transformers'; on MLX for Qwen3.5, mlx-lm's)."""
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
    mlx_lm_reference = backend == "mlx" and m.spec.family == "qwen3_5_moe"
    ref_loss, ref_grads = (_mlx_lm_step if mlx_lm_reference else _transformers_step)(
        folder, batch, layers, routers, inputs
    )
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for i in layers:
        assert np.abs(ref_grads[i]).max() > 0
        np.testing.assert_allclose(grads[i], ref_grads[i], atol=2e-5 * np.abs(ref_grads[i]).max(), rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuse_carries_the_mtp_head_and_writes_what_transformers_reads(backend, with_mtp, tmp_path):
    """Fused on either backend: every tensor but the tuned routers is the source's byte for byte (the
    MTP head, Qwen3.5's vision tower and fused experts, and on MLX the norms and convolutions mlx-lm's
    sanitize rewrites), and transformers' own model of the folder gives the tuned logits."""
    from safetensors.numpy import load_file

    with_mtp = shutil.copytree(with_mtp, tmp_path / "source")
    processor = '{"image_processor_type": "Qwen2VLImageProcessorFast"}\n'  # a release's, for its vision tower
    (with_mtp / "preprocessor_config.json").write_text(processor)
    adapter = make_adapter(with_mtp, tmp_path / "adapter", layers=2, scale=2.0)
    tuned_model = moe_local.load(str(with_mtp), backend=backend, adapter_path=adapter)
    tuned_model.save(tmp_path / "fused")
    before, after = (
        load_file(str(with_mtp / "model.safetensors")),
        load_file(str(tmp_path / "fused" / "model.safetensors")),
    )
    names = load_spec(with_mtp).names
    routers = {
        names.checkpoint_router(names.layer_of_router(k)): v
        for k, v in load_file(str(adapter / "adapters.safetensors")).items()
    }
    assert set(after) == set(before) and "mtp.fc.weight" in after
    assert (tmp_path / "fused" / "preprocessor_config.json").read_text() == processor
    for name in before:
        np.testing.assert_array_equal(after[name], routers.get(name, before[name]), err_msg=name)
    tuned = moe_local.load(str(with_mtp), backend="torch", adapter_path=adapter).logits(LONG)[0]
    with torch.no_grad():
        theirs = hf_reference(tmp_path / "fused")(torch.tensor(LONG[None])).logits[0].numpy()
    assert rel(theirs, tuned) <= 1e-5
    assert rel(tuned_model.logits(LONG)[0], tuned) <= 1e-5


def test_info_names_the_layer_kinds(folders, capsys):
    code, out, _ = run_main(capsys, "info", "--model", folders["qwen3_next"])
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
def test_bad_configs_are_one_line_errors(change, message, folders, tmp_path, capsys):
    bad = with_config(folders["qwen3_next"], tmp_path / "bad", change)
    code, _, err = run_main(capsys, "info", "--model", bad)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_text_only_qwen3_5_folder_equals_the_libraries(backend, tmp_path):
    """``qwen3_5_moe_text`` as transformers writes it by default (per-expert tensors): transformers' model
    of it (torch), and mlx-lm's of the same weights (MLX; mlx-lm reads neither that model type nor
    per-expert tensors, so it is given the folder the torch backend writes: fused, as the releases)."""
    from mlx_lm.utils import load_model

    folder = checkpoints.make_qwen3_5_moe(tmp_path / "text", seed=6, vision=False)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen3_5_moe_text"
    m = moe_local.load(str(folder), backend=backend)
    ids, mask = np.zeros((2, len(LONG)), np.int64), np.zeros((2, len(LONG)), np.int64)
    ids[0], mask[0] = LONG, 1
    ids[1, -len(SHORT) :], mask[1, -len(SHORT) :] = SHORT, 1
    batch = m.logits(ids, mask)
    if backend == "torch":
        with torch.no_grad():
            model = hf_reference(folder)
            reference = [model(torch.tensor(x[None])).logits[0].numpy() for x in (LONG, SHORT)]
    else:
        import mlx.core as mx

        readable = moe_local.load(str(folder), backend="torch").save(tmp_path / "fused")
        theirs, _ = load_model(readable, model_config={"model_type": "qwen3_5_moe"})
        reference = [np.array(theirs(mx.array(x[None])).astype(mx.float32))[0] for x in (LONG, SHORT)]
    assert rel(batch[0], reference[0]) <= 1e-5
    assert rel(batch[1, -len(SHORT) :], reference[1]) <= 1e-5
