"""The embedded default as shipped: the task suite, `tiny` and its Grove twin, and `moe-local demo` on them.

The suite is rebuilt by scripts/build_suite.py and compared byte for byte; the models are checked against
code nobody here wrote (transformers' eager Qwen3-MoE, mlx-lm's, the reference Grove formula).
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import moe_local
from moe_local import demo
from moe_local.checkpoint import ASSETS, BUILTIN_MODELS
from moe_local.spec import GroveSpec
from moe_local.tuning.data import embedding_text, read_records, render_prompt

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import build_suite  # noqa: E402

SPLITS = ("train", "test_seen", "val_unseen", "test_unseen")
SPLIT_GROUPS = {"train": {"seen", "tune"}, "test_seen": {"seen"}, "val_unseen": {"val"}, "test_unseen": {"test"}}


def suite_prompts(n_per_split=12):
    records = (
        read_records(ASSETS / "suite" / "test_unseen.jsonl")[:n_per_split]
        + read_records(ASSETS / "suite" / "test_seen.jsonl")[:n_per_split]
    )
    return [render_prompt(r) for r in records]


def left_padded(tokenizer, prompts):
    rows = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
    return ids, mask


def test_shipped_assets_fit_the_size_budget():
    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert total <= 25 * 2**20, f"{total / 2**20:.1f} MiB"


def test_suite_is_what_the_builder_writes():
    built = build_suite.build_splits()
    for split in SPLITS:
        shipped = (ASSETS / "suite" / f"{split}.jsonl").read_text()
        assert shipped == "".join(json.dumps(r) + "\n" for r in built[split]), split


def test_suite_families_phrasings_and_splits():
    assert len(build_suite.FAMILIES) >= 6
    for family, groups in build_suite.PHRASINGS.items():
        assert len(groups["seen"]) >= 4 and all(groups[g] for g in ("tune", "val", "test")), family
        everywhere = [t for g in groups.values() for t in g]
        assert len(set(everywhere)) == len(everywhere), f"{family}: a phrasing is in two groups"
    prompts = {}
    for split in SPLITS:
        rows = [json.loads(line) for line in (ASSETS / "suite" / f"{split}.jsonl").read_text().splitlines()]
        records = read_records(ASSETS / "suite" / f"{split}.jsonl")
        assert {r["group"] for r in rows} == SPLIT_GROUPS[split]
        assert {r.task for r in records} == set(build_suite.FAMILIES)
        assert len({len(r.choices) for r in records}) == 1 and 0 <= min(r.answer for r in records)
        prompts[split] = {render_prompt(r) for r in records}
        assert len(prompts[split]) == len(records), f"{split} repeats a prompt"
    for a in SPLITS:
        for b in SPLITS:
            assert a == b or not prompts[a] & prompts[b], f"{a} and {b} share prompts"


@pytest.mark.parametrize("split", SPLITS)
def test_suite_embeddings_are_minilm_of_the_embedding_text(split):
    from moe_local.tuning.embeddings import compute_embeddings, load_embeddings

    records = read_records(ASSETS / "suite" / f"{split}.jsonl")
    shipped = load_embeddings(ASSETS / "suite" / f"{split}.npy", len(records))
    np.testing.assert_allclose(np.linalg.norm(shipped, axis=1), 1.0, atol=2e-3)
    picked = np.random.default_rng(0).choice(len(records), size=8, replace=False)
    fresh = compute_embeddings([embedding_text(records[i]) for i in picked])
    np.testing.assert_allclose(shipped[picked], fresh, atol=2e-3)


def test_tiny_is_a_qwen3_moe_that_transformers_and_mlx_lm_run_alike():
    import mlx.core as mx
    from mlx_lm.utils import load_model
    from transformers import AutoModelForCausalLM

    ours = moe_local.load("tiny", backend="torch")
    assert (ours.spec.family, ours.spec.moe[0].num_experts, ours.spec.moe[0].top_k) == ("qwen3_moe", 8, 2)
    assert not ours.spec.moe[0].router.renormalize
    ids, mask = left_padded(ours.tokenizer, suite_prompts())
    expected = ours.logits(ids, mask)
    hf = AutoModelForCausalLM.from_pretrained(str(BUILTIN_MODELS["tiny"]), attn_implementation="eager").eval()
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    with torch.no_grad():
        got = hf(
            input_ids=torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            position_ids=torch.as_tensor(positions),
        ).logits.numpy()
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], expected[valid], rtol=0, atol=1e-5 * np.abs(expected).max())
    mlx_model, _ = load_model(BUILTIN_MODELS["tiny"])  # mlx-lm's own model, one prompt at a time
    for i in range(3):
        row = ids[i, mask[i] == 1][None]
        mlx_logits = np.array(mlx_model(mx.array(row)).astype(mx.float32))
        np.testing.assert_allclose(mlx_logits[0], expected[i, mask[i] == 1], rtol=0, atol=1e-5 * np.abs(expected).max())


def test_tiny_tokenizer_has_single_token_letters_and_a_chat_template():
    tokenizer = moe_local.load("tiny", backend="torch").tokenizer
    for letter in "ABCD":
        assert len(tokenizer.encode(" " + letter, add_special_tokens=False)) == 1
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_grove_is_the_upcycled_twin_and_follows_the_reference_formula():
    from safetensors.torch import load_file
    from test_grove import _transcribed_model

    folder = BUILTIN_MODELS["tiny-grove"]
    grove = moe_local.load("tiny-grove", backend="torch")
    assert grove.spec.family == "grove_moe"
    assert all(m.grove == GroveSpec(experts_per_group=2, adjugate_size=32, scale=0.05) for m in grove.spec.moe)
    plain, twin = (
        load_file(str(BUILTIN_MODELS["tiny"] / "model.safetensors")),
        load_file(str(folder / "model.safetensors")),
    )
    assert set(plain) < set(twin)
    assert {k.split(".mlp.")[1].split(".")[0] for k in set(twin) - set(plain)} == {"chunk_experts", "expert_bias"}
    ids, mask = left_padded(grove.tokenizer, suite_prompts(4))
    ids = ids[:, -int(mask.sum(1).min()) :]  # the transcription takes unpadded rows
    with torch.no_grad():
        reference = _transcribed_model(folder)(torch.as_tensor(ids)).logits.numpy()
    scale = np.abs(reference).max()
    np.testing.assert_allclose(grove.logits(ids), reference, rtol=0, atol=1e-5 * scale)
    mlx = moe_local.load("tiny-grove", backend="mlx")
    np.testing.assert_allclose(mlx.logits(ids), reference, rtol=0, atol=1e-4 * scale)


@pytest.mark.slow
def test_demo_on_the_embedded_default_shows_the_routing_gap_and_its_repair(tmp_path):
    """Seed 0 of the shipped demo on `tiny`: unseen phrasings are misrouted and near chance; tuning only
    the last two routers on the reference set repairs most of it (README has the 3-seed numbers)."""
    out, rows = demo.run_demo(
        tmp_path / "run", backend="torch", models=("tiny",), seed=0, progress="off", log=lambda *_: None
    )
    acc = {(r["split"], r["method"]): r["accuracy"] for r in rows}
    assert acc["test_seen", "base"] > 0.8
    assert acc["test_unseen", "base"] < 0.4
    assert acc["test_unseen", "roma"] >= acc["test_unseen", "base"] + 0.05
    assert acc["test_unseen", "router"] >= acc["test_unseen", "base"] + 0.05
    assert (out / "adapters" / "tiny-roma").is_dir() and (out / "report.png").is_file()


@pytest.mark.slow
def test_asset_scripts_run_end_to_end_on_a_miniature(tmp_path):
    """scripts/train_tiny.py, fresh and --grove-from, at a miniature size: the checkpoints they write load
    (the script itself checks transformers' and moe-local's logits against its own model)."""
    import subprocess

    script = str(ROOT / "scripts" / "train_tiny.py")
    small = [
        "--steps",
        "2",
        "--batch",
        "4",
        "--hidden",
        "32",
        "--heads",
        "2",
        "--expert-size",
        "16",
        "--eval-every",
        "1000",
    ]
    for extra, out in (([], "plain"), (["--grove-from", str(tmp_path / "plain"), "--adjugate-size", "8"], "grove")):
        done = subprocess.run(
            [sys.executable, script, "--out", str(tmp_path / out), *small, *extra],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-2000:]
    grove = moe_local.load(tmp_path / "grove", backend="torch")
    assert grove.spec.moe[0].grove == GroveSpec(experts_per_group=2, adjugate_size=8, scale=0.05)
    meta = json.loads((tmp_path / "grove" / "train_meta.json").read_text())
    assert meta["args"]["grove_from"] == str(tmp_path / "plain") and meta["params"] > 0
