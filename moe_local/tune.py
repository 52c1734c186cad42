"""The RoMA tune loop, written once against the backend contract (backends/__init__.py).

    prepare: one base-model pass -> routing bank (correct, routing, embeddings) + prefix cache
    tune:    epochs of router-only AdamW steps on CE + λ(t)·manifold, r_i live -> adapter folder

Routers and optimiser state are float32 numpy arrays owned here (the backend returns gradients;
moe_local/optim.py steps them), so both backends take the same steps, checkpoints are backend-neutral,
and ``--resume`` continues bit-for-bit. The prefix cache is moe_local/prefix_cache.py; the output
folder, its checkpoints and what may be replaced are moe_local/tune_folder.py. Python API for
one-process pipelines (``moe-local demo``)::

    bank = prepare(model, records, embeddings, layers)
    result = tune(model, records, embeddings, TuneSettings(...), out="adapter", bank=bank)

Under torchrun, ``dist`` (a :class:`moe_local.distributed.Group`) makes the same run data parallel:
each rank runs the records it owns, gradients and bank rows are summed across ranks, and only rank 0
touches the output folder (moe_local/distributed.py says how the work is split).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from . import roma
from .adapter import METRICS_FILE, write_adapter
from .data import Record, batches, encode_records, make_batch, predictions
from .distributed import LOCAL
from .errors import UserError
from .evaluate import check_finite
from .files import atomic_write_text
from .optim import AdamW
from .prefix_cache import CACHE_MODES, PrefixCache
from .progress import Progress
from .tune_folder import (BANK_DIR, CACHE_FILE, RunFolder, check_output, check_resume, default_bank,
                          latest_checkpoint, load_checkpoint, metrics_upto, rank_cache_path, save_checkpoint)

METRIC_KEYS = ("step", "loss", "ce", "manifold", "acc", "lr", "lam", "samples_per_s", "peak_mem_gb")
METHODS = ("roma", "router")


@dataclass
class TuneSettings:
    """Every hyper-parameter of a tune run (the paper's released defaults where it has them)."""

    method: str = "roma"
    layers: int = 5
    k: int = 3
    lam: float = 0.8
    sigma: float = 0.4
    lr: float = 7e-5
    epochs: int = 3
    batch_size: int = 32
    lam_warmup: int = 2000
    seed: int = 0
    weight_decay: float = 0.01
    ce_weight: float = 1.0
    # Run-time settings: they may change between an interrupted run and its --resume.
    log_every: int = field(default=10, metadata={"runtime": True})
    save_every: int = field(default=100, metadata={"runtime": True})
    keep_checkpoints: int = field(default=2, metadata={"runtime": True})
    prefix_cache: str = field(default="auto", metadata={"runtime": True})
    cache_budget_gb: float = field(default=4.0, metadata={"runtime": True})

    def hyperparameters(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("runtime")}

    def check(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"--method must be one of {', '.join(METHODS)}, got '{self.method}'")
        if self.prefix_cache not in CACHE_MODES:
            raise UserError(f"--prefix-cache must be one of {', '.join(CACHE_MODES)}, got '{self.prefix_cache}'")
        for name in ("epochs", "batch_size", "k", "log_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "sigma"):
            if not getattr(self, name) > 0:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ("lam", "weight_decay", "ce_weight", "cache_budget_gb"):
            if not getattr(self, name) >= 0:
                raise UserError(f"--{name.replace('_', '-')} must be at least 0, got {getattr(self, name)}")

    @property
    def effective_lam(self) -> float:
        return self.lam if self.method == "roma" else 0.0


@dataclass
class TuneResult:
    weights: dict                 # gate name -> float32 numpy, the tuned routers
    layers: tuple
    metrics: list                 # the metrics.jsonl rows
    bank: roma.Bank
    steps: int
    prepare_s: float              # the base-model pass (bank and prefix cache), 0 if reused
    cache_s: float                # prefix-only pass when the bank was given, 0 otherwise
    train_s: float
    train_cpu_s: float            # process CPU time of the training loop (steadier than wall time on a busy host)
    samples_per_s: float
    peak_mem_gb: float


# ---------------------------------------------------------------------------------------------
# Prepare: the bank and the cache in one base-model pass
# ---------------------------------------------------------------------------------------------

def records_sha256(records: list[Record]) -> str:
    """Identity of a data set's content (independent of file formatting)."""
    import hashlib

    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.question, list(r.choices), r.answer], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def prepare(model, records: list[Record], embeddings: np.ndarray, layers, batch_size: int = 32,
            encoded=None, cache: PrefixCache | None = None, data_file=None, progress="auto", dist=LOCAL) -> roma.Bank:
    """Run the base model once: per sample, answered correctly? and its last-token routing.

    ``layers``: the tuned layers (a tuple) or how many of the last MoE layers. Fills ``cache`` on the way.
    ``dist``: under torchrun each rank runs its own records and the bank rows are summed across ranks
    (rows a rank does not own are zero there), so every rank returns the whole bank.
    """
    layers = roma.tuned_layers(model.spec, layers)
    if len(embeddings) != len(records):
        raise UserError(f"the embeddings have {len(embeddings)} rows but the data has {len(records)} records")
    encoded = encoded or encode_records(model.tokenizer, records)
    correct = np.zeros(len(records), dtype=np.uint8)
    routing = np.zeros((len(records), len(layers), model.spec.moe_at(layers[0]).num_experts), dtype=np.float32)
    rows = dist.owned(len(records))
    bar = Progress(len(rows), "prepare", progress if dist.is_main else "off")
    for batch in batches(encoded, rows, batch_size):
        hidden = model.prefix_hidden(batch, layers[0])
        scores, r = model.suffix_scores(hidden, batch, layers[0], layers)
        check_finite(scores, r, batch, records, data_file)
        correct[batch.index] = predictions(scores) == batch.answers
        routing[batch.index] = r
        if cache is not None:
            cache.put(batch, hidden)
        bar.update(batch.size)
    correct, routing = dist.sum([correct, routing])
    bar.close(f"prepare: {int(correct.sum())} of {len(records)} answered correctly by the base model")
    meta = {"fingerprint": model.spec.fingerprint(layers), "layers": list(layers),
            "data_file": None if data_file is None else str(data_file),
            "data_sha256": records_sha256(records), "records": len(records),
            "correct": int(correct.sum())}
    if data_file is not None:
        from .data import file_sha256

        meta["data_file_sha256"] = file_sha256(data_file)
    return roma.Bank(correct, routing, np.asarray(embeddings, dtype=np.float32), meta)

# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def _step_loss(scores, routing, onehot, targets, weights, *, lam, ce_weight, global_batch):
    loss, ce, manifold = roma.roma_loss(scores, routing, onehot, targets, weights, lam, ce_weight, global_batch)
    return loss, {"ce": ce, "manifold": manifold}


def _epoch_order(seed: int, epoch: int, n: int, state: dict | None = None) -> tuple[np.ndarray, dict]:
    """(the epoch's record order, the generator state it is drawn from). The state is derived from the
    seed and epoch; ``state``, a checkpoint's, draws the interrupted epoch's order again on ``--resume``."""
    rng = np.random.default_rng([seed, epoch])
    if state is not None:
        rng.bit_generator.state = state
    state = rng.bit_generator.state
    return rng.permutation(n), state


def tune(model, records: list[Record], embeddings: np.ndarray, settings: TuneSettings, out,
         bank=None, data_file=None, resume: bool = False, overwrite: bool = False,
         on_step=None, progress="auto", dist=LOCAL) -> TuneResult:
    """Tune the routers of ``settings.layers`` last MoE layers; write the adapter folder ``out``.

    ``bank``: a :class:`roma.Bank`, a bank folder, or None (``out/bank``, made by :func:`prepare`
    here unless a resumed run left one). ``on_step(step, row_or_None)`` is called after every step
    (row = the metrics row on logged steps). The model's own gates are not changed. ``dist``: the
    torchrun process group (moe_local/distributed.py); N processes take the steps one process takes.
    ``overwrite`` replaces an adapter only once the new run has succeeded (tune_folder.RunFolder).
    """
    settings.check()
    layers = roma.tuned_layers(model.spec, settings.layers)
    out = Path(out)
    data_sha = records_sha256(records)
    fingerprint = model.spec.fingerprint(layers)
    folder = None

    def open_output():   # the output folder is rank 0's: it checks and reads it for every rank
        nonlocal folder
        given, keep_bank = default_bank(out, bank, overwrite)
        mode = check_output(out, resume, overwrite, keep_bank=keep_bank)
        ckpt = latest_checkpoint(out) if resume else None
        ckpt_tensors, ckpt_info = load_checkpoint(ckpt) if ckpt else ({}, {})
        if ckpt:
            check_resume(ckpt_info, settings.hyperparameters(), data_sha, fingerprint, out)
        if isinstance(given, (str, Path)):
            given = roma.read_bank(given)
        logged = metrics_upto(out, int(ckpt_info["optimizer"]["step"])) if ckpt else []
        folder = RunFolder(out, mode, keep_bank)   # made once every check has passed
        return given, ckpt_tensors, ckpt_info, logged

    given, ckpt_tensors, ckpt_info, logged = dist.on_main(open_output)
    # Each rank caches the records it owns, in a file of its own when on disk.
    cache_path = folder.work / CACHE_FILE if dist.is_main else rank_cache_path(out, dist.rank)
    if settings.prefix_cache == "disk" and not dist.is_main:
        cache_path.parent.mkdir(parents=True, exist_ok=True)   # another node may not share rank 0's folder
    try:
        result = _train(model, records, embeddings, settings, layers, given, (ckpt_tensors, ckpt_info), logged,
                        folder.work if dist.is_main else None, cache_path, (data_sha, fingerprint), data_file,
                        on_step, progress if dist.is_main else "off", dist)
        if folder is not None:
            folder.finish()
    except BaseException:
        if folder is not None:
            folder.abandon()
        raise
    return result


def _train(model, records, embeddings, settings, layers, bank, checkpoint, logged, work, cache_path, identity,
           data_file, on_step, progress, dist) -> TuneResult:
    """The bank (made here or checked), the prefix cache, the epochs and the adapter, written in ``work``
    (rank 0's; None on the other ranks)."""
    spec = model.spec
    data_sha, fingerprint = identity
    ckpt_tensors, ckpt_info = checkpoint
    encoded = encode_records(model.tokenizer, records)
    cache = PrefixCache(model, encoded, layers[0], settings.prefix_cache, settings.cache_budget_gb, cache_path,
                        owned=None if dist.world == 1 else dist.owned(len(records)))
    prepare_s = cache_s = 0.0
    if bank is None:
        if embeddings is None:
            raise UserError("tuning needs task embeddings (or a routing bank that holds them)")
        t0 = time.perf_counter()
        bank = prepare(model, records, embeddings, layers, settings.batch_size, encoded, cache, data_file, progress,
                       dist)
        prepare_s = time.perf_counter() - t0
        if dist.is_main:
            roma.write_bank(work / BANK_DIR, bank)
    else:
        roma.check_bank(bank, spec, layers, data_sha, "given")
        if embeddings is not None and not np.allclose(bank.embeddings, embeddings, atol=1e-5):
            raise UserError("the routing bank was made with other embeddings than those given; "
                            "run `moe-local prepare` again")
        if cache.stores:
            t0 = time.perf_counter()
            owned = dist.owned(len(records))
            bar = Progress(len(owned), "cache", progress)
            for batch in batches(encoded, owned, settings.batch_size):
                cache.put(batch, model.prefix_hidden(batch, layers[0]))
                if not cache.stores:   # auto mode found it over the budget: recompute instead
                    break
                bar.update(batch.size)
            bar.close()
            cache_s = time.perf_counter() - t0

    nb = None
    if settings.method == "roma" or bank.correct.any():
        nb = roma.neighbours(bank.embeddings, bank.correct, settings.k, settings.sigma)

    opt = AdamW(_gates(model, layers), settings.lr, settings.weight_decay)
    if ckpt_info:
        opt.load(ckpt_tensors, ckpt_info["optimizer"])
    metrics = logged
    if dist.is_main:
        atomic_write_text(work / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in metrics))

    n = len(records)
    steps_per_epoch = math.ceil(n / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    info_base = {"hyperparameters": settings.hyperparameters(), "data_sha256": data_sha,
                 "fingerprint": fingerprint, "layers": list(layers), "method": settings.method}
    lam_final = settings.effective_lam
    bar = Progress(total, "tune", progress, initial=opt.step_count)
    window = _Window()
    if ckpt_info.get("window"):   # the steps since the last logged row, before the interruption
        window.load(ckpt_info["window"])
    model.reset_peak_memory()
    t_train, cpu_train = time.perf_counter(), time.process_time()
    trained_samples = 0
    try:
        with open(work / METRICS_FILE if dist.is_main else os.devnull, "a") as metrics_file:
            while opt.step_count < total:
                epoch, at = divmod(opt.step_count, steps_per_epoch)
                saved = ckpt_info.get("rng") if ckpt_info.get("epoch") == epoch and at else None
                order, rng_state = _epoch_order(settings.seed, epoch, n, saved)
                for index in _global_batches(order[at * settings.batch_size:], settings.batch_size):
                    step = opt.step_count + 1
                    size = len(index)
                    lam = roma.lam_at(step, lam_final, settings.lam_warmup)
                    # This rank's records of the global batch (all of them in one process). The loss is a sum
                    # over samples divided by the global batch size, so the sum of the ranks' gradients is the
                    # one-process gradient whatever the shard sizes: a last batch that does not divide evenly
                    # (or leaves a rank nothing) needs no reweighting. The metric sums add up the same way.
                    mine = dist.shard(index)
                    grads = {i: np.zeros_like(opt.params[_gate(i)]) for i in layers}
                    sums = np.zeros(4)   # loss·size, Σ CE, Σ manifold, correct answers: this rank's part
                    if len(mine):
                        batch = make_batch([encoded[i] for i in mine], mine)
                        targets, weights = _targets(bank, nb, batch.index)
                        loss_fn = functools.partial(_step_loss, lam=lam, ce_weight=settings.ce_weight,
                                                    global_batch=size)
                        hidden = cache.get(batch)
                        loss, aux, grads = model.suffix_value_and_grad(
                            hidden, batch, cache.start_layer, layers, loss_fn,
                            {"onehot": batch.answer_onehot(), "targets": targets, "weights": weights},
                            router_weights={i: opt.params[_gate(i)] for i in layers})
                        check_finite(aux["scores"], aux["routing"], batch, records, data_file)
                        if not math.isfinite(loss):
                            raise UserError(f"the loss is {loss} at step {step}: the routing bank or the model "
                                            "holds NaN or infinite values")
                        sums = np.array([loss * size, aux["ce"].sum(), aux["manifold"].sum(),
                                         (predictions(aux["scores"]) == batch.answers).sum()], dtype=np.float64)
                    *summed, sums = dist.sum([grads[i] for i in layers] + [sums])
                    opt.step({_gate(i): g for i, g in zip(layers, summed)})
                    trained_samples += size
                    window.add(size, sums[0], sums[1], sums[2], sums[3] / size)
                    row = None
                    if step % settings.log_every == 0 or step == total:
                        row = window.row(step, settings.lr, lam, nb is not None, model.peak_memory_gb())
                        metrics.append(row)
                        metrics_file.write(json.dumps(row) + "\n")
                        metrics_file.flush()
                        bar.log(_format_row(row, total))
                    if dist.is_main and (step % settings.save_every == 0 or step % steps_per_epoch == 0):
                        save_checkpoint(work, opt, {**info_base, "epoch": epoch, "rng": rng_state,
                                                    "window": window.state()},
                                        settings.keep_checkpoints)
                    bar.update(1)
                    if on_step is not None:
                        on_step(step, row)
                    if opt.step_count >= total:
                        break
    finally:
        cache.close()
    train_s, train_cpu_s = time.perf_counter() - t_train, time.process_time() - cpu_train
    bar.close()
    weights = {_gate(i): opt.params[_gate(i)].copy() for i in layers}
    hyper = {**settings.hyperparameters(), "effective_lam": lam_final, "neighbours": "knn", "optimizer": "adamw",
             "betas": list(opt.betas), "eps": opt.eps}
    if dist.is_main:
        write_adapter(work, weights, spec, layers, settings.method, hyper)
    return TuneResult(weights=weights, layers=layers, metrics=metrics, bank=bank, steps=opt.step_count,
                      prepare_s=prepare_s, cache_s=cache_s, train_s=train_s, train_cpu_s=train_cpu_s,
                      samples_per_s=trained_samples / train_s if train_s > 0 else 0.0,
                      peak_mem_gb=model.peak_memory_gb())


def _global_batches(order: np.ndarray, batch_size: int):
    """The record indices of each step's global batch (the last one may be smaller)."""
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def _gate(layer: int) -> str:
    from .backends import gate_name

    return gate_name(layer)


def _gates(model, layers) -> dict:
    """The model's current gates of ``layers``, float32, keyed by checkpoint name."""
    weights = model.get_router_weights(layers)
    return {_gate(i): np.asarray(weights[_gate(i)], dtype=np.float32) for i in layers}


def _targets(bank: roma.Bank, nb, rows):
    if nb is None:   # --method router and no successful sample: nothing to measure the manifold against
        width = bank.routing.shape[1] * bank.routing.shape[2]
        return np.zeros((len(rows), 1, width), np.float32), np.zeros((len(rows), 1), np.float32)
    return roma.neighbour_targets(bank.routing, nb, rows)


class _Window:
    """Sums over the steps since the last logged row."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.n = 0
        self.loss = self.ce = self.manifold = self.correct = 0.0
        self.t0 = time.perf_counter()

    def state(self) -> dict:
        """For a checkpoint (floats round-trip exactly through JSON), with the time spent so far."""
        return {"n": self.n, "loss": self.loss, "ce": self.ce, "manifold": self.manifold, "correct": self.correct,
                "seconds": time.perf_counter() - self.t0}

    def load(self, state: dict) -> None:
        self.n = int(state["n"])
        self.loss, self.ce, self.manifold, self.correct = (float(state[k]) for k in ("loss", "ce", "manifold",
                                                                                     "correct"))
        self.t0 = time.perf_counter() - float(state["seconds"])

    def add(self, n, loss_sum, ce_sum, manifold_sum, acc):
        self.n += n
        self.loss += float(loss_sum)
        self.ce += float(ce_sum)
        self.manifold += float(manifold_sum)
        self.correct += acc * n

    def row(self, step, lr, lam, has_manifold, peak_gb) -> dict:
        dt = time.perf_counter() - self.t0
        row = {"step": step, "loss": self.loss / self.n, "ce": self.ce / self.n,
               "manifold": self.manifold / self.n if has_manifold else None, "acc": self.correct / self.n,
               "lr": lr, "lam": lam, "samples_per_s": self.n / dt if dt > 0 else 0.0, "peak_mem_gb": peak_gb}
        self.reset()
        return row


def _format_row(row: dict, total: int) -> str:
    manifold = "n/a" if row["manifold"] is None else f"{row['manifold']:.4f}"
    return (f"step {row['step']}/{total}  loss {row['loss']:.4f}  ce {row['ce']:.4f}  manifold {manifold}  "
            f"acc {row['acc']:.3f}  lr {row['lr']:.2e}  lam {row['lam']:.3f}  "
            f"{row['samples_per_s']:.1f} samples/s  peak {row['peak_mem_gb']:.2f} GB")


__all__ = ["AdamW", "PrefixCache", "TuneResult", "TuneSettings", "prepare", "tune", "METRIC_KEYS"]
