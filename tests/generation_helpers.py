"""Helpers for the generation, chat and fuse tests: router adapters made from perturbed gates (written
with moe_local.adapter.write_adapter, as the tuner writes them), a folder without a chat template, and
the libraries' own greedy generation as the reference (transformers for torch, mlx-lm for MLX)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_local.adapter import write_adapter
from moe_local.backends import gate_name
from moe_local.checkpoint import load_spec


def make_adapter(model_dir: Path, out: Path, layers: int = 2, scale: float = 1.0, seed: int = 0) -> Path:
    """Perturb the gates of the last ``layers`` MoE layers by ``scale`` x their own spread."""
    from safetensors.numpy import load_file

    spec = load_spec(model_dir)
    tuned = spec.last_moe_layers(layers)
    state = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        state.update(load_file(str(f)))
    rng = np.random.default_rng(seed)
    weights = {}
    for layer in tuned:
        base = state[gate_name(layer)].astype(np.float32)
        weights[gate_name(layer)] = base + scale * base.std() * rng.standard_normal(base.shape).astype(np.float32)
    write_adapter(out, weights, spec, tuned, method="test", hyperparameters={"scale": scale, "seed": seed})
    return Path(out)


def without_chat_template(model_dir: Path, out: Path) -> Path:
    """A copy of a model folder whose tokenizer has no chat template."""
    import json

    shutil.copytree(model_dir, out)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    for name in ("chat_template.jinja", "chat_template.json"):
        (out / name).unlink(missing_ok=True)
    return out


def hf_reference(folder, family, adapter=None):
    """transformers' eager model of the folder, with the adapter's gates set into it by hand."""
    from transformers import OlmoeForCausalLM, Qwen3MoeForCausalLM

    cls = OlmoeForCausalLM if family == "olmoe" else Qwen3MoeForCausalLM
    model = cls.from_pretrained(str(folder), attn_implementation="eager", experts_implementation="eager").eval()
    if adapter is not None:
        from safetensors.numpy import load_file

        with torch.no_grad():
            for name, w in load_file(str(adapter / "adapters.safetensors")).items():
                model.get_parameter(name).copy_(torch.from_numpy(w))
    return model


def hf_greedy(model, ids, eos, max_tokens=24) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False,
                         eos_token_id=sorted(eos), pad_token_id=sorted(eos)[0])
    new = out[0, len(ids):].tolist()
    return new[:-1] if new and new[-1] in eos else new


def both_spellings(folder: Path, out: Path) -> Path:
    """A copy with both config spellings: mlx-lm reads num_experts / rope_theta, which v5-only folders lack."""
    import json

    import checkpoints

    shutil.copytree(folder, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(checkpoints.spelled(config, "both")))
    return out


def mlx_lm_reference(folder, adapter=None):
    """mlx-lm's own model (its own MoE layers) and tokenizer of the folder, the adapter loaded by mlx-lm."""
    from mlx_lm import load

    readable = Path(folder).parent / f"{Path(folder).name}-mlx-lm"
    if not readable.exists():
        both_spellings(folder, readable)
    return load(str(readable), adapter_path=None if adapter is None else str(adapter))


def mlx_lm_greedy(reference, ids, eos, max_tokens=24) -> list[int]:
    """mlx-lm's greedy ``stream_generate`` (its default sampler) from scratch, end tokens ``eos``."""
    import mlx.core as mx
    from mlx_lm import stream_generate

    model, tokenizer = reference
    tokenizer.eos_token_ids = eos
    new = [r.token for r in stream_generate(model, tokenizer, mx.array(ids), max_tokens=max_tokens)]
    return new[:-1] if new and new[-1] in eos else new


def library_greedy(backend, folder, family, ids, eos, max_tokens=24, adapter=None) -> list[int]:
    """The backend's library's own greedy answer: transformers' ``generate`` or mlx-lm's ``stream_generate``."""
    if backend == "mlx":
        return mlx_lm_greedy(mlx_lm_reference(folder, adapter), ids, eos, max_tokens)
    return hf_greedy(hf_reference(folder, family, adapter), ids, eos, max_tokens)


# The backends to parametrize over: torch, and MLX where mlx-lm is installed.
BACKENDS = ["torch", pytest.param("mlx", marks=pytest.mark.skipif(importlib.util.find_spec("mlx_lm") is None,
                                                                  reason="mlx-lm is not installed"))]


def endless(model_dir: Path, out: Path) -> Path:
    """A copy whose answers never end early: the output rows of the end token are zeroed, so its logit
    is 0 while some other of the random logits is almost surely above it. Greedy answers then have
    exactly max-tokens tokens whatever tokenizer the fixture trained (BPE training is not deterministic)."""
    import json

    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    shutil.copytree(model_dir, out)
    eos = AutoTokenizer.from_pretrained(str(out)).eos_token_id
    config = json.loads((out / "config.json").read_text())
    assert not config.get("tie_word_embeddings")
    path = out / "model.safetensors"
    state = load_file(str(path))
    state["lm_head.weight"][eos] = 0
    save_file(state, str(path), metadata={"format": "pt"})
    return out
