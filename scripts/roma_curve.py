"""RoMA against plain router tuning (CE only) and C3PO, over tuning-set sizes and λ, with 95 % intervals.

For each built-in model, seed and tuning-set size (a sample of the suite's ``train``, stratified by task
family, drawn from the seed): the base model's routing bank over that sample; ``router`` and ``roma``
(each λ) tuned at each learning rate for the longest epoch count of the grid, the routers of every
shorter count read at the end of its epoch (exactly the routers a run of that many epochs ends with);
C3PO at each (k, σ) from the sample's bank. Every setting is scored on ``val_unseen``.

Settings are chosen on ``val_unseen`` only, each method at its own best (mean over seeds): router by
(lr, epochs); roma by (lr, epochs, λ), and again at each λ for the λ panel; c3po by (k, σ).
``test_unseen`` is then read once per final setting and seed. Intervals are 95 % bootstrap intervals
over seeds and test items (seeds drawn with replacement, and one draw of the test items with
replacement shared by them); differences between methods are paired (the same draws). Seed spread is the sample
standard deviation over seeds.

λ warms up linearly over min(50, one epoch's steps), so every epoch count of the grid ends at its λ (the
demo's 50 steps where an epoch is longer). The learning rate is the demo's 0.02 unless ``--lrs`` gives
more (the full run used it alone: two rates would double its hour). The demo's other settings (layers 2,
k 3, σ 0.4 for roma's neighbours, batch 32) hold throughout.

Usage:
    python scripts/roma_curve.py --out curve-tiny.json --models tiny            # the full grid, one model
    python scripts/roma_curve.py --summarize curve-tiny.json curve-grove.json --plot curve.png
Every run's row (val and test, with per-sample hits of the final settings) goes to the JSON; the
summary (markdown) is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from moe_local import demo
from moe_local.errors import UserError
from moe_local.files import atomic_write_bytes, atomic_write_text
from moe_local.tuning.c3po import C3PO
from moe_local.tuning.evaluate import evaluate
from moe_local.tuning.report import TuneCallback
from moe_local.tuning.tune import TuneSettings, prepare, tune

EPOCHS = (1, 2, 3, 5, 8, 13, 21, 34)
METHODS = ("base", "router", "roma", "c3po")


@dataclasses.dataclass
class Grid:
    models: tuple = ("tiny", "tiny-grove")
    sizes: tuple = (24, 48, 96, 200, 600, 1200)
    seeds: tuple = (0, 1, 2, 3, 4)
    lams: tuple = (0.1, 0.3, 1.0, 3.0)
    lrs: tuple = (0.02,)
    max_steps: int = 200  # the longest run's steps; the epoch grid stops below it
    c3po_k: tuple = (3, 10)
    c3po_sigma: tuple = (0.2, 0.4)
    backend: str = "torch"
    bootstrap: int = 2000


def stratified_sample(records, size: int, seed: int) -> np.ndarray:
    """Indices of ``size`` records, as even across task families as ``size`` allows, drawn from the seed."""
    rng = np.random.default_rng([seed, size])
    by_task: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_task.setdefault(r.task, []).append(i)
    tasks = [str(t) for t in rng.permutation(sorted(by_task))]  # who gets the leftovers changes with the seed
    if size > len(records):
        raise UserError(f"a tuning set of {size} samples is more than the {len(records)} there are")
    queues = {t: list(rng.permutation(by_task[t])) for t in tasks}
    picked = []
    while len(picked) < size:
        for t in tasks:
            if queues[t] and len(picked) < size:
                picked.append(int(queues[t].pop()))
    return np.array(sorted(picked))


def epoch_grid(size: int, max_steps: int, batch_size: int = 32) -> tuple:
    per_epoch = math.ceil(size / batch_size)
    return tuple(e for e in EPOCHS if e * per_epoch <= max_steps) or (1,)


class Snapshots(TuneCallback):
    """The routers at the end of each epoch of the grid."""

    def __init__(self, epochs):
        self.wanted, self.weights = set(epochs), {}

    def on_epoch(self, epoch, weights):
        if epoch in self.wanted:
            self.weights[epoch] = weights


def accuracy_and_hits(model, records, layers, weights=None, c3po=None) -> tuple[float, np.ndarray]:
    result = evaluate(model, records, layers, 64, router_weights=weights, c3po=c3po, progress="off")
    answers = np.array([r.answer for r in records])
    if c3po is not None:
        return result.c3po.accuracy, (result.c3po_predictions == answers).astype(np.uint8)
    return result.accuracy.accuracy, (result.predictions == answers).astype(np.uint8)


def tuned_settings(grid: Grid):
    """(group, setting) of every tuned run: router per lr, roma per (lr, λ)."""
    for lr in grid.lrs:
        yield {"method": "router", "lr": lr, "lam": 0.0}
        for lam in grid.lams:
            yield {"method": "roma", "lr": lr, "lam": lam}


def run_cell(model, name, size, seed, grid: Grid, splits, log) -> tuple[list[dict], dict]:
    """Val rows of every setting at one (model, size, seed), and what the test pass needs to rerun them:
    ``{setting key: router weights or a C3PO}``."""
    train, train_emb = splits["train"]
    rows_of = dict(model=name, size=size, seed=seed)
    pick = stratified_sample(train, size, seed)
    records, emb = [train[i] for i in pick], train_emb[pick]
    layers = tuple(model.spec.moe_layers[-demo.read_settings().tune["layers"] :])
    bank = prepare(model, records, emb, layers, progress="off")
    epochs = epoch_grid(size, grid.max_steps)
    warmup = min(50, math.ceil(size / 32))  # λ at its value from the end of the first epoch on
    keep: dict = {"base": None}
    val, val_emb = splits["val_unseen"]
    rows = [dict(rows_of, method="base", split="val_unseen", accuracy=accuracy_and_hits(model, val, layers)[0])]
    for setting in tuned_settings(grid):
        snaps = Snapshots(epochs)
        values = {**demo.read_settings().tune, **setting, "epochs": epochs[-1], "lam_warmup": warmup, "seed": seed}
        with tempfile.TemporaryDirectory() as work:
            tune(model, records, emb, TuneSettings(**values), Path(work) / "a", bank=bank, callbacks=[snaps],
                 progress="off")  # fmt: skip
        for e, weights in sorted(snaps.weights.items()):
            key = json.dumps({**setting, "epochs": e}, sort_keys=True)
            keep[key] = weights
            acc = accuracy_and_hits(model, val, layers, weights)[0]
            rows.append(dict(rows_of, **setting, epochs=e, split="val_unseen", accuracy=acc))
    for k in grid.c3po_k:
        for sigma in grid.c3po_sigma:
            setting = {"method": "c3po", "k": k, "sigma": sigma}
            key = json.dumps(setting, sort_keys=True)
            keep[key] = (bank, k, sigma)
            acc = accuracy_and_hits(model, val, layers, c3po=C3PO(bank, val_emb, k, sigma))[0]
            rows.append(dict(rows_of, **setting, split="val_unseen", accuracy=acc))
    log(f"[{name}] size {size} seed {seed}: {len(rows)} settings on val_unseen, bank {int(bank.correct.sum())}/{size}")
    return rows, {"layers": layers, "runs": keep}


def setting_key(row: dict) -> str:
    fields = {k: row[k] for k in ("method", "lr", "lam", "epochs", "k", "sigma") if k in row}
    return json.dumps(fields, sort_keys=True)


def choose(val_rows: list[dict]) -> dict:
    """{(model, size, group): setting key} by mean val_unseen accuracy over seeds; groups are the methods
    and ``roma@λ`` for each λ. Ties keep the first setting in grid order."""
    scores: dict = {}
    for r in val_rows:
        groups = [r["method"]] + ([f"roma@{r['lam']:g}"] if r["method"] == "roma" else [])
        for g in groups:
            scores.setdefault((r["model"], r["size"], g), {}).setdefault(setting_key(r), []).append(r["accuracy"])
    return {
        cell: max(options, key=lambda key: (np.mean(options[key]), -list(options).index(key)))
        for cell, options in scores.items()
    }


def test_rows(model, name, cells: dict, chosen: dict, splits) -> list[dict]:
    """test_unseen, read once per chosen setting and seed."""
    test, test_emb = splits["test_unseen"]
    out = []
    for (size, seed), cell in cells.items():
        scored = {}  # a setting chosen by two groups (roma and its λ's) is read once
        for (m, s, group), key in chosen.items():
            if (m, s) != (name, size):
                continue
            if key not in scored:
                kept = cell["runs"][key] if json.loads(key)["method"] != "base" else None
                if isinstance(kept, tuple):
                    bank, k, sigma = kept
                    c3po = C3PO(bank, test_emb, k, sigma)
                    scored[key] = accuracy_and_hits(model, test, cell["layers"], c3po=c3po)
                else:
                    scored[key] = accuracy_and_hits(model, test, cell["layers"], kept)
            acc, hits = scored[key]
            row = dict(model=name, size=size, seed=seed, group=group, setting=json.loads(key), split="test_unseen")
            out.append(row | {"accuracy": acc, "hits": "".join(map(str, hits))})
    return out


def run_model(name: str, grid: Grid, log=print) -> dict:
    import moe_local

    start = time.perf_counter()
    model = moe_local.load(name, backend=grid.backend)
    splits = {s: demo.load_split(s) for s in ("train", "val_unseen", "test_unseen")}
    val, cells = [], {}
    for seed in grid.seeds:
        for size in grid.sizes:
            rows, cells[size, seed] = run_cell(model, name, size, seed, grid, splits, log)
            val += rows
    chosen = choose(val)
    test = test_rows(model, name, cells, chosen, splits)
    log(f"[{name}] done in {time.perf_counter() - start:.0f}s")
    return {"grid": dataclasses.asdict(grid), "val": val, "test": test}


# -- intervals, summary, picture --------------------------------------------------------------------


def hits_matrix(test: list[dict], model: str, size: int, group: str) -> np.ndarray | None:
    """[seeds, samples] of one (model, size, group)'s final setting, seeds in ascending order."""
    rows = sorted(
        (r for r in test if (r["model"], r["size"], r["group"]) == (model, size, group)), key=lambda r: r["seed"]
    )
    if not rows:
        return None
    return np.array([[c == "1" for c in r["hits"]] for r in rows], dtype=np.float64)


def bootstrap_draws(seeds: int, samples: int, draws: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(seed draws [draws, seeds], sample draws [draws, 1, samples]): seeds with replacement, and the test
    items with replacement — one draw of items shared by the drawn seeds, since every seed is scored on
    the same items (drawing them apart per seed would average item difficulty away)."""
    return rng.integers(0, seeds, (draws, seeds)), rng.integers(0, samples, (draws, 1, samples))


def bootstrap_mean(hits: np.ndarray, draws) -> np.ndarray:
    """Mean accuracy of each bootstrap draw of ``hits`` [seeds, samples]."""
    seed_pick, sample_pick = draws
    return hits[seed_pick[..., None], sample_pick].mean(axis=(1, 2))


def interval(hits: np.ndarray, draws, other: np.ndarray | None = None) -> tuple[float, float, float]:
    """(mean, 2.5 %, 97.5 %) in points of ``hits`` (or of ``hits - other``, paired: the same draws)."""
    values = hits if other is None else hits - other
    boot = 100 * bootstrap_mean(values, draws)
    return 100 * values.mean(), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def summary(test: list[dict], bootstrap: int = 2000, seed: int = 0) -> tuple[list[str], dict]:
    """Markdown lines and the numbers behind them: {(model, size, group): (mean, lo, hi, seed std)}."""
    rng = np.random.default_rng(seed)
    cells = sorted({(r["model"], r["size"]) for r in test})
    groups = sorted(
        {r["group"] for r in test}, key=lambda g: (g not in METHODS, METHODS.index(g) if g in METHODS else g)
    )
    numbers, lines = {}, []
    head = "| model | size | " + " | ".join(groups) + " | roma − router | c3po − roma |"
    lines += [head, "|---|---|" + "---|" * (len(groups) + 2)]
    for model, size in cells:
        mats = {g: hits_matrix(test, model, size, g) for g in groups}
        some = next(m for m in mats.values() if m is not None)
        draws = bootstrap_draws(*some.shape, bootstrap, rng)
        cells_text = []
        for g in groups:
            if mats[g] is None:
                cells_text.append("")
                continue
            mean, lo, hi = interval(mats[g], draws)
            spread = 100 * mats[g].mean(1).std(ddof=1) if len(mats[g]) > 1 else 0.0
            numbers[model, size, g] = (mean, lo, hi, spread)
            cells_text.append(f"{mean:.1f} [{lo:.1f}, {hi:.1f}] ±{spread:.1f}")
        for a, b in (("roma", "router"), ("c3po", "roma")):
            if mats.get(a) is None or mats.get(b) is None:
                cells_text.append("")
                continue
            mean, lo, hi = interval(mats[a], draws, mats[b])
            numbers[model, size, f"{a} − {b}"] = (mean, lo, hi, 0.0)
            cells_text.append(f"{mean:+.1f} [{lo:+.1f}, {hi:+.1f}]")
        lines.append(f"| {model} | {size} | " + " | ".join(cells_text) + " |")
    lines.append("")
    lines.append("test_unseen accuracy in %: mean over seeds [95 % bootstrap interval over seeds and test items]")
    lines.append("±seed std; differences paired (the same draws). Settings chosen on val_unseen, per method.")
    return lines, numbers


def plot(path: Path, numbers: dict) -> None:
    """Two panels per model: accuracy vs tuning-set size per method; roma's accuracy vs λ per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({m for m, _, _ in numbers})
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 4 * len(models)), squeeze=False)
    for row, model in zip(axes, models):
        sizes = sorted({s for m, s, _ in numbers if m == model})
        for method in METHODS:
            pts = [(s, numbers[model, s, method]) for s in sizes if (model, s, method) in numbers]
            if pts:
                x = [s for s, _ in pts]
                row[0].plot(x, [v[0] for _, v in pts], marker="o", label=method)
                row[0].fill_between(x, [v[1] for _, v in pts], [v[2] for _, v in pts], alpha=0.2)
        row[0].set(xscale="log", xlabel="tuning-set size (samples)", ylabel="test_unseen accuracy (%)", title=model)
        row[0].legend()
        lams = sorted({float(g.split("@")[1]) for m, _, g in numbers if m == model and g.startswith("roma@")})
        for s in sizes:
            pts = [numbers.get((model, s, f"roma@{lam:g}")) for lam in lams]
            if all(p is not None for p in pts):
                below, above = [p[0] - p[1] for p in pts], [p[2] - p[0] for p in pts]
                row[1].errorbar(
                    lams, [p[0] for p in pts], yerr=[below, above], marker="o", capsize=3, label=f"{s} samples"
                )
        row[1].set(xscale="log", xlabel="λ", ylabel="roma test_unseen accuracy (%)", title=f"{model}: roma vs λ")
        row[1].legend(fontsize=8)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, image.getvalue())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="a new JSON file for every run's row")
    ap.add_argument("--summarize", nargs="+", help="read these JSON files instead of running")
    ap.add_argument("--plot", help="write the picture here (PNG)")
    for field in dataclasses.fields(Grid):
        kind = type(field.default) if not isinstance(field.default, tuple) else type(field.default[0])
        nargs = "+" if isinstance(field.default, tuple) else None
        ap.add_argument(f"--{field.name.replace('_', '-')}", type=kind, nargs=nargs, default=field.default)
    args = ap.parse_args(argv)
    grid = Grid(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Grid)})
    try:
        if args.plot and (Path(args.plot).exists() or not Path(args.plot).parent.is_dir()):
            raise UserError(f"--plot {args.plot}: give a new file in an existing folder")
        if args.summarize:
            test = [r for f in args.summarize for r in json.loads(Path(f).read_text())["test"]]
        else:
            if not args.out or Path(args.out).exists():
                raise UserError("give --out, a new JSON file (or --summarize FILES)")
            runs = [run_model(name, grid) for name in grid.models]
            merged = {"grid": runs[0]["grid"], "val": [r for x in runs for r in x["val"]],
                      "test": [r for x in runs for r in x["test"]]}  # fmt: skip
            atomic_write_text(Path(args.out), json.dumps(merged) + "\n")
            print(f"wrote {args.out}")
            test = merged["test"]
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lines, numbers = summary(test, grid.bootstrap)
    print("\n".join(lines))
    if args.plot:
        plot(Path(args.plot), numbers)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
