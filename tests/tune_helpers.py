"""Small task files, embeddings and tokenizers for the RoMA tests (written inside each test)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def task_records(n: int, seed: int = 0, choices: int = 4) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a, b = int(rng.integers(0, 9)), int(rng.integers(0, 9))
        opts = [str(a + b + d) for d in range(choices)]
        answer = int(rng.integers(0, choices))
        opts[0], opts[answer] = opts[answer], opts[0]
        out.append({"question": f"What is {a} plus {b}?", "choices": opts, "answer": answer,
                    "task": ["add", "larger"][i % 2]})
    return out


def write_jsonl(path: Path, rows, blank_lines: bool = False) -> Path:
    lines = []
    for row in rows:
        lines.append(row if isinstance(row, str) else json.dumps(row))
        if blank_lines:
            lines.append("")
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


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
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<|end|>", "<pad>"],
                                  initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet())[:vocab_size - 30])
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|end|>", pad_token="<pad>")
    fast.save_pretrained(str(folder))


def answerable(model, rows: list[dict]) -> list[dict]:
    """The rows with every other answer set to the base model's own choice, so that the neighbour search
    always has successful samples (a random tiny model may otherwise answer none right)."""
    from moe_local.data import parse_record
    from moe_local.evaluate import evaluate

    records = [parse_record(r, "t", i + 1) for i, r in enumerate(rows)]
    preds = evaluate(model, records, layers=1, progress="off").predictions
    return [dict(r, answer=int(p)) if i % 2 == 0 else r for i, (r, p) in enumerate(zip(rows, preds))]


def run_main(capsys, *args):
    """``moe-local ARGS`` in this process: (exit code, stdout, stderr)."""
    import pytest

    from moe_local.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err
