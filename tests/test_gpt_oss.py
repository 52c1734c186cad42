"""gpt-oss on both backends, against the libraries' own models: transformers' eager ``GptOssForCausalLM``
(torch) and mlx-lm's ``gpt_oss`` (MLX), on tiny random checkpoints transformers writes (bf16 layout) and
their MXFP4 copies as the release ships them.

mlx-lm's YaRN ignores ``truncate: false`` (gpt-oss's RoPE), an inherent ~1e-3 difference from
transformers: each backend's logits are compared with its own library's; where the MLX backend is
compared with transformers (router gradients), the folder's YaRN has ``truncate: true``, where the
libraries agree to 4e-7.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import moe_local
from moe_local.chat import eos_token_ids, prompt_ids
from moe_local.errors import UserError
from moe_local.families import load_spec

import checkpoints
from helpers import (
    BACKENDS,
    adapter_variant,
    answerable,
    both_spellings,
    poisoned,
    rel,
    run_main,
    task_records,
    unit_rows,
    with_config,
    write_jsonl,
)

RTOL = 1e-5
LONG = np.array([3, 17, 42, 5, 99, 64, 12, 7, 120, 33])  # longer than the sliding window (4)
SHORT = LONG[3:]
TRUNCATED_YARN = {
    "rope_type": "yarn",
    "rope_theta": 150000.0,
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": True,
    "original_max_position_embeddings": 4096,
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt_oss")
    source = checkpoints.make_gpt_oss(root / "fp32", seed=1)
    return {
        "bf16": checkpoints.make_gpt_oss(root / "bf16", seed=0, dtype=torch.bfloat16),
        "mxfp4": checkpoints.make_gpt_oss_mxfp4(root / "mxfp4", source),
        "truncated": checkpoints.make_gpt_oss(root / "truncated", seed=2, rope_parameters=TRUNCATED_YARN),
    }


# -- the references ---------------------------------------------------------------------------------


def transformers_model(folder):
    """transformers' own model of the folder in float32 (MXFP4 experts dequantized by transformers)."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    quantized = "quantization_config" in json.loads((Path(folder) / "config.json").read_text())
    extra = {"quantization_config": Mxfp4Config(dequantize=True)} if quantized else {}
    return AutoModelForCausalLM.from_pretrained(
        str(folder), attn_implementation="eager", dtype=torch.float32, **extra
    ).eval()


def transformers_logits(folder, ids):
    with torch.no_grad():
        return transformers_model(folder)(torch.tensor(np.asarray(ids)[None])).logits[0].numpy()


def mlx_lm_readable(folder) -> Path:
    """A copy mlx-lm's ``gpt_oss`` reads: its config keys (helpers.both_spellings), and bf16-layout experts
    rewritten as mlx-lm's conversions store them (``experts.gate_proj.weight [E, I, H]`` = the even columns
    of ``gate_up_proj [E, H, 2I]`` transposed, ``up_proj`` the odd ones): mlx-lm's own sanitize reads the
    MXFP4 release but not the layout transformers writes. Float tensors are float32, as MLX's CPU runs."""
    from safetensors.torch import load_file, save_file

    out = Path(folder).parent / f"{Path(folder).name}-mlx-lm"
    if out.exists():
        return out
    both_spellings(folder, out)
    state, new = load_file(str(out / "model.safetensors")), {}
    for name, v in state.items():
        v = v.float() if v.is_floating_point() else v
        if name.endswith("experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            new[prefix + "gate_proj.weight"] = v[..., 0::2].transpose(1, 2)
            new[prefix + "up_proj.weight"] = v[..., 1::2].transpose(1, 2)
        elif name.endswith("experts.gate_up_proj_bias"):
            prefix = name[: -len("gate_up_proj_bias")]
            new[prefix + "gate_proj.bias"], new[prefix + "up_proj.bias"] = v[..., 0::2], v[..., 1::2]
        elif name.endswith("experts.down_proj"):
            new[name + ".weight"] = v.transpose(1, 2)
        elif name.endswith("experts.down_proj_bias"):
            new[name[: -len("_bias")] + ".bias"] = v
        else:
            new[name] = v
    save_file({k: v.contiguous() for k, v in new.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def mlx_lm_model(folder, adapter=None):
    from mlx_lm import load

    return load(str(mlx_lm_readable(folder)), adapter_path=None if adapter is None else str(adapter))


def mlx_lm_logits(folder, ids, adapter=None):
    import mlx.core as mx

    model, _ = mlx_lm_model(folder, adapter)
    return np.array(model(mx.array(np.asarray(ids)[None])).astype(mx.float32))[0]


def reference_logits(backend, folder, ids):
    return mlx_lm_logits(folder, ids) if backend == "mlx" else transformers_logits(folder, ids)


def load(folder, backend, **kwargs):
    return moe_local.load(str(folder), backend=backend, dtype="float32", **kwargs)


def padded_batch():
    ids = np.zeros((2, len(LONG)), np.int64)
    mask = np.zeros_like(ids)
    ids[0], mask[0] = LONG, 1
    ids[1, -len(SHORT) :], mask[1, -len(SHORT) :] = SHORT, 1
    return ids, mask


# -- logits -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["bf16", "mxfp4"])
def test_logits_equal_the_library_with_left_padding_and_one_token(which, backend, folders):
    folder = folders[which]
    m = load(folder, backend)
    batch = m.logits(*padded_batch())
    assert rel(batch[0], reference_logits(backend, folder, LONG)) <= RTOL
    assert rel(batch[1, -len(SHORT) :], reference_logits(backend, folder, SHORT)) <= RTOL
    assert rel(m.logits(LONG[:1])[0], reference_logits(backend, folder, LONG[:1])) <= RTOL
    if which == "mxfp4" and backend == "mlx":  # run as mlx-lm runs the release: gather_qmm in mxfp4 mode
        experts = m.moe_block(0).switch_mlp.gate_proj
        assert type(experts).__name__ == "QuantizedSwitchLinear" and experts.mode == "mxfp4"


def test_mxfp4_dequantization_equals_transformers():
    """Our decoder of the format, bit for bit against transformers' (random codes, scales from tiny to large)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from moe_local.backends.torch.mxfp4 import dequantize

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 6, 4, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(90, 160, (3, 6, 4), generator=g, dtype=torch.uint8)
    scales[0, 0] = torch.tensor([1, 127, 200, 250], dtype=torch.uint8)
    for dtype in (torch.float32, torch.bfloat16):
        theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, in, out]
        assert torch.equal(dequantize(blocks, scales, dtype).transpose(1, 2), theirs)


def test_moe_impls_agree(folders):
    """The per-slot reference loop and the grouped path (torch._grouped_mm with the experts' biases)."""
    grouped = load(folders["bf16"], "torch").logits(*padded_batch())
    reference = load(folders["bf16"], "torch", moe_impl="reference").logits(*padded_batch())
    assert rel(grouped, reference) <= RTOL


def test_parameter_counts_equal_the_checkpoint_and_info_describes_the_experts(folders, capsys):
    from safetensors.torch import load_file

    state = load_file(str(folders["bf16"] / "model.safetensors"))
    assert load_spec(folders["bf16"]).parameter_counts()["total"] == sum(v.numel() for v in state.values())
    code, out, _ = run_main(capsys, "info", "--model", folders["mxfp4"])
    assert code == 0
    assert "the router has a bias" in out and "clamped SwiGLU" in out and "biases" in out
    assert "experts MXFP4" in out and "clamped SwiGLU on this path" in out


@pytest.mark.parametrize(
    "change, message",
    [
        ({"layer_types": ["full_attention", "full_attention"]}, "both sliding and full"),
        ({"layer_types": ["sliding_attention"]}, "'layer_types' must name 2 layers"),
        ({"attention_bias": False}, "'attention_bias' must be true"),
        ({"swiglu_limit": "7"}, "'swiglu_limit' must be"),
    ],
)
def test_bad_configs_are_one_line_errors(change, message, folders, tmp_path, capsys):
    folder = with_config(folders["bf16"], tmp_path / "bad", change)
    code, _, err = run_main(capsys, "info", "--model", folder)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_mxfp4_folder_without_its_scales_is_a_one_line_error(backend, folders, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(folders["mxfp4"], tmp_path / "damaged")
    state = load_file(str(folder / "model.safetensors"))
    del state["model.layers.1.mlp.experts.down_proj_scales"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = run_main(capsys, "generate", "--model", folder, "--backend", backend, "--prompt", "Hi")
    assert code == 2 and "down_proj" in err and len(err.strip().splitlines()) == 1, err


# -- generation -------------------------------------------------------------------------------------


def library_greedy(backend, folder, ids, eos, max_tokens):
    from helpers import hf_greedy, mlx_lm_greedy

    if backend == "mlx":
        return mlx_lm_greedy(mlx_lm_model(folder), ids, eos, max_tokens)
    return hf_greedy(transformers_model(folder), ids, eos, max_tokens)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_generation_equals_the_library_and_a_cache_past_its_window_is_refilled(backend, folders):
    """Greedy answers token for token; then a conversation whose next prompt leaves the cached tokens
    where its sliding-window layers cannot be cut back (past their window): the cache is emptied and
    refilled, and the answer is the library's from scratch."""
    folder = folders["bf16"]
    m = load(folder, backend)
    run = m.stream("Which is larger, 7 or 9?", max_tokens=8)
    "".join(run)
    ids, eos = prompt_ids(m, "Which is larger, 7 or 9?"), eos_token_ids(m)
    assert len(ids) > 4 and run.answer_ids == library_greedy(backend, folder, ids, eos, 8)
    conversation = m.chat(max_tokens=6)
    "".join(conversation.complete(list(LONG)))
    other = [int(i) for i in LONG[:7]] + [11, 13, 21]  # shares 7 tokens with what the cache holds: past the window of 4
    "".join(conversation.complete(other))
    assert conversation.answer_ids == library_greedy(backend, folder, other, eos, 6)


# -- tuning: the router's weight and bias -----------------------------------------------------------


def _tuning_setup(m, n=6):
    from moe_local.tuning import data, roma
    from moe_local.tuning.prepare import prepare

    from helpers import answerable_records

    records = answerable_records(m, n, seed=3)
    layers = m.spec.last_moe_layers(2)  # the suffix starts at layer 0, a sliding-window layer
    bank = prepare(m, records, unit_rows(n), layers, progress="off")
    nb = roma.neighbours(bank.embeddings, bank.correct, 3, 0.4)
    batch = data.make_batch(data.encode_records(m.tokenizer, records), np.arange(n))
    targets, w = roma.neighbour_targets(bank.routing, nb, batch.index)
    return layers, batch, {"onehot": batch.answer_onehot(), "targets": targets, "weights": w}


def _transformers_step(folder, batch, layers, routers, inputs):
    """The loss's gradients in transformers' own whole model: the tuned routers' weight and bias made
    float32 leaf parameters, the routing read from its routers' logits, scores from the full logits."""
    from moe_local.backends.torch.model import positions_from_mask
    from moe_local.tuning import roma

    from helpers import reference_scores

    model = transformers_model(folder)
    params, logits_of = {}, {}
    for i in layers:
        router = model.model.layers[i].mlp.router
        router.weight, router.bias = (torch.nn.Parameter(torch.tensor(a)) for a in routers[i])
        params[i] = (router.weight, router.bias)
        router.register_forward_hook(lambda mod, args, out, i=i: logits_of.__setitem__(i, out[0]))
    ids, mask = torch.tensor(batch.ids), torch.tensor(batch.mask)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits.float()
    scores = reference_scores(batch, torch.log_softmax(logits, -1), torch.stack, torch.tensor)
    seq, T = batch.sample_seq, batch.ids.shape[1]
    rows = seq * T + batch.prompt_pos[seq]
    routing = torch.stack([torch.softmax(logits_of[i][rows].float(), -1) for i in layers], 1)
    args = {k: torch.tensor(v) for k, v in inputs.items()}
    loss, _, _ = roma.roma_loss(scores, routing, args["onehot"], args["targets"], args["weights"], 0.8, 1.0, batch.size)
    loss.backward()
    return loss.item(), {i: (w.grad.numpy(), b.grad.numpy()) for i, (w, b) in params.items()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_router_weight_and_bias_gradients_equal_transformers(backend, folders):
    """The prefix-cached, left-padded suffix step's gradients in the router's weight and bias equal
    transformers' whole-model autograd (YaRN truncated, so MLX's attention agrees with transformers')."""
    from moe_local.tuning import roma

    folder = folders["truncated"]
    m = load(folder, backend)
    layers, batch, inputs = _tuning_setup(m)
    rng = np.random.default_rng(0)
    base = m.get_router_weights(layers)
    routers = {}
    for i in layers:
        w, b = (base[name] for name in m.spec.router_tensors(i))
        noise = rng.standard_normal(w.shape).astype(np.float32), rng.standard_normal(b.shape).astype(np.float32)
        routers[i] = (w + 0.05 * noise[0], b + 0.1 * noise[1])

    def loss_fn(scores, routing, onehot, targets, weights):
        loss, _, _ = roma.roma_loss(scores, routing, onehot, targets, weights, 0.8, 1.0, batch.size)
        return loss, {}

    hidden = m.prefix_hidden(batch, layers[0])
    loss, _, grads = m.suffix_value_and_grad(hidden, batch, layers[0], layers, loss_fn, inputs, router_weights=routers)
    ref_loss, ref_grads = _transformers_step(folder, batch, layers, routers, inputs)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for i in layers:
        for ours, theirs in zip(grads[i], ref_grads[i]):
            assert np.abs(theirs).max() > 0
            np.testing.assert_allclose(ours, theirs, atol=1e-5 * np.abs(theirs).max(), rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_command_on_the_mxfp4_release(backend, folders, tmp_path, capsys):
    """prepare, tune, eval with the oracle, generate and fuse through the CLI on an MXFP4 folder. The
    adapter holds the router's weight and bias, mlx-lm loads it with our MLX logits; the torch-fused
    folder keeps the MXFP4 experts byte for byte and transformers loads it with the tuned logits; the
    MLX-fused one (mlx-lm's format) loads in mlx-lm with them."""
    from safetensors.numpy import load_file

    folder = folders["mxfp4"]
    m = load(folder, backend)
    data = write_jsonl(tmp_path / "train.jsonl", answerable(m, task_records(8)))
    np.save(data.with_suffix(".npy"), unit_rows(8))
    common = ("--model", folder, "--backend", backend)
    code, _, err = run_main(capsys, "prepare", *common, "--data", data, "--layers", "1", "--bank", tmp_path / "bank")
    assert code == 0, err
    tune = ("--data", data, "--layers", "1", "--epochs", "2", "--batch-size", "4", "--lr", "0.05", "--lam-warmup", "0")
    code, _, err = run_main(
        capsys, "tune", *common, *tune, "--bank", tmp_path / "bank", "--adapter-path", tmp_path / "roma"
    )
    assert code == 0, err
    code, out, err = run_main(
        capsys, "eval", *common, "--data", data, "--adapter-path", tmp_path / "roma", "--oracle", "--oracle-steps", "2"
    )
    assert code == 0 and "oracle" in out, err
    code, _, err = run_main(capsys, "generate", *common, "--adapter-path", tmp_path / "roma", "--prompt", "Hi")
    assert code == 0, err
    adapter = load_file(str(tmp_path / "roma" / "adapters.safetensors"))
    before = m.get_router_weights([1])
    assert set(adapter) == set(before) == {"model.layers.1.mlp.router.weight", "model.layers.1.mlp.router.bias"}
    assert all(not np.array_equal(adapter[k], before[k]) for k in adapter)  # both were trained
    code, _, err = run_main(capsys, "fuse", *common, "--adapter-path", tmp_path / "roma", "--save-path", tmp_path / "f")
    assert code == 0, err
    tuned = load(folder, backend, adapter_path=tmp_path / "roma").logits(LONG)[0]
    if backend == "mlx":
        assert rel(mlx_lm_logits(folder, LONG, tmp_path / "roma"), tuned) <= RTOL
        assert rel(mlx_lm_logits(tmp_path / "f", LONG), tuned) <= RTOL
        return
    assert rel(transformers_logits(tmp_path / "f", LONG), tuned) <= RTOL
    fused, source = load_file(str(tmp_path / "f" / "model.safetensors")), load_file(str(folder / "model.safetensors"))
    assert set(fused) == set(source)
    for name in (n for n in source if n.endswith(("_blocks", "_scales"))):
        np.testing.assert_array_equal(fused[name], source[name])


def weight_and_bias_adapter(folder, out, seed=1) -> dict:
    """An adapter of layer 1 whose router weight and bias are the model's, perturbed; returns its tensors."""
    from moe_local.tuning.adapter import write_adapter

    base = load(folder, "torch").get_router_weights([1])
    rng = np.random.default_rng(seed)
    routers = {k: v + 0.5 * v.std() * rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
    write_adapter(out, routers, load_spec(folder), (1,), method="test", hyperparameters={})
    return routers


def test_served_adapters_swap_the_router_weight_and_bias(folders, tmp_path):
    """``moe-local serve`` swaps an adapter's tensors in for one request: both of gpt-oss's, and back."""
    from moe_local.serve.adapters import RouterAdapters, read_adapters

    folder = folders["truncated"]
    weight_and_bias_adapter(folder, tmp_path / "a")
    m = load(folder, "torch")
    base = m.logits(LONG)[0]
    served = RouterAdapters(m, read_adapters({"a": tmp_path / "a"}))
    with served.applied("a"):
        np.testing.assert_array_equal(
            m.logits(LONG)[0], load(folder, "torch", adapter_path=tmp_path / "a").logits(LONG)[0]
        )
    np.testing.assert_array_equal(m.logits(LONG)[0], base)
    assert rel(load(folder, "torch", adapter_path=tmp_path / "a").logits(LONG)[0], base) > 1e-4


def test_an_adapter_without_its_bias_or_with_a_nan_bias_is_refused(folders, tmp_path, capsys):
    """The router's bias is one of its tuned tensors: an adapter must hold it, finite, wherever it is read."""
    from moe_local.serve.adapters import RouterAdapters, read_adapters

    folder = folders["truncated"]
    weight_and_bias_adapter(folder, tmp_path / "a")
    bias = "model.layers.1.mlp.router.bias"
    bad = {
        "nan": (adapter_variant(tmp_path / "a", tmp_path / "nan", poisoned(np.nan, bias)), "holds NaN or infinite"),
        "no bias": (
            adapter_variant(tmp_path / "a", tmp_path / "no-bias", lambda w: {k: v for k, v in w.items() if k != bias}),
            f"lacks {bias}",
        ),
    }
    for adapter, words in bad.values():
        with pytest.raises(UserError, match=words):
            load(folder, "torch", adapter_path=adapter)
        with pytest.raises(UserError, match=words):
            RouterAdapters(load(folder, "torch"), read_adapters({"x": adapter}))
        fuse = ["fuse", "--model", folder, "--adapter-path", adapter, "--save-path", tmp_path / "f"]
        code, out, err = run_main(capsys, *fuse)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "f").exists()


def test_mlx_fuse_writes_the_layout_transformers_reads(folders, tmp_path):
    """A float model fused on MLX is written as transformers writes gpt-oss (fused, interleaved, [E, in, out]):
    every tensor but the tuned router's is the source's bit for bit, and transformers' model of it gives
    the tuned logits of the torch backend."""
    from safetensors.numpy import load_file

    folder = folders["truncated"]
    routers = weight_and_bias_adapter(folder, tmp_path / "a")
    load(folder, "mlx", adapter_path=tmp_path / "a").save(tmp_path / "fused")
    before, after = (
        load_file(str(folder / "model.safetensors")),
        load_file(str(tmp_path / "fused" / "model.safetensors")),
    )
    assert set(after) == set(before)
    for name in before:
        np.testing.assert_array_equal(after[name], routers.get(name, before[name]), err_msg=name)
    tuned = load(folder, "torch", adapter_path=tmp_path / "a").logits(LONG)[0]
    assert rel(tuned, load(folder, "torch").logits(LONG)[0]) > 1e-4
    assert rel(transformers_logits(tmp_path / "fused", LONG), tuned) <= RTOL


@pytest.mark.slow
def test_quantized_mlx_folders_equal_mlx_lm(folders, tmp_path):
    """mlx_lm.convert's quantized gpt-oss (its predicate: the router at 8 bits, the experts at 4): equal
    logits; a tuned router replaces the quantized one as a float linear map that keeps the bias."""
    import mlx.core as mx
    from mlx_lm.convert import convert
    from mlx_lm.utils import load_model

    readable = mlx_lm_readable(folders["bf16"])
    quantized = tmp_path / "q"
    convert(str(readable), str(quantized), quantize=True, q_group_size=32, q_bits=4)
    m = load(quantized, "mlx")
    theirs, _ = load_model(quantized)
    assert rel(m.logits(LONG)[0], np.array(theirs(mx.array(LONG[None])).astype(mx.float32))[0]) <= RTOL
    assert type(m.moe_block(1).gate).__name__ == "QuantizedLinear"
    routers = m.get_router_weights([1])
    bias = routers["model.layers.1.mlp.router.bias"]
    m.set_router_weights({"model.layers.1.mlp.router.weight": routers["model.layers.1.mlp.router.weight"] * 1.5})
    assert np.array_equal(m.get_router_weights([1])["model.layers.1.mlp.router.bias"], bias)
