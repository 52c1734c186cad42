"""``moe-local demo`` mechanics on stand-in assets (tiny random models, a small synthetic suite).

The pipeline, the files it writes and its refusals are checked quickly here; what the real embedded
default shows is not (these stand-ins are random).
"""

import json

import numpy as np
import pytest

import moe_local
from moe_local import checkpoint, demo

import checkpoints
from helpers import answerable, run_main, single_token_letters_tokenizer, task_records, unit_rows, write_jsonl


@pytest.fixture(scope="module")
def stand_in_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    models = {
        "tiny": checkpoints.make_qwen3_moe(root / "tiny", seed=7, tokenizer=False),
        "tiny-grove": checkpoints.make_grove(root / "tiny-grove", seed=7, tokenizer=False),
    }
    for folder in models.values():
        single_token_letters_tokenizer(folder, 128)
    suite = root / "suite"
    suite.mkdir()
    base = moe_local.load(models["tiny"], backend="torch")
    for i, (split, n) in enumerate({"train": 24, "test_seen": 10, "test_unseen": 9}.items()):
        rows = answerable(base, task_records(n, seed=i)) if split == "train" else task_records(n, seed=i)
        write_jsonl(suite / f"{split}.jsonl", rows)
        np.save(suite / f"{split}.npy", unit_rows(n, seed=i).astype(np.float16))
    (root / "demo.yaml").write_text(
        "tune: {layers: 2, k: 2, lam: 1.0, sigma: 0.5, lr: 0.01, epochs: 1, batch_size: 8, lam_warmup: 0}\n"
        "eval_splits: [test_seen, test_unseen]\noracle_steps: 3\nbatch_size: 8\n"
        "models: {tiny-grove: {layers: 1}}\n"
    )
    return root, models


@pytest.fixture
def assets(stand_in_assets, monkeypatch):
    root, models = stand_in_assets
    monkeypatch.setattr(demo, "SUITE", root / "suite")
    monkeypatch.setattr(demo, "SETTINGS_FILE", root / "demo.yaml")
    for name, folder in models.items():
        monkeypatch.setitem(checkpoint.BUILTIN_MODELS, name, folder)
    return root


def test_demo_writes_report_rows_tables_plot_and_adapters(assets, tmp_path):
    out, rows = demo.run_demo(tmp_path / "run", backend="torch", seed=3, progress="off", log=lambda *_: None)
    assert json.loads((out / "report.json").read_text()) == rows
    keys = ("acc_norm", "accuracy", "backend", "format", "method", "model", "n", "seed", "split")
    assert {tuple(sorted(r)) for r in rows} == {keys}
    assert all(r["format"] == "mc" and r["acc_norm"] == r["accuracy"] for r in rows)  # letters: one character
    for model in ("tiny", "tiny-grove"):
        for split, n in (("test_seen", 10), ("test_unseen", 9)):
            got = {r["method"]: r for r in rows if r["model"] == model and r["split"] == split}
            assert sorted(got) == ["base", "oracle", "oracle_wrong", "roma", "router"]
            assert all(r["n"] == n and r["seed"] == 3 and r["backend"] == "torch" for r in got.values())
            assert all(0 <= r["accuracy"] <= 1 for r in got.values())
        for method in ("router", "roma"):
            config = json.loads((out / "adapters" / f"{model}-{method}" / "adapter_config.json").read_text())
            assert config["moe_local"]["method"] == method
            assert len(config["moe_local"]["layers"]) == (2 if model == "tiny" else 1)
    assert "| tiny | test_unseen | 9 |" in (out / "report.md").read_text()
    assert (out / "report.png").stat().st_size > 10_000
    usage = json.loads((out / "usage.json").read_text())
    assert np.allclose(np.asarray(usage["tiny"]["roma"]).sum(-1), 1.0)
    assert not list(tmp_path.glob(".run.partial-*"))


def test_demo_command_refuses_an_existing_folder(assets, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    code, _, err = run_main(capsys, "demo", "--out", tmp_path / "mine", "--model", "tiny", "--backend", "torch")
    assert code == 2 and "exists and is not empty" in err
    assert (tmp_path / "mine" / "keep.txt").read_text() == "x"


def test_demo_command_runs_one_model(assets, tmp_path, capsys):
    code, out, err = run_main(
        capsys, "demo", "--out", tmp_path / "one", "--model", "tiny", "--backend", "torch", "--progress", "off"
    )
    assert code == 0, err
    assert "| tiny | test_unseen | 9 |" in out
    assert {r["model"] for r in json.loads((tmp_path / "one" / "report.json").read_text())} == {"tiny"}


def test_missing_assets_are_a_clear_error(assets, monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "SUITE", tmp_path / "nowhere")
    with pytest.raises(moe_local.UserError, match="split 'train' is not installed"):
        demo.run_demo(tmp_path / "x", backend="torch", models=("tiny",), progress="off", log=lambda *_: None)
    assert not (tmp_path / "x").exists()
