"""The RoMA tune loop, written once against ``moe_local.loaded.TuningOps``.

    prepare (prepare.py): one base-model pass -> routing bank (correct, routing, embeddings) + prefix cache
    tune:    epochs of router-only AdamW steps on CE + λ(t)·manifold, r_i live -> adapter folder

Routers and optimiser state are float32 numpy arrays owned here (the backend returns gradients;
optim.py steps them), so both backends take the same steps, checkpoints are backend-neutral, and
``--resume`` continues bit-for-bit. A run is set up once (:func:`_setup`: bank, prefix cache,
neighbours, optimiser), then each step is :func:`_step` (one global batch: gradients and metric sums)
followed by the optimiser update and the reporting (report.py: metrics, progress, callbacks). The
output folder, its checkpoints and what may be replaced are folder.py. Python API::

    bank = prepare(model, records, embeddings, layers)
    result = tune(model, records, embeddings, TuneSettings(...), out="adapter", bank=bank)

Under torchrun, ``dist`` (a ``moe_local.distributed.Local``) makes the same run data parallel: each
rank runs the records it owns, gradients and bank rows are summed across ranks, and only rank 0
touches the output folder (moe_local/distributed.py says how the work is split).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from ..distributed import LOCAL
from ..errors import UserError, first_non_finite
from ..files import atomic_write_text
from ..progress import Progress
from . import roma
from .adapter import METRICS_FILE, write_adapter
from .bank import Bank, check_bank, write_bank
from .data import Record, batches, make_batch, predictions
from .evaluate import check_finite
from .folder import BANK_DIR, CACHE_FILE, open_run, rank_cache_path, save_checkpoint
from .lengths import encode_fitting
from .optim import AdamW
from .prefix_cache import CACHE_MODES, PrefixCache
from .prepare import prepare, records_sha256
from .report import METRIC_KEYS, Reporter, TuneCallback
from .tasks import Prompting

METHODS = ("roma", "router")


@dataclass
class TuneSettings:
    """Every hyper-parameter of a tune run (the paper's released defaults where it has them)."""

    method: str = "roma"
    layers: int | None = None  # None: the last 5 MoE layers, or all of them when the model has fewer
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
        for f in fields(self):
            value, flag = getattr(self, f.name), f"--{f.name.replace('_', '-')}"
            if f.type in ("int", "int | None") and value is not None and (type(value) is not int):
                raise UserError(f"{flag} must be an integer, got {value!r}")
            if f.type == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise UserError(f"{flag} must be a number, got {value!r}")
            if f.type == "float" and not math.isfinite(value):
                raise UserError(f"{flag} must be a finite number, got {value}")
        for name in ("epochs", "batch_size", "k", "log_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.layers is not None and self.layers < 1:
            raise UserError(f"--layers must be at least 1, got {self.layers}")
        for name in ("lr", "sigma"):
            if not getattr(self, name) > 0:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ("lam", "weight_decay", "ce_weight", "cache_budget_gb", "seed", "lam_warmup"):
            if not getattr(self, name) >= 0:
                raise UserError(f"--{name.replace('_', '-')} must be at least 0, got {getattr(self, name)}")

    @property
    def effective_lam(self) -> float:
        return self.lam if self.method == "roma" else 0.0


@dataclass
class TuneResult:
    weights: dict  # checkpoint name -> float32 numpy: the tuned routers' weights (and biases where they have them)
    layers: tuple
    metrics: list  # the metrics.jsonl rows
    bank: Bank
    steps: int
    prepare_s: float  # the base-model pass (bank and prefix cache), 0 if reused
    cache_s: float  # prefix-only pass when the bank was given, 0 otherwise
    train_s: float
    train_cpu_s: float  # process CPU time of the training loop (steadier than wall time on a busy host)
    samples_per_s: float
    peak_mem_gb: float


@dataclass
class _Run:
    """What the steps of one run read: set up by :func:`tune` and :func:`_bank_and_cache`."""

    model: object
    records: list
    settings: TuneSettings
    layers: tuple
    identity: tuple  # (the data's hash, the model's fingerprint of the tuned layers)
    data_file: object
    dist: object
    progress: str
    work: Path | None  # where rank 0 writes; None on the other ranks
    encoded: list = None
    cache: PrefixCache = None
    bank: Bank = None
    neighbours: roma.Neighbours | None = None
    prompting: Prompting | None = None

    @property
    def tensors(self) -> list[str]:
        """The tuned tensors' checkpoint names, layer by layer: each router's weight, and its bias where
        the rule has one (gpt-oss)."""
        return [name for i in self.layers for name in self.model.spec.router_tensors(i)]

    def per_layer(self, arrays: dict) -> dict:
        """Arrays keyed by tensor name as TuningOps takes them: ``{layer: weight}``, or
        ``{layer: (weight, bias)}`` for a router with a bias."""
        out = {}
        for i in self.layers:
            names = self.model.spec.router_tensors(i)
            out[i] = arrays[names[0]] if len(names) == 1 else tuple(arrays[n] for n in names)
        return out

    def by_name(self, per_layer: dict) -> dict:
        """The inverse of :meth:`per_layer` (gradients as TuningOps returns them)."""
        out = {}
        for i in self.layers:
            names = self.model.spec.router_tensors(i)
            out.update(zip(names, per_layer[i] if len(names) > 1 else (per_layer[i],)))
        return out


def tune(
    model,
    records: list[Record],
    embeddings: np.ndarray,
    settings: TuneSettings,
    out,
    bank=None,
    data_file=None,
    resume: bool = False,
    overwrite: bool = False,
    callbacks=(),
    progress="auto",
    dist=LOCAL,
    prompting: Prompting | None = None,
) -> TuneResult:
    """Tune the routers of ``settings.layers`` last MoE layers; write the adapter folder ``out``.

    ``bank``: a :class:`Bank`, a bank folder, or None (``out/bank``, made by :func:`prepare` here
    unless a resumed run left one). ``callbacks``: :class:`TuneCallback` objects told of every step.
    The model's own gates are not changed. ``dist``: the torchrun process group; N processes take the
    steps one process takes. ``overwrite`` replaces an adapter only once the new run has succeeded
    (folder.RunFolder). ``prompting``: the format and few-shot examples the records are asked with
    (tasks.Prompting; default mc, none): the CE is over those candidates' scores.
    """
    settings.check()
    layers = roma.tuned_layers(model.spec, settings.layers)
    settings = dataclasses.replace(settings, layers=len(layers))  # the default, resolved, is what is recorded
    out = Path(out)
    identity = (records_sha256(records, prompting), model.spec.fingerprint(layers))
    hyper = settings.hyperparameters()
    encoded = encode_fitting(model, records, data_file, prompting)  # every record fits the context, before any folder
    # The output folder is rank 0's: it claims (locks), checks and reads it for every rank, and keeps the
    # run folder (which holds the lock) to itself.
    kept = {}

    def opened():
        start = open_run(out, bank, resume, overwrite, hyper, *identity)
        kept["folder"] = start.folder
        return dataclasses.replace(start, folder=None)

    try:
        start = dist.on_main(opened)
    except BaseException:  # another rank failed after rank 0 opened (and locked) the folder
        if kept.get("folder") is not None:
            kept["folder"].abandon()
            kept["folder"].release()
        raise
    folder = kept.get("folder")
    work = folder.work if folder else None
    run = _Run(model, records, settings, layers, identity, data_file, dist, progress if dist.is_main else "off", work)
    run.prompting = prompting
    run.encoded = encoded
    try:
        try:
            run.cache = _prefix_cache(run, out)
            timings = _bank_and_cache(run, start.bank, embeddings)
            result = _train(run, start.checkpoint, start.logged, timings, callbacks)
        finally:
            if run.cache is not None:
                run.cache.close()
        if folder is not None:
            folder.finish()
    except BaseException:
        if folder is not None:
            folder.abandon()
        raise
    finally:
        if folder is not None:
            folder.release()
    return result


def _prefix_cache(run: _Run, out: Path) -> PrefixCache:
    """Each rank caches the records it owns, in a file of its own when on disk."""
    settings, dist = run.settings, run.dist
    cache_path = run.work / CACHE_FILE if dist.is_main else rank_cache_path(out, dist.rank)
    if settings.prefix_cache == "disk" and not dist.is_main:
        cache_path.parent.mkdir(parents=True, exist_ok=True)  # another node may not share rank 0's folder
    owned = None if dist.world == 1 else dist.owned(len(run.records))
    return PrefixCache(
        run.model, run.encoded, run.layers[0], settings.prefix_cache, settings.cache_budget_gb, cache_path, owned=owned
    )


def _bank_and_cache(run: _Run, bank, embeddings) -> tuple[float, float]:
    """The bank (made here, filling the prefix cache, or checked and the cache filled) and the
    neighbours, set on ``run``. Returns (prepare seconds, cache seconds)."""
    model, records, settings, layers, dist = run.model, run.records, run.settings, run.layers, run.dist
    prepare_s = cache_s = 0.0
    if bank is None:
        if embeddings is None:
            raise UserError("tuning needs task embeddings (or a routing bank that holds them)")
        t0 = time.perf_counter()
        bank = prepare(
            model,
            records,
            embeddings,
            layers,
            settings.batch_size,
            run.encoded,
            run.cache,
            run.data_file,
            run.progress,
            dist,
            run.prompting,
        )
        prepare_s = time.perf_counter() - t0
        if run.work is not None:
            write_bank(run.work / BANK_DIR, bank)
    else:
        check_bank(bank, model.spec, layers, run.identity[0], "given")
        if embeddings is not None and not np.allclose(bank.embeddings, embeddings, atol=1e-5):
            raise UserError(
                "the routing bank was made with other embeddings than those given; run `moe-local prepare` again"
            )
        if run.cache.stores:
            t0 = time.perf_counter()
            owned = dist.owned(len(records))
            bar = Progress(len(owned), "cache", run.progress)
            for batch in batches(run.encoded, owned, settings.batch_size):
                run.cache.put(batch, model.prefix_hidden(batch, layers[0]))
                if not run.cache.stores:  # auto mode found it over the budget: recompute instead
                    break
                bar.update(batch.size)
            bar.close()
            cache_s = time.perf_counter() - t0
    run.bank = bank
    if settings.method == "roma" or bank.correct.any():
        run.neighbours = roma.neighbours(bank.embeddings, bank.correct, settings.k, settings.sigma)
    return prepare_s, cache_s


def _step(run: _Run, opt: AdamW, index: np.ndarray, lam: float) -> tuple[list, np.ndarray]:
    """One global batch ``index`` on this rank: (the routers' gradients, summed over ranks, in the order
    of ``run.tensors``; the metric sums loss·size, Σ CE, Σ manifold, correct answers over the whole batch).

    Each rank runs the records of the batch it owns (all of them in one process). The loss is a sum
    over samples divided by the global batch size, so the sum of the ranks' gradients is the
    one-process gradient whatever the shard sizes: a last batch that does not divide evenly (or leaves
    a rank nothing) needs no reweighting. The metric sums add up the same way.
    """
    settings, layers, size = run.settings, run.layers, len(index)
    mine = run.dist.shard(index)
    grads = {name: np.zeros_like(opt.params[name]) for name in run.tensors}
    sums = np.zeros(4)
    if len(mine):
        batch = make_batch([run.encoded[i] for i in mine], mine)
        targets, weights = _targets(run.bank, run.neighbours, batch.index)
        loss_fn = functools.partial(_step_loss, lam=lam, ce_weight=settings.ce_weight, global_batch=size)
        loss, aux, grads = run.model.suffix_value_and_grad(
            run.cache.get(batch),
            batch,
            run.cache.start_layer,
            layers,
            loss_fn,
            {"onehot": batch.answer_onehot(), "targets": targets, "weights": weights},
            router_weights=run.per_layer(opt.params),
        )
        if opt.step_count:  # the routers have moved: non-finite values are theirs (the first step ran the model's)
            _check_trained_finite(aux, loss, opt, settings)
        grads = run.by_name(grads)
        check_finite(aux["scores"], aux["routing"], batch, run.records, run.data_file)
        if not math.isfinite(loss):
            raise UserError(
                f"the loss is {loss} at step {opt.step_count + 1}: the routing bank or the model "
                "holds NaN or infinite values"
            )
        sums = np.array(
            [loss * size, aux["ce"].sum(), aux["manifold"].sum(), (predictions(aux["scores"]) == batch.answers).sum()],
            dtype=np.float64,
        )
    *summed, sums = run.dist.sum([grads[name] for name in run.tensors] + [sums])
    return summed, sums


def _train(run: _Run, checkpoint, logged, timings, callbacks) -> TuneResult:
    """The epochs of steps from the optimiser's state (fresh, or a checkpoint's), then the adapter."""
    model, settings, layers = run.model, run.settings, run.layers
    ckpt_tensors, ckpt_info = checkpoint
    opt = AdamW(_gates(model, layers), settings.lr, settings.weight_decay)
    if ckpt_info:
        opt.load(ckpt_tensors, ckpt_info["optimizer"])
    if run.work is not None:
        atomic_write_text(run.work / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in logged))
    total = math.ceil(len(run.records) / settings.batch_size) * settings.epochs
    metrics_path = None if run.work is None else run.work / METRICS_FILE
    reporter = Reporter(
        metrics_path, logged, total, opt.step_count, settings.log_every, run.progress, ckpt_info.get("window")
    )
    model.reset_peak_memory()
    t_train, cpu_train = time.perf_counter(), time.process_time()
    with reporter:
        trained_samples = _epochs(run, opt, reporter, ckpt_info, callbacks)
    train_s, train_cpu_s = time.perf_counter() - t_train, time.process_time() - cpu_train
    reporter.bar.close()
    weights = {name: opt.params[name].copy() for name in run.tensors}
    hyper = {
        **settings.hyperparameters(),
        "effective_lam": settings.effective_lam,
        "neighbours": "knn",
        "optimizer": "adamw",
        "betas": list(opt.betas),
        "eps": opt.eps,
    }
    asked = (run.prompting or Prompting()).fingerprint()
    if asked is not None:  # how the records were asked, when not today's default (mc, no examples)
        hyper["prompting"] = asked
    if run.work is not None:
        write_adapter(run.work, weights, model.spec, layers, settings.method, hyper)
    prepare_s, cache_s = timings
    return TuneResult(
        weights=weights,
        layers=layers,
        metrics=reporter.rows,
        bank=run.bank,
        steps=opt.step_count,
        prepare_s=prepare_s,
        cache_s=cache_s,
        train_s=train_s,
        train_cpu_s=train_cpu_s,
        samples_per_s=trained_samples / train_s if train_s > 0 else 0.0,
        peak_mem_gb=model.peak_memory_gb(),
    )


def _epochs(run: _Run, opt: AdamW, reporter: Reporter, ckpt_info: dict, callbacks) -> int:
    """Steps until the last epoch ends (a resumed run from where its checkpoint stopped, drawing the
    interrupted epoch's order again); checkpoints on rank 0. Returns the samples trained on."""
    settings, n = run.settings, len(run.records)
    steps_per_epoch = math.ceil(n / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    data_sha, fingerprint = run.identity
    info_base = {
        "hyperparameters": settings.hyperparameters(),
        "data_sha256": data_sha,
        "fingerprint": fingerprint,
        "layers": list(run.layers),
        "method": settings.method,
    }
    trained = 0
    while opt.step_count < total:
        epoch, at = divmod(opt.step_count, steps_per_epoch)
        saved = ckpt_info.get("rng") if ckpt_info.get("epoch") == epoch and at else None
        order, rng_state = _epoch_order(settings.seed, epoch, n, saved)
        for index in _global_batches(order[at * settings.batch_size :], settings.batch_size):
            step = opt.step_count + 1
            lam = roma.lam_at(step, settings.effective_lam, settings.lam_warmup)
            grads, sums = _step(run, opt, index, lam)
            opt.step(dict(zip(run.tensors, grads)))
            check_routers(
                opt.params,
                f"after step {step}; no checkpoint or adapter is written (is --lr {settings.lr:g} too large?)",
            )
            trained += len(index)
            row = reporter.step(
                step, len(index), sums, settings.lr, lam, run.neighbours is not None, run.model.peak_memory_gb
            )
            if run.work is not None and (step % settings.save_every == 0 or step % steps_per_epoch == 0):
                state = {**info_base, "epoch": epoch, "rng": rng_state, "window": reporter.window.state()}
                save_checkpoint(run.work, opt, state, settings.keep_checkpoints)
            for callback in callbacks:
                callback.on_step(step, row)
                if step % steps_per_epoch == 0:
                    callback.on_epoch(step // steps_per_epoch, {k: v.copy() for k, v in opt.params.items()})
            if opt.step_count >= total:
                return trained
    return trained


def check_routers(params: dict, when: str) -> None:
    """Tuned routers with a NaN or infinite value are never checkpointed nor written."""
    if (bad := first_non_finite(params)) is not None:
        raise UserError(f"the tuned router {bad} holds NaN or infinite values {when}")


def _check_trained_finite(aux, loss, opt: AdamW, settings: TuneSettings) -> None:
    if not (math.isfinite(loss) and np.isfinite(aux["scores"]).all() and np.isfinite(aux["routing"]).all()):
        raise UserError(
            f"the scores became NaN or infinite at step {opt.step_count + 1} with the routers being tuned "
            f"(is --lr {settings.lr:g} too large?)"
        )


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


def _global_batches(order: np.ndarray, batch_size: int):
    """The record indices of each step's global batch (the last one may be smaller)."""
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _gates(model, layers) -> dict:
    """The model's current routers of ``layers`` (weights, and biases where they have them), float32,
    keyed by checkpoint name."""
    weights = model.get_router_weights(layers)
    names = [name for i in layers for name in model.spec.router_tensors(i)]
    return {name: np.asarray(weights[name], dtype=np.float32) for name in names}


def _targets(bank: Bank, nb, rows):
    if nb is None:  # --method router and no successful sample: nothing to measure the manifold against
        width = bank.routing.shape[1] * bank.routing.shape[2]
        return np.zeros((len(rows), 1, width), np.float32), np.zeros((len(rows), 1), np.float32)
    return roma.neighbour_targets(bank.routing, nb, rows)


__all__ = ["METRIC_KEYS", "METHODS", "TuneCallback", "TuneResult", "TuneSettings", "prepare", "tune"]
