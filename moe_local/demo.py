"""``moe-local demo``: the embedded default end to end, in one process per model.

For each built-in model: prepare (one base pass: bank + prefix cache) -> tune with ``router`` (CE only)
and ``roma`` -> evaluate ``base`` (with its oracle and the oracle's wrong-label control), ``router`` and
``roma`` on the test splits -> a table, ``report.json`` (report rows, docs/architecture.md), ``report.md``,
``report.png`` and the adapters. Settings come from ``assets/demo.yaml`` (chosen on ``val_unseen`` only).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .checkpoint import ASSETS, BUILTIN_MODELS
from .errors import UserError
from .files import AtomicFolder, atomic_write_text
from .tuning.data import batches, encode_records, read_records
from .tuning.embeddings import default_embeddings_path, load_embeddings

SETTINGS_FILE = ASSETS / "demo.yaml"
SUITE = ASSETS / "suite"
METHODS = ("base", "router", "roma")
CONTROLS = ("oracle", "oracle_wrong")


@dataclass
class DemoSettings:
    """What the demo runs; one YAML file beside the assets."""

    tune: dict  # TuneSettings fields shared by router and roma (method aside)
    eval_splits: tuple = ("test_seen", "test_unseen")
    train_split: str = "train"
    oracle_steps: int = 20
    oracle_lr: float = 0.1
    batch_size: int = 32
    models: dict = field(default_factory=dict)  # per-model overrides of ``tune``


def read_settings(path: Path | None = None) -> DemoSettings:
    import yaml

    path = path or SETTINGS_FILE
    if not Path(path).is_file():
        raise UserError(f"the demo settings {path} are not installed with this copy of moe-local")
    raw = yaml.safe_load(Path(path).read_text()) or {}
    known = set(DemoSettings.__dataclass_fields__)
    unknown = set(raw) - known
    if unknown:
        raise UserError(f"{path}: unknown key '{sorted(unknown)[0]}' (known: {', '.join(sorted(known))})")
    if "tune" not in raw:
        raise UserError(f"{path} has no 'tune' section")
    raw["eval_splits"] = tuple(raw.get("eval_splits", DemoSettings.eval_splits))
    return DemoSettings(**raw)


def load_split(name: str):
    """Records and unit-norm embeddings of one split of the embedded suite."""
    path = SUITE / f"{name}.jsonl"
    if not path.is_file():
        raise UserError(f"the demo suite's split '{name}' is not installed ({path})")
    records = read_records(path)
    return records, load_embeddings(default_embeddings_path(path), len(records))


def expert_usage(model, records, layers, router_weights=None, batch_size: int = 32) -> np.ndarray:
    """Share of each expert among the top-k choices at the last prompt token, per tuned layer: [layers, E]."""
    from .tuning.evaluate import router_weights_applied

    encoded = encode_records(model.tokenizer, records)
    counts = None
    top_k = model.spec.moe_at(layers[0]).top_k
    with router_weights_applied(model, router_weights):
        for batch in batches(encoded, np.arange(len(records)), batch_size):
            hidden = model.prefix_hidden(batch, layers[0])
            _, routing = model.suffix_scores(hidden, batch, layers[0], layers)
            chosen = np.argsort(-routing, axis=-1, kind="stable")[..., :top_k]  # [B, n, k]
            hits = np.zeros_like(routing)
            np.put_along_axis(hits, chosen, 1.0, axis=-1)
            counts = hits.sum(0) if counts is None else counts + hits.sum(0)
    return counts / counts.sum(-1, keepdims=True)


def run_model(
    name: str, settings: DemoSettings, out: Path, backend: str, seed: int, progress="auto", log=print
) -> tuple[list[dict], dict]:
    """Prepare, tune router and roma, evaluate; returns (report rows, expert usage before/after)."""
    import moe_local

    from .tuning.evaluate import evaluate
    from .tuning.roma import tuned_layers
    from .tuning.tune import TuneSettings, prepare, tune

    start = time.perf_counter()
    model = moe_local.load(name, backend=backend)
    backend_name = model.backend
    tune_values = {**settings.tune, **settings.models.get(name, {}), "seed": seed}
    base_settings = TuneSettings(**{**tune_values, "method": "router"})
    train, train_emb = load_split(settings.train_split)
    splits = {s: load_split(s)[0] for s in settings.eval_splits}
    layers = tuned_layers(model.spec, base_settings.layers)
    log(f"[{name}] {len(train)} reference samples, tuning layers {list(layers)}; {model.execution}")
    bank = prepare(model, train, train_emb, layers, batch_size=settings.batch_size, progress=progress)
    adapters = {}
    for method in ("router", "roma"):
        result = tune(
            model,
            train,
            train_emb,
            TuneSettings(**{**tune_values, "method": method}),
            out / "adapters" / f"{name}-{method}",
            bank=bank,
            progress=progress,
        )
        adapters[method] = result.weights
        log(f"[{name}] tuned {method}: {result.steps} steps in {result.train_s:.1f}s")
    rows = []
    for split, records in splits.items():
        for method in METHODS:
            result = evaluate(
                model,
                records,
                layers,
                settings.batch_size,
                router_weights=adapters.get(method),
                oracle=method == "base",
                oracle_steps=settings.oracle_steps,
                oracle_lr=settings.oracle_lr,
                seed=seed,
                progress=progress,
            )
            rows += result.rows(name, split, method, seed, backend_name)
    test = settings.eval_splits[-1]
    usage = {
        "layers": list(layers),
        "split": test,
        **{
            m: expert_usage(model, splits[test], layers, adapters.get(m), settings.batch_size).tolist() for m in METHODS
        },
    }
    log(f"[{name}] done in {time.perf_counter() - start:.0f}s")
    return rows, usage


def table(rows: list[dict]) -> list[str]:
    """Markdown: one row per (model, split), one column per method."""
    methods = [m for m in (*METHODS, *CONTROLS) if any(r["method"] == m for r in rows)]
    keys = list(dict.fromkeys((r["model"], r["split"]) for r in rows))
    lines = ["| model | split | n | " + " | ".join(methods) + " |", "|---|---|---|" + "---|" * len(methods)]
    for model, split in keys:
        cells = {r["method"]: r for r in rows if r["model"] == model and r["split"] == split}
        n = next(iter(cells.values()))["n"]
        lines.append(
            f"| {model} | {split} | {n} | "
            + " | ".join(f"{cells[m]['accuracy']:.3f}" if m in cells else "" for m in methods)
            + " |"
        )
    return lines


def write_plot(path: Path, rows: list[dict], usage: dict) -> bool:
    """Accuracy by method and split, and expert usage in the tuned layers before and after."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    models = list(usage)
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 3.6 * len(models)), squeeze=False)
    for i, name in enumerate(models):
        mine = [r for r in rows if r["model"] == name]
        splits = list(dict.fromkeys(r["split"] for r in mine))
        methods = [m for m in (*METHODS, *CONTROLS) if any(r["method"] == m for r in mine)]
        ax = axes[i][0]
        width = 0.8 / len(methods)
        for j, method in enumerate(methods):
            values = [
                next((r["accuracy"] for r in mine if r["split"] == s and r["method"] == method), 0) for s in splits
            ]
            ax.bar(np.arange(len(splits)) + j * width, values, width, label=method)
        ax.set_xticks(np.arange(len(splits)) + 0.4 - width / 2, splits)
        ax.set_ylim(0, 1.15)  # headroom for the legend above the bars
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name}: accuracy by method and split")
        ax.legend(fontsize=8, ncol=len(methods), loc="upper center")
        ax = axes[i][1]
        u = usage[name]
        experts = len(u["base"][0])
        for method in METHODS:
            flat = np.asarray(u[method]).reshape(-1)
            ax.plot(np.arange(len(flat)), flat, marker=".", label=method)
        for k in range(1, len(u["layers"])):
            ax.axvline(k * experts - 0.5, color="grey", lw=0.5)
        ax.set_xlabel(f"expert (layers {u['layers']} side by side)")
        ax.set_ylabel(f"share of top-k picks ({u['split']})")
        ax.set_title(f"{name}: expert usage in the tuned layers, before and after")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def default_out() -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(f"moe-local-demo-{stamp}")
    n = 1
    while out.exists():
        n += 1
        out = Path(f"moe-local-demo-{stamp}-{n}")
    return out


def run_demo(
    out: Path | None, backend: str = "auto", models=("tiny", "tiny-grove"), seed: int = 0, progress="auto", log=print
) -> tuple[Path, list[dict]]:
    from .files import refuse_existing

    settings = read_settings()
    for name in models:
        if name not in BUILTIN_MODELS:
            raise UserError(f"the demo runs the built-in models ({', '.join(BUILTIN_MODELS)}), not '{name}'")
    out = Path(out) if out is not None else default_out()
    refuse_existing(out, "demo output folder")
    start = time.perf_counter()
    rows, usage = [], {}
    with AtomicFolder(out) as tmp:
        for name in models:
            model_rows, usage[name] = run_model(name, settings, tmp, backend, seed, progress, log)
            rows += model_rows
        atomic_write_text(tmp / "report.json", json.dumps(rows, indent=2) + "\n")
        lines = table(rows)
        plotted = write_plot(tmp / "report.png", rows, usage)
        md = [
            "# moe-local demo",
            "",
            f"seed {seed}, backend {rows[0]['backend']}, {time.perf_counter() - start:.0f} s",
            "",
            *lines,
            "",
            "oracle: per-sample router offsets at the last prompt token, optimised with the true label "
            "(an upper bound); oracle_wrong: the share the same oracle flips to a random wrong label — "
            "only the oracle's gain above it is a routing gap.",
            "",
        ]
        if plotted:
            md += ["![accuracy and expert usage](report.png)", ""]
        atomic_write_text(tmp / "report.md", "\n".join(md))
        atomic_write_text(tmp / "usage.json", json.dumps(usage) + "\n")
    for line in lines:
        log(line)
    log(
        f"wrote {out}/report.json, report.md" + (", report.png" if plotted else "") + " and adapters/ "
        f"in {time.perf_counter() - start:.0f} s"
    )
    return out, rows
