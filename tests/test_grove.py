"""Grove MoE: the project's block against a per-slot transcription of the reference formula.

The transcription below is written from GroveMoE's released forward (docs/methods.md), token by token:
    sel = top-k(sigmoid(z)); w_i = softmax(z)_i / Σ_{l∈sel} softmax(z)_l
    y = Σ_{i∈sel} w_i E_i(x) + λ Σ_{i∈sel} w_i A_{i // g}(x)
"""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import moe_local
from moe_local.backends.torch.moe import MoEBlock, group_rows
from moe_local.backends.torch.router import route
from moe_local.families.grove_moe import ROUTER as GROVE_ROUTER
from moe_local.spec import GroveSpec, MoESpec

import checkpoints


def swiglu(x, gate, up, down):
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def grove_transcription(x, gate_w, experts, adjugates, k, per_group, scale):
    """experts / adjugates: lists of (gate, up, down) weight triples."""
    out = []
    for token in x:
        z = gate_w @ token
        sel = torch.topk(torch.sigmoid(z), k).indices.tolist()
        p = torch.softmax(z, -1)
        w = p[sel] / p[sel].sum()
        y = sum(w[n] * swiglu(token, *experts[i]) for n, i in enumerate(sel))
        y = y + scale * sum(w[n] * swiglu(token, *adjugates[i // per_group]) for n, i in enumerate(sel))
        out.append(y)
    return torch.stack(out)


def make_block(num_experts=8, top_k=3, hidden=32, size=16, adjugate=8, seed=0, impl="grouped"):
    spec = MoESpec(
        layer=0,
        num_experts=num_experts,
        top_k=top_k,
        expert_size=size,
        router=GROVE_ROUTER,
        grove=GroveSpec(experts_per_group=2, adjugate_size=adjugate, scale=0.05),
    )
    block = MoEBlock(spec, hidden, impl)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return block


def triples(experts):
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    return [(*gate_up[e].chunk(2, 0), down[e]) for e in range(gate_up.shape[0])]


@pytest.mark.parametrize("impl", ["grouped", "reference"])
@pytest.mark.parametrize("tokens,top_k", [(1, 3), (17, 3), (9, 1), (12, 8)])
def test_block_matches_transcription(impl, tokens, top_k):
    block = make_block(top_k=top_k, impl=impl, seed=tokens)
    x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = block(x[None])[0]
        ref = grove_transcription(
            x, block.gate.weight, triples(block.experts), triples(block.chunk_experts), top_k, 2, 0.05
        )
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("tokens", [1, 13, 70])
def test_grouped_mm_path_equals_per_expert_path(dtype, tol, tokens):
    """Without a gradient the CPU block runs torch._grouped_mm (experts up to 64 tokens, adjugates always);
    with one, a matmul pair per expert and per adjugate."""
    block = make_block(num_experts=16, top_k=2, seed=3).to(dtype)  # 16 experts, few tokens: some idle
    x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        assert block._grouped_mm_applies(x, x)
        fast = block(x)
    with torch.enable_grad():
        assert not block._grouped_mm_applies(x, x)
        loop = block(x).detach()
    scale = loop.float().abs().max()
    torch.testing.assert_close(fast.float(), loop.float(), rtol=0, atol=tol * scale)


def test_adjugates_run_once_per_token_and_group():
    """With all 8 experts selected, each token touches each of the 4 groups once, with summed weights."""
    block = make_block(top_k=8)
    x = torch.randn(5, 32)
    idx, weights = route(block.gate(x), block.spec.router, block.spec.top_k)
    token, summed, counts = group_rows(idx, weights, block.spec)
    assert counts == [5, 5, 5, 5]
    assert len(token) == 20
    for t in range(5):
        for group in range(4):
            members = idx[t] // 2 == group
            expected = weights[t][members].sum()
            got = summed[group * 5 + t]
            torch.testing.assert_close(got, expected)


def test_selection_uses_sigmoid_and_weights_always_renormalise():
    block = make_block(top_k=2)
    logits = torch.tensor([[3.0, -1.0, 2.0, 0.5, -2.0, 1.0, 0.0, -3.0]])
    idx, weights = route(logits, block.spec.router, block.spec.top_k)
    assert sorted(idx[0].tolist()) == [0, 2]
    torch.testing.assert_close(weights.sum(-1), torch.ones(1))


def _transcribed_model(folder):
    """transformers' Qwen3-MoE with the Grove blocks swapped for the test's transcription."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = json.loads((folder / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "auto_map")}
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**config)).eval()
    state = load_file(str(folder / "model.safetensors"))
    model.load_state_dict(
        {
            k: v
            for k, v in state.items()
            if "chunk_experts" not in k and "expert_bias" not in k and ".experts." not in k
        },
        strict=False,
    )

    class Transcribed(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            p = f"model.layers.{layer}.mlp"
            self.gate = state[f"{p}.gate.weight"]
            self.experts = [
                tuple(state[f"{p}.experts.{e}.{n}_proj.weight"] for n in ("gate", "up", "down"))
                for e in range(config["num_experts"])
            ]
            self.adjugates = [
                tuple(state[f"{p}.chunk_experts.{j}.{n}_proj.weight"] for n in ("gate", "up", "down"))
                for j in range(config["num_experts"] // 2)
            ]

        def forward(self, h):
            flat = h.reshape(-1, h.shape[-1])
            y = grove_transcription(
                flat, self.gate, self.experts, self.adjugates, config["num_experts_per_tok"], 2, 0.05
            )
            return y.reshape(h.shape)

    for layer in range(config["num_hidden_layers"]):
        model.model.layers[layer].mlp = Transcribed(layer)
    return model


def test_grovemoe_folder_end_to_end(grove_dir):
    """A GroveMoE-format folder (chunk_experts, expert_bias, no grove_* keys) without trust_remote_code."""
    m = moe_local.load(grove_dir, backend="torch")
    assert m.spec.family == "grove_moe"
    assert m.spec.moe[0].grove == GroveSpec(experts_per_group=2, adjugate_size=16, scale=0.05)
    assert type(m.model).__name__ == "GroveMoeForCausalLM"
    ids = np.random.default_rng(0).integers(0, 128, size=(2, 10))
    with torch.no_grad():
        ref = _transcribed_model(grove_dir)(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(m.logits(ids), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    reference_impl = moe_local.load(grove_dir, backend="torch", moe_impl="reference").logits(ids)
    np.testing.assert_allclose(m.logits(ids), reference_impl, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_grove_folder_written_by_us_round_trips(grove_dir, tmp_path):
    m = moe_local.load(grove_dir, backend="torch")
    out = m.save(tmp_path / "written")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GroveMoeForCausalLM"]
    assert (config["grove_experts_per_group"], config["grove_scale"], config["grove_adjugate_intermediate_size"]) == (
        2,
        0.05,
        16,
    )
    names = load_file(str(out / "model.safetensors"))
    assert "model.layers.0.mlp.chunk_experts.3.down_proj.weight" in names
    ids = np.arange(12)[None]
    np.testing.assert_array_equal(moe_local.load(out, backend="torch").logits(ids), m.logits(ids))


def test_upcycled_grove_with_zero_adjugate_down_equals_plain_model(tmp_path):
    """Paper's upcycling: zero-initialised adjugate down-projections leave the base model's outputs —
    but Grove selects by sigmoid and always renormalises, so compare with norm_topk_prob on."""
    plain = checkpoints.make_qwen3_moe(tmp_path / "plain", seed=4, tokenizer=False, norm_topk_prob=True)
    grove = checkpoints.make_grove(tmp_path / "grove", seed=4, tokenizer=False, norm_topk_prob=True)
    state = load_file(str(grove / "model.safetensors"))
    for name in state:
        if "chunk_experts" in name and name.endswith("down_proj.weight"):
            state[name] = torch.zeros_like(state[name])
    from safetensors.torch import save_file

    save_file(state, str(grove / "model.safetensors"))
    ids = np.arange(20)[None] % 128
    np.testing.assert_allclose(
        moe_local.load(grove, backend="torch").logits(ids),
        moe_local.load(plain, backend="torch").logits(ids),
        rtol=0,
        atol=1e-5,
    )


def test_written_folder_keeps_auto_map_only_with_its_code(grove_dir, tmp_path):
    """GroveMoE's auto_map names modeling_grove_moe.py: carried when the folder has it, else dropped."""
    m = moe_local.load(grove_dir, backend="torch")
    bare = json.loads((m.save(tmp_path / "bare") / "config.json").read_text())
    assert "auto_map" not in bare
    with_code = tmp_path / "with-code"
    shutil.copytree(grove_dir, with_code)
    (with_code / "modeling_grove_moe.py").write_text("# GroveMoE's remote code (never run by moe-local)\n")
    out = moe_local.load(with_code, backend="torch").save(tmp_path / "kept")
    assert (
        json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
        == "modeling_grove_moe.GroveMoeForCausalLM"
    )
    assert (out / "modeling_grove_moe.py").is_file()
