"""Reporting a tune run: the metrics of the steps since the last logged row, ``metrics.jsonl``, the
progress bar — kept apart from the step itself (tune.py), as mlx-lm's trainer keeps its callbacks.

A :class:`TuneCallback` hears of every step; :class:`Reporter` is the one every run has, and callers
add their own (``tune(..., callbacks=[...])``): a notebook plot, a time limit, a test that stops a run.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from ..progress import Progress

METRIC_KEYS = ("step", "loss", "ce", "manifold", "acc", "lr", "lam", "samples_per_s", "peak_mem_gb")


class TuneCallback:
    """Told of each step once its update is applied; ``row`` is the metrics row on logged steps, else None.
    Told of each epoch's end with a copy of the tuned routers then (checkpoint name -> float32 numpy, as
    an adapter holds them): the routers a run of that many epochs would end with."""

    def on_step(self, step: int, row: dict | None) -> None:
        pass

    def on_epoch(self, epoch: int, weights: dict) -> None:
        pass


class MetricsWindow:
    """Sums over the steps since the last logged row."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.n = 0
        self.loss = self.ce = self.manifold = self.correct = 0.0
        self.t0 = time.perf_counter()

    def state(self) -> dict:
        """For a checkpoint (floats round-trip exactly through JSON), with the time spent so far."""
        return {
            "n": self.n,
            "loss": self.loss,
            "ce": self.ce,
            "manifold": self.manifold,
            "correct": self.correct,
            "seconds": time.perf_counter() - self.t0,
        }

    def load(self, state: dict) -> None:
        self.n = int(state["n"])
        self.loss, self.ce, self.manifold, self.correct = (
            float(state[k]) for k in ("loss", "ce", "manifold", "correct")
        )
        self.t0 = time.perf_counter() - float(state["seconds"])

    def add(self, n: int, sums: np.ndarray) -> None:
        """``sums``: loss·n, Σ CE, Σ manifold, correct answers over the step's ``n`` samples."""
        loss_sum, ce_sum, manifold_sum, correct = sums
        acc = correct / n
        self.n += n
        self.loss += float(loss_sum)
        self.ce += float(ce_sum)
        self.manifold += float(manifold_sum)
        self.correct += acc * n

    def row(self, step, lr, lam, has_manifold, peak_gb) -> dict:
        dt = time.perf_counter() - self.t0
        row = {
            "step": step,
            "loss": self.loss / self.n,
            "ce": self.ce / self.n,
            "manifold": self.manifold / self.n if has_manifold else None,
            "acc": self.correct / self.n,
            "lr": lr,
            "lam": lam,
            "samples_per_s": self.n / dt if dt > 0 else 0.0,
            "peak_mem_gb": peak_gb,
        }
        self.reset()
        return row


def format_row(row: dict, total: int) -> str:
    manifold = "n/a" if row["manifold"] is None else f"{row['manifold']:.4f}"
    return (
        f"step {row['step']}/{total}  loss {row['loss']:.4f}  ce {row['ce']:.4f}  manifold {manifold}  "
        f"acc {row['acc']:.3f}  lr {row['lr']:.2e}  lam {row['lam']:.3f}  "
        f"{row['samples_per_s']:.1f} samples/s  peak {row['peak_mem_gb']:.2f} GB"
    )


class Reporter:
    """The metrics window, the rows logged so far (``rows``), ``metrics.jsonl`` (rank 0's; ``path`` None
    elsewhere) and the progress bar. Use as a context manager around the steps."""

    def __init__(self, path, rows: list, total: int, initial: int, log_every: int, progress, window_state=None):
        self.rows, self.total, self.log_every = rows, total, log_every
        self.path = path
        self.window = MetricsWindow()
        if window_state:  # the steps since the last logged row, before an interruption
            self.window.load(window_state)
        self.bar = Progress(total, "tune", progress, initial=initial)
        self.file = None

    def __enter__(self):
        self.file = open(self.path if self.path is not None else os.devnull, "a")
        return self

    def __exit__(self, *exc):
        self.file.close()
        return False

    def step(
        self, step: int, size: int, sums: np.ndarray, lr: float, lam: float, has_manifold: bool, peak_gb
    ) -> dict | None:
        """Account one step; returns the metrics row when the step is a logged one."""
        self.window.add(size, sums)
        row = None
        if step % self.log_every == 0 or step == self.total:
            row = self.window.row(step, lr, lam, has_manifold, peak_gb())
            self.rows.append(row)
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
            self.bar.log(format_row(row, self.total))
        self.bar.update(1)
        return row
