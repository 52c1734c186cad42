"""Multiple-choice accuracy (overall and per task) and the oracle-routing gap with its control.

Oracle (docs/methods.md): per sample, additive offsets on the tuned layers' router logits at the last prompt
token, optimised by Adam on the CE of the true label (``oracle_steps`` steps, ``oracle_lr``); top-k is
re-selected at every step because each step re-routes with the offset logits. Its control
``oracle_wrong`` aims the same optimisation at a random wrong label and reports the share of samples
that end on that label (much of an oracle gain on unsure samples is steerability); like the
oracle's accuracy it counts samples that were there before the steps (compare each with the base).
Offsets are per sample and Adam is elementwise, so optimising a batch at once equals optimising
each sample alone (the loss is a sum over samples).

Under torchrun (``dist``, moe_local/distributed.py) each rank evaluates the records it owns and the
per-record predictions are summed across ranks (zero where a rank does not own a record), so every
count — overall, per task, oracle — is taken over the whole file, as one process takes it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np

from ..distributed import LOCAL
from ..errors import UserError
from ..progress import Progress
from . import roma
from .data import Record, batches, predictions
from .lengths import encode_fitting
from .optim import adam

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

    def rows(self, model: str, split: str, method: str, seed: int, backend: str) -> list[dict]:
        """Report rows (docs/architecture.md, reports)."""
        out = [_row(model, split, method, self.accuracy, seed, backend)]
        if self.oracle is not None:
            out.append(_row(model, split, "oracle", self.oracle, seed, backend))
            out.append(_row(model, split, "oracle_wrong", self.oracle_wrong, seed, backend))
        return out


def _row(model, split, method, acc: Accuracy, seed, backend) -> dict:
    return {
        "model": str(model),
        "split": split,
        "method": method,
        "accuracy": acc.accuracy,
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


def oracle_predictions(model, hidden, batch, layers, targets, steps: int, lr: float) -> np.ndarray:
    """Predictions after ``steps`` Adam steps on per-sample router-logit offsets toward ``targets``."""
    experts = model.spec.moe_at(layers[0]).num_experts
    opt = adam({"offsets": np.zeros((batch.size, len(layers), experts), np.float32)}, lr)
    onehot = batch.answer_onehot(targets)
    for _ in range(steps):
        _, _, grad = model.suffix_value_and_grad(
            hidden, batch, layers[0], layers, _ce_loss, {"onehot": onehot}, offsets=opt.params["offsets"], wrt="offsets"
        )
        opt.step({"offsets": grad})
    scores, _ = model.suffix_scores(hidden, batch, layers[0], layers, offsets=opt.params["offsets"])
    return predictions(scores)


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
        raise UserError(
            f"{data_file or 'data'}:{record.line}: the model's scores for this record are NaN or "
            "infinite (are its weights corrupt?)"
        )


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
) -> EvalResult:
    """Accuracy of ``model`` (with ``router_weights`` applied for the duration, if given) on ``records``.

    ``layers``: the tuned layers (tuple), how many last MoE layers, or None (roma.tuned_layers' default);
    the oracle's offsets go there.
    ``dist``: the torchrun process group; every rank returns the result over all records.
    """
    if isinstance(layers, int) and not oracle:  # without the oracle the layers only pick where to split
        layers = min(layers, len(model.spec.moe))
    layers = roma.tuned_layers(model.spec, layers, oracle=True)
    encoded = encode_fitting(model, records, data_file)
    answers = np.array([r.answer for r in records])
    wrong = wrong_labels(records, seed)
    preds = np.zeros(len(records), np.int64)
    oracle_preds = np.zeros(len(records), np.int64)
    wrong_preds = np.zeros(len(records), np.int64)
    rows = dist.owned(len(records))
    bar = Progress(len(rows), "eval" + (" + oracle" if oracle else ""), progress if dist.is_main else "off")
    with router_weights_applied(model, router_weights):
        for batch in batches(encoded, rows, batch_size):
            hidden = model.prefix_hidden(batch, layers[0])
            scores, _ = model.suffix_scores(hidden, batch, layers[0], layers)
            check_finite(scores, None, batch, records, data_file)
            preds[batch.index] = predictions(scores)
            if oracle:
                oracle_preds[batch.index] = oracle_predictions(
                    model, hidden, batch, layers, batch.answers, oracle_steps, oracle_lr
                )
                wrong_preds[batch.index] = oracle_predictions(
                    model, hidden, batch, layers, wrong[batch.index], oracle_steps, oracle_lr
                )
            bar.update(batch.size)
    bar.close()
    preds, oracle_preds, wrong_preds = dist.sum([preds, oracle_preds, wrong_preds])
    result = EvalResult(Accuracy.of(preds == answers, records), preds, layers=layers)
    if oracle:
        result.oracle = Accuracy.of(oracle_preds == answers, records)
        result.oracle_wrong = Accuracy.of(wrong_preds == wrong, records)
    return result


def format_result(result: EvalResult, method: str) -> list[str]:
    lines = [f"{method}: accuracy {result.accuracy.accuracy:.4f} (n={result.accuracy.n})"]
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
            lines.append(f"  {task}: {acc:.4f} (n={n}){extra}")
    return lines
