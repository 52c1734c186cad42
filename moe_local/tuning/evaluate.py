"""Multiple-choice accuracy (overall and per task, ``acc`` and ``acc_norm``) and the oracle-routing gap
with its control.

``acc`` counts records whose highest-scoring candidate is the answer; ``acc_norm`` divides each score by
the candidate's length in characters first (lm-eval's metrics; data.py says what the candidates are in
each format, and in mc the two are equal).

Oracle (docs/methods.md): per sample, additive offsets on the tuned layers' router logits at the last prompt
token, optimised by Adam on the CE of the true label (``oracle_steps`` steps, ``oracle_lr``); top-k is
re-selected at every step because each step re-routes with the offset logits. Its control
``oracle_wrong`` aims the same optimisation at a random wrong label and reports the share of samples
that end on that label (much of an oracle gain on unsure samples is steerability); like the
oracle's accuracy it counts samples that were there before the steps (compare each with the base).
Offsets are per sample and Adam is elementwise, so optimising a batch at once equals optimising
each sample alone (the loss is a sum over samples).

C3PO (``c3po``, tuning/c3po.py): after each batch's plain pass, its routing at the tuned layers is
re-mixed toward the bank's successful neighbours and the batch is scored again with the re-mix imposed;
the row ``c3po`` carries the extra seconds per sample this took (``seconds_per_sample``), next to the
plain pass's (``base_seconds_per_sample``), both measured on this process.

Under torchrun (``dist``, moe_local/distributed.py) each rank evaluates the records it owns and the
per-record predictions are summed across ranks (zero where a rank does not own a record), so every
count — overall, per task, oracle — is taken over the whole file, as one process takes it.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field

import numpy as np

from ..distributed import LOCAL
from ..errors import UserError
from ..progress import Progress
from . import roma
from .c3po import check_routers
from .data import MISSING_SCORE, Record, batches, norm_predictions, predictions
from .lengths import encode_fitting
from .optim import adam
from .tasks import Prompting

NO_TASK = "(none)"


@dataclass
class Accuracy:
    accuracy: float
    n: int
    per_task: dict = field(default_factory=dict)  # task -> (accuracy, n)

    @classmethod
    def of(cls, hits: np.ndarray, records: list[Record]) -> Accuracy:
        tasks: dict[str, list] = {}
        for hit, r in zip(hits, records):
            tasks.setdefault(r.task or NO_TASK, []).append(bool(hit))
        per_task = {t: (float(np.mean(v)), len(v)) for t, v in sorted(tasks.items())}
        return cls(float(np.mean(hits)) if len(hits) else 0.0, len(hits), per_task)


@dataclass
class EvalResult:
    accuracy: Accuracy
    predictions: np.ndarray
    oracle: Accuracy | None = None
    oracle_wrong: Accuracy | None = None  # the share flipped to the random wrong label
    layers: tuple = ()
    format: str = "mc"
    accuracy_norm: Accuracy | None = None  # acc_norm
    norm_predictions: np.ndarray | None = None
    scores: np.ndarray | None = None  # [records, widest] summed log-probabilities, MISSING_SCORE past the choices
    oracle_norm: Accuracy | None = None
    oracle_wrong_norm: Accuracy | None = None
    c3po: Accuracy | None = None
    c3po_norm: Accuracy | None = None
    c3po_scores: np.ndarray | None = None  # [records, widest], as ``scores``
    c3po_predictions: np.ndarray | None = None
    c3po_routing: np.ndarray | None = None  # [records, layers, E]: the re-mix imposed on each record
    seconds_per_sample: float = 0.0  # the plain pass (prefix + suffix), this process
    c3po_seconds_per_sample: float = 0.0  # C3PO's extra: neighbour search, re-mix, second suffix pass

    def rows(self, model: str, split: str, method: str, seed: int, backend: str) -> list[dict]:
        """Report rows (docs/architecture.md, reports)."""
        row = functools.partial(_row, model, split, seed=seed, backend=backend, format=self.format)
        out = [row(method, self.accuracy, self.accuracy_norm)]
        if self.oracle is not None:
            out.append(row("oracle", self.oracle, self.oracle_norm))
            out.append(row("oracle_wrong", self.oracle_wrong, self.oracle_wrong_norm))
        if self.c3po is not None:
            out.append(
                row(c3po_name(method), self.c3po, self.c3po_norm)
                | {
                    "seconds_per_sample": self.c3po_seconds_per_sample,
                    "base_seconds_per_sample": self.seconds_per_sample,
                }
            )
        return out


def c3po_name(method: str) -> str:
    """C3PO's row: ``c3po`` on the base model, ``METHOD+c3po`` on an adapter."""
    return "c3po" if method == "base" else f"{method}+c3po"


def _row(model, split, method, acc: Accuracy, acc_norm: Accuracy | None, seed, backend, format) -> dict:
    return {
        "model": str(model),
        "split": split,
        "method": method,
        "format": format,
        "accuracy": acc.accuracy,
        "acc_norm": (acc_norm or acc).accuracy,
        "n": acc.n,
        "seed": int(seed),
        "backend": backend,
    }


@contextlib.contextmanager
def router_weights_applied(model, weights: dict | None):
    """Install gate weights for the duration (as an adapter loaded at startup would), then restore."""
    if not weights:
        yield
        return
    saved = model.get_router_weights([model.spec.names.layer_of_router(k) for k in weights])
    model.set_router_weights(weights)
    try:
        yield
    finally:
        model.set_router_weights(saved)


def _ce_loss(scores, routing, onehot):
    ce = roma.candidate_ce(scores, onehot)
    return ce.sum(), {"ce": ce}


def oracle_scores(model, hidden, batch, layers, targets, steps: int, lr: float) -> np.ndarray:
    """Candidate scores after ``steps`` Adam steps on per-sample router-logit offsets toward ``targets``."""
    experts = model.spec.moe_at(layers[0]).num_experts
    opt = adam({"offsets": np.zeros((batch.size, len(layers), experts), np.float32)}, lr)
    onehot = batch.answer_onehot(targets)
    for _ in range(steps):
        _, _, grad = model.suffix_value_and_grad(
            hidden, batch, layers[0], layers, _ce_loss, {"onehot": onehot}, offsets=opt.params["offsets"], wrt="offsets"
        )
        opt.step({"offsets": grad})
    scores, _ = model.suffix_scores(hidden, batch, layers[0], layers, offsets=opt.params["offsets"])
    return scores


def oracle_predictions(model, hidden, batch, layers, targets, steps: int, lr: float) -> np.ndarray:
    """Predictions after ``steps`` Adam steps on per-sample router-logit offsets toward ``targets``."""
    return predictions(oracle_scores(model, hidden, batch, layers, targets, steps, lr))


def wrong_labels(records: list[Record], seed: int) -> np.ndarray:
    """One random wrong answer per record (reproducible from the seed)."""
    rng = np.random.default_rng([seed, 1])
    n = np.array([len(r.choices) for r in records])
    answers = np.array([r.answer for r in records])
    return (answers + rng.integers(1, n)) % n


def check_finite(scores, routing, batch, records: list[Record], data_file=None) -> None:
    """Stop at the first record whose candidate scores or routing are NaN or infinite, naming its line."""
    bad = ~np.isfinite(scores).all(-1)
    if routing is not None:
        bad |= ~np.isfinite(routing.reshape(len(routing), -1)).all(-1)
    if bad.any():
        record = records[int(batch.index[np.argmax(bad)])]
        where = record.where or f"{data_file or 'data'}:{record.line}"
        raise UserError(f"{where}: the model's scores for this record are NaN or infinite (are its weights corrupt?)")


def c3po_pass(model, hidden, batch, layers, c3po) -> tuple[np.ndarray, np.ndarray]:
    """(candidate scores, the routing imposed) with C3PO's re-mix at the tuned layers."""
    remix = (c3po.targets(batch.index), c3po.alpha)
    return model.suffix_scores(hidden, batch, layers[0], layers, remix=remix)


def evaluate(
    model,
    records: list[Record],
    layers=None,
    batch_size: int = 32,
    router_weights: dict | None = None,
    oracle: bool = False,
    oracle_steps: int = 20,
    oracle_lr: float = 0.1,
    seed: int = 0,
    progress="auto",
    dist=LOCAL,
    data_file=None,
    prompting: Prompting | None = None,
    c3po=None,
) -> EvalResult:
    """Accuracy of ``model`` (with ``router_weights`` applied for the duration, if given) on ``records``.

    ``layers``: the tuned layers (tuple), how many last MoE layers, or None (roma.tuned_layers' default);
    the oracle's offsets go there.
    ``prompting``: the format and few-shot examples (tasks.Prompting; default mc, none).
    ``c3po``: a :class:`moe_local.tuning.c3po.C3PO` over ``records`` (its bank's layers are ``layers``).
    ``dist``: the torchrun process group; every rank returns the result over all records.
    """
    if isinstance(layers, int) and not oracle:  # without the oracle the layers only pick where to split
        layers = min(layers, len(model.spec.moe))
    layers = roma.tuned_layers(model.spec, layers, oracle=True)
    if c3po is not None:
        check_routers(model.spec, layers)
    prompting = prompting or Prompting()
    encoded = encode_fitting(model, records, data_file, prompting)
    wrong = wrong_labels(records, seed)
    rows = dist.owned(len(records))
    label = "eval" + (f" {prompting.format}" if prompting.format != "mc" else "") + (" + oracle" if oracle else "")
    label += " + c3po" if c3po is not None else ""
    bar = Progress(len(rows), label, progress if dist.is_main else "off", unit="records")
    widest = max(len(r.choices) for r in records)
    passes = ["base"] + (["oracle", "oracle_wrong"] if oracle else []) + (["c3po"] if c3po is not None else [])
    scores = {name: np.zeros((len(records), widest), np.float32) for name in passes}
    experts = model.spec.moe_at(layers[0]).num_experts
    remixed = np.zeros((len(records), len(layers), experts) if c3po is not None else (0,), np.float32)
    seconds = {"base": 0.0, "c3po": 0.0}
    with router_weights_applied(model, router_weights):
        for batch in batches(encoded, rows, batch_size):
            start = time.perf_counter()
            hidden = model.prefix_hidden(batch, layers[0])
            found, _ = model.suffix_scores(hidden, batch, layers[0], layers)
            seconds["base"] += time.perf_counter() - start
            check_finite(found, None, batch, records, data_file)
            width = found.shape[1]
            scores["base"][batch.index, :width] = found
            if oracle:
                steer = functools.partial(oracle_scores, model, hidden, batch, layers, steps=oracle_steps, lr=oracle_lr)
                scores["oracle"][batch.index, :width] = steer(batch.answers)
                scores["oracle_wrong"][batch.index, :width] = steer(wrong[batch.index])
            if c3po is not None:
                start = time.perf_counter()
                scores["c3po"][batch.index, :width], remixed[batch.index] = c3po_pass(
                    model, hidden, batch, layers, c3po
                )
                seconds["c3po"] += time.perf_counter() - start
            bar.update(batch.size)
    bar.close()
    summed = dist.sum([scores[name] for name in passes] + [remixed])
    result = _result(dict(zip(passes, summed[: len(passes)])), encoded, records, wrong, layers, prompting.format)
    result.seconds_per_sample = seconds["base"] / max(len(rows), 1)
    if c3po is not None:
        result.c3po_routing = summed[-1]
        result.c3po_seconds_per_sample = seconds["c3po"] / max(len(rows), 1)
    return result


def _result(scores: dict, encoded, records, wrong, layers, format) -> EvalResult:
    """Accuracies from each pass's summed scores {pass: [records, widest]}."""
    answers = np.array([r.answer for r in records])
    index = np.arange(len(records))
    n = np.array([len(r.choices) for r in records])
    past_choices = np.arange(scores["base"].shape[-1])[None, :] >= n[:, None]
    found = {}
    for name, s in scores.items():
        s[past_choices] = MISSING_SCORE
        found[name] = (predictions(s), norm_predictions(s, encoded, index))
    preds, norm = found["base"]
    result = EvalResult(
        Accuracy.of(preds == answers, records),
        preds,
        layers=layers,
        format=format,
        accuracy_norm=Accuracy.of(norm == answers, records),
        norm_predictions=norm,
        scores=scores["base"],
    )
    if "oracle" in found:
        (oracle, oracle_norm), (flipped, flipped_norm) = found["oracle"], found["oracle_wrong"]
        result.oracle = Accuracy.of(oracle == answers, records)
        result.oracle_norm = Accuracy.of(oracle_norm == answers, records)
        result.oracle_wrong = Accuracy.of(flipped == wrong, records)
        result.oracle_wrong_norm = Accuracy.of(flipped_norm == wrong, records)
    if "c3po" in found:
        c3po, c3po_norm = found["c3po"]
        result.c3po = Accuracy.of(c3po == answers, records)
        result.c3po_norm = Accuracy.of(c3po_norm == answers, records)
        result.c3po_scores = scores["c3po"]
        result.c3po_predictions = c3po
    return result


def format_result(result: EvalResult, method: str) -> list[str]:
    """What eval prints: accuracy (and, in rc, acc_norm) overall, the oracle, then per task."""
    rc = result.format != "mc" and result.accuracy_norm is not None
    norm = f", acc_norm {result.accuracy_norm.accuracy:.4f}" if rc else ""
    lines = [f"{method}: accuracy {result.accuracy.accuracy:.4f}{norm} (n={result.accuracy.n}, {result.format})"]
    if result.oracle is not None:
        lines.append(
            f"oracle: accuracy {result.oracle.accuracy:.4f}; oracle_wrong (flipped to a random wrong "
            f"label): {result.oracle_wrong.accuracy:.4f}"
        )
    tasks = result.accuracy.per_task
    if len(tasks) > 1 or NO_TASK not in tasks:
        for task, (acc, n) in tasks.items():
            extra = ""
            if result.oracle is not None:
                extra = (
                    f"  oracle {result.oracle.per_task[task][0]:.4f}  "
                    f"oracle_wrong {result.oracle_wrong.per_task[task][0]:.4f}"
                )
            if rc:
                extra = f"  acc_norm {result.accuracy_norm.per_task[task][0]:.4f}" + extra
            lines.append(f"  {task}: {acc:.4f} (n={n}){extra}")
    if result.c3po is not None:
        norm = f", acc_norm {result.c3po_norm.accuracy:.4f}" if rc else ""
        lines.append(
            f"{c3po_name(method)}: accuracy {result.c3po.accuracy:.4f}{norm}; "
            f"{result.c3po_seconds_per_sample * 1000:.1f} ms per sample on top of the plain pass's "
            f"{result.seconds_per_sample * 1000:.1f} ms"
        )
    return lines
