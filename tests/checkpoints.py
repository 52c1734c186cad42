"""Tiny random checkpoints in real Hugging Face format, written by transformers itself.

Weights are redrawn with a larger spread than transformers' init (std 0.02 would make every
router nearly uniform, so routing bugs would hide); a real tokenizer is trained on a few lines.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

BASE = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
QWEN3 = dict(
    BASE,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    intermediate_size=96,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
)
OLMOE = dict(BASE, num_experts=8, num_experts_per_tok=2, intermediate_size=32, norm_topk_prob=False)
OLMOE.pop("head_dim")

TEXT = [
    "What is 3 plus 4?",
    "Answer: A B C D",
    "The quick brown fox jumps over the lazy dog.",
    "user assistant system",
    "Which is larger, 7 or 9?",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def randomize(model: torch.nn.Module, seed: int, std: float = 0.15) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet())[: vocab_size - 40],
    )
    tok.train_from_iterator(TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|end|>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))


def spelled(config: dict, spelling: str) -> dict:
    """Rewrite a transformers-5 config.json in the transformers-4 spelling, or with both spellings."""
    c = dict(config)
    experts = c.get("num_local_experts", c.get("num_experts"))
    theta = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta")
    if spelling in ("v4", "both"):
        c["num_experts"] = experts
        c["rope_theta"] = theta
    if spelling == "v4":
        c.pop("num_local_experts", None)
        c.pop("rope_parameters", None)
    if spelling == "both":
        c["num_local_experts"] = experts
        c["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    return c


def _save(model, folder: Path, spelling: str, tokenizer: bool) -> Path:
    folder = Path(folder)
    model.save_pretrained(str(folder))
    config_path = folder / "config.json"
    config_path.write_text(json.dumps(spelled(json.loads(config_path.read_text()), spelling), indent=2))
    if tokenizer:
        write_tokenizer(folder, model.config.vocab_size)
    return folder


def make_qwen3_moe(folder: Path, seed: int = 0, spelling: str = "v5", tokenizer: bool = True, **overrides) -> Path:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**QWEN3, **overrides}))
    randomize(model, seed)
    return _save(model, folder, spelling, tokenizer)


def make_olmoe(folder: Path, seed: int = 0, spelling: str = "v5", tokenizer: bool = True, **overrides) -> Path:
    from transformers import OlmoeConfig, OlmoeForCausalLM

    model = OlmoeForCausalLM(OlmoeConfig(**{**OLMOE, **overrides}))
    randomize(model, seed)
    return _save(model, folder, spelling, tokenizer)


def make_grove(
    folder: Path,
    seed: int = 0,
    adjugate_size: int = 16,
    write_grove_keys: bool = False,
    tokenizer: bool = True,
    **overrides,
) -> Path:
    """A GroveMoE-format folder as GroveMoE releases it: Qwen3-MoE weights plus
    ``mlp.chunk_experts.J.*`` (one per pair of experts) and an unused ``mlp.expert_bias``;
    config.json names ``GroveMoeForCausalLM`` and (by default) omits the grove_* keys."""
    from safetensors.torch import load_file, save_file

    folder = make_qwen3_moe(folder, seed=seed, spelling="v4", tokenizer=tokenizer, **overrides)
    config = json.loads((folder / "config.json").read_text())
    state = load_file(str(folder / "model.safetensors"))
    g = torch.Generator().manual_seed(seed + 1)
    h, groups = config["hidden_size"], config["num_experts"] // 2
    for layer in range(config["num_hidden_layers"]):
        if f"model.layers.{layer}.mlp.gate.weight" not in state:
            continue
        for j in range(groups):
            prefix = f"model.layers.{layer}.mlp.chunk_experts.{j}"
            state[f"{prefix}.gate_proj.weight"] = 0.15 * torch.randn(adjugate_size, h, generator=g)
            state[f"{prefix}.up_proj.weight"] = 0.15 * torch.randn(adjugate_size, h, generator=g)
            state[f"{prefix}.down_proj.weight"] = 0.15 * torch.randn(h, adjugate_size, generator=g)
        state[f"model.layers.{layer}.mlp.expert_bias"] = torch.zeros(config["num_experts"])
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config["architectures"] = ["GroveMoeForCausalLM"]
    config["model_type"] = "grove_moe"
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_grove_moe.GroveMoeForCausalLM"}
    if write_grove_keys:
        config.update(grove_experts_per_group=2, grove_scale=0.05, grove_adjugate_intermediate_size=adjugate_size)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
