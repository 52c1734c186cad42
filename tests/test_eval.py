"""Evaluation: accuracy per task, the oracle and its wrong-label control, reports, the eval command."""

import json

import numpy as np
import pytest

import moe_local
from moe_local.errors import UserError
from moe_local.tuning import data, tune
from moe_local.tuning.evaluate import evaluate, oracle_predictions, wrong_labels

from helpers import BACKENDS, answerable, run_main, task_records, unit_rows, write_jsonl

ROW_KEYS = ["acc_norm", "accuracy", "backend", "format", "method", "model", "n", "seed", "split"]


def _records(rows):
    return [data.parse_record(r, "t", i + 1) for i, r in enumerate(rows)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_accuracy_per_task_and_oracle(backend, olmoe_dir):
    m = moe_local.load(str(olmoe_dir), backend=backend)
    records = _records(answerable(m, task_records(8, seed=4)))
    result = evaluate(m, records, layers=2, batch_size=3, oracle=True, oracle_steps=4, oracle_lr=0.1, progress="off")
    hits = result.predictions == np.array([r.answer for r in records])
    assert hits[::2].all()  # answerable() made these the model's own answers
    assert result.accuracy.accuracy == hits.mean() and result.accuracy.n == 8
    assert set(result.accuracy.per_task) == {"add", "larger"}
    assert result.accuracy.per_task["add"] == (float(hits[::2].mean()), 4)
    # steering the tuned routers' last-token logits toward the true label can only help here
    assert result.oracle.accuracy >= result.accuracy.accuracy
    # the control: the same steps aimed at each record's random wrong label, counted against that label
    wrong = wrong_labels(records, 0)
    steered = np.zeros(8, np.int64)
    for batch in data.batches(data.encode_records(m.tokenizer, records), np.arange(8), 3):
        hidden = m.prefix_hidden(batch, result.layers[0])
        steered[batch.index] = oracle_predictions(m, hidden, batch, result.layers, wrong[batch.index], 4, 0.1)
    assert result.oracle_wrong.accuracy == (steered == wrong).mean()
    assert result.oracle_wrong.per_task["add"] == (float((steered == wrong)[::2].mean()), 4)
    # with no steps the oracle is the model itself
    zero = evaluate(m, records, layers=2, oracle=True, oracle_steps=0, progress="off")
    assert zero.oracle.accuracy == zero.accuracy.accuracy
    assert zero.oracle_wrong.accuracy == (zero.predictions == wrong_labels(records, 0)).mean()


@pytest.mark.parametrize("backend", BACKENDS)
def test_oracle_steps_lower_each_samples_ce_and_reselect_experts(backend, olmoe_dir):
    from moe_local.tuning.evaluate import _ce_loss
    from moe_local.tuning.optim import adam

    m = moe_local.load(str(olmoe_dir), backend=backend)
    records = _records(task_records(6, seed=7))
    batch = data.make_batch(data.encode_records(m.tokenizer, records), np.arange(6))
    layers = (2, 3)
    hidden = m.prefix_hidden(batch, 2)
    opt = adam({"x": np.zeros((6, 2, 8), np.float32)}, 0.1)
    first = None
    for _ in range(20):
        _, aux, grad = m.suffix_value_and_grad(
            hidden,
            batch,
            2,
            layers,
            _ce_loss,
            {"onehot": batch.answer_onehot()},
            offsets=opt.params["x"],
            wrt="offsets",
        )
        first = aux if first is None else first
        opt.step({"x": grad})
    scores, routing = m.suffix_scores(hidden, batch, 2, layers, offsets=opt.params["x"])
    after = np.logaddexp.reduce(scores.astype(np.float64), axis=-1) - scores[np.arange(6), batch.answers]
    assert (after < first["ce"]).all()

    def top2(r):
        return np.sort(np.argsort(-r, axis=-1)[..., :2], axis=-1)

    assert (top2(routing) != top2(first["routing"])).any()  # top-k re-selected under the offsets


def test_oracle_layers_beyond_the_model_name_the_oracle(olmoe_dir):
    m = moe_local.load(str(olmoe_dir), backend="torch")
    records = _records(task_records(2))
    with pytest.raises(UserError, match=r"has 4 MoE layers; the oracle cannot steer the last 9 \(give --layers 4"):
        evaluate(m, records, layers=9, oracle=True, progress="off")
    with pytest.raises(UserError, match="--layers must be at least 1, got 0"):
        evaluate(m, records, layers=0, progress="off")


def test_wrong_labels_are_wrong_and_reproducible():
    records = _records(task_records(50, seed=1))
    wrong = wrong_labels(records, seed=0)
    assert all(w != r.answer and 0 <= w < len(r.choices) for w, r in zip(wrong, records))
    np.testing.assert_array_equal(wrong, wrong_labels(records, seed=0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_router_weights_are_applied_for_the_duration_only(backend, olmoe_dir, tmp_path):
    m = moe_local.load(str(olmoe_dir), backend=backend)
    records = _records(answerable(m, task_records(8, seed=5)))
    base = m.get_router_weights()
    result = tune.tune(
        m,
        records,
        unit_rows(8),
        tune.TuneSettings(layers=2, lr=0.1, epochs=1, batch_size=4),
        tmp_path / "A",
        progress="off",
    )
    tuned = evaluate(m, records, layers=2, router_weights=result.weights, progress="off")
    for name, w in m.get_router_weights().items():
        np.testing.assert_array_equal(w, base[name])
    loaded = moe_local.load(str(olmoe_dir), backend=backend, adapter_path=tmp_path / "A")
    np.testing.assert_array_equal(evaluate(loaded, records, layers=2, progress="off").predictions, tuned.predictions)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_command_report(backend, olmoe_dir, tmp_path, capsys):
    m = moe_local.load(str(olmoe_dir), backend=backend)
    path = write_jsonl(tmp_path / "val.jsonl", answerable(m, task_records(6, seed=6)))
    report = tmp_path / "report.json"
    r = run_main(
        capsys,
        "eval",
        "--model",
        olmoe_dir,
        "--data",
        path,
        "--layers",
        2,
        "--oracle",
        "--oracle-steps",
        3,
        "--report",
        report,
        "--backend",
        backend,
    )
    assert r[0] == 0, r[2]
    assert "base: accuracy" in r[1] and "  add:" in r[1] and "oracle_wrong" in r[1]
    rows = json.loads(report.read_text())
    assert [row["method"] for row in rows] == ["base", "oracle", "oracle_wrong"]
    for row in rows:
        assert sorted(row) == ROW_KEYS
        assert row["split"] == "val" and row["n"] == 6 and row["backend"] == backend and row["seed"] == 0
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["format"] == "mc" and row["acc_norm"] == row["accuracy"]  # letters: one character each
    r = run_main(
        capsys, "eval", "--model", olmoe_dir, "--data", path, "--layers", 2, "--report", report, "--backend", backend
    )
    assert r[0] == 0, r[2]
    assert len(json.loads(report.read_text())) == 4  # appended to the existing report
    other = tmp_path / "notes.json"
    other.write_text('{"mine": 1}')
    r = run_main(
        capsys, "eval", "--model", olmoe_dir, "--data", path, "--layers", 2, "--report", other, "--backend", backend
    )
    assert r[0] == 2 and "not a moe-local report" in r[2]
    assert other.read_text() == '{"mine": 1}'


def test_eval_command_bad_inputs(olmoe_dir, qwen3_dir, tmp_path, capsys):
    m = moe_local.load(str(olmoe_dir), backend="torch")
    records = _records(answerable(m, task_records(4)))
    tune.tune(
        m, records, unit_rows(4), tune.TuneSettings(layers=2, epochs=1, batch_size=4), tmp_path / "A", progress="off"
    )
    path = write_jsonl(tmp_path / "val.jsonl", task_records(4))
    r = run_main(capsys, "eval", "--model", qwen3_dir, "--data", path, "--adapter-path", tmp_path / "A")
    assert r[0] == 2 and "made for another model" in r[2] and "Traceback" not in r[2]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(task_records(1)[0]) + "\n\n{oops\n")
    r = run_main(capsys, "eval", "--model", olmoe_dir, "--data", bad)
    assert r[0] == 2 and f"{bad}:3: not valid JSON" in r[2]
    (tmp_path / "notes").mkdir()
    r = run_main(capsys, "eval", "--model", olmoe_dir, "--data", path, "--adapter-path", tmp_path / "notes")
    assert r[0] == 2 and "is not a router adapter" in r[2]
    other = tmp_path / "notes.json"
    other.write_text('{"mine": 1}')
    r = run_main(capsys, "eval", "--model", tmp_path / "no-model", "--data", bad, "--oracle", "--report", other)
    assert r[0] == 2 and "not a moe-local report" in r[2]  # refused before the model, the data, any pass
    for flag, value in (("--batch-size", 0), ("--oracle-steps", -1), ("--oracle-lr", 0), ("--layers", 0)):
        r = run_main(capsys, "eval", "--model", olmoe_dir, "--data", path, flag, value)
        assert r[0] == 2 and f"Invalid value for '{flag}'" in r[2], (flag, r[2])


def test_adapter_eval_reports_its_method(olmoe_dir, tmp_path, capsys):
    m = moe_local.load(str(olmoe_dir), backend="torch")
    records = _records(answerable(m, task_records(4)))
    tune.tune(
        m,
        records,
        unit_rows(4),
        tune.TuneSettings(method="router", layers=2, epochs=1, batch_size=4),
        tmp_path / "A",
        progress="off",
    )
    path = write_jsonl(tmp_path / "test.jsonl", task_records(4))
    r = run_main(
        capsys,
        "eval",
        "--model",
        olmoe_dir,
        "--data",
        path,
        "--adapter-path",
        tmp_path / "A",
        "--report",
        tmp_path / "r.json",
    )
    assert r[0] == 0, r[2]
    assert json.loads((tmp_path / "r.json").read_text())[0]["method"] == "router"


@pytest.mark.parametrize("command", ["eval", "prepare", "tune"])
def test_a_prompt_over_the_context_is_refused_naming_its_line(command, qwen3_dir, tmp_path, capsys):
    rows = task_records(3)
    rows[1] = dict(rows[1], question="fox " * 300)  # about 300 tokens; the context is 256
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    np.save(tmp_path / "train.npy", unit_rows(3))
    extra = {"eval": [], "prepare": ["--bank", tmp_path / "B"], "tune": ["--adapter-path", tmp_path / "A"]}[command]
    code, out, err = run_main(capsys, command, "--model", qwen3_dir, "--data", path, "--layers", 1, *extra)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{path}:2: the prompt is over 256 tokens" in err and "the model's context is 256 tokens" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl", "train.npy"]


def test_few_shot_examples_count_toward_the_context(qwen3_dir, tmp_path, capsys):
    """Each record fits alone; asked after three worked examples, none does (the context is 256 tokens)."""
    rows = [dict(r, question=f"{i} " + "fox " * 70) for i, r in enumerate(task_records(5))]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    code, out, err = run_main(capsys, "eval", "--model", qwen3_dir, "--data", path)
    assert code == 0, err
    code, out, err = run_main(capsys, "eval", "--model", qwen3_dir, "--data", path, "--num-fewshot", 3)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{path}:1: the prompt is over 256 tokens" in err, err


class CountingTokenizer:
    """The model's own tokenizer, counting the characters it is given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.chars = tokenizer, 0

    def __call__(self, text, *args, **kwargs):
        self.chars += len(text) if isinstance(text, str) else sum(map(len, text))
        return self.tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_huge_question_is_refused_without_tokenizing_it_all(qwen3_dir):
    m = moe_local.load(qwen3_dir, backend="torch")
    counting = m._tokenizer = CountingTokenizer(m.tokenizer)
    rows = task_records(2)
    rows[1] = dict(rows[1], question="What is seven plus eight? " * 40000)  # 1 MB
    with pytest.raises(UserError, match="t:2: the prompt is over 256 tokens"):
        evaluate(m, _records(rows), progress="off", data_file="t")
    assert counting.chars < 10_000  # a few pieces of it, not the megabyte


def test_progress_bar_counts_records(olmoe_dir, capsys):
    m = moe_local.load(str(olmoe_dir), backend="torch")
    evaluate(m, _records(task_records(3)), layers=2, batch_size=1, progress="bar")
    err = capsys.readouterr().err
    assert "eval:" in err and "records/s" in err and "3/3" in err
