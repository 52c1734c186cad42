"""The demo's methods on `test_fresh` (scripts/build_fresh.py) beside `test_unseen`, over several seeds.

Per built-in model and seed, exactly what `moe-local demo` does (moe_local.demo.run_model with the
settings of assets/demo.yaml): one base pass over `train`, `tune` with `router` (CE only) and `roma`,
then `evaluate` of base (with the oracle and its wrong-label control), router and roma, here on
`test_unseen` and `test_fresh`. Prints accuracy in %, mean ± std over seeds (sample std, ddof 1), with
roma − router paired by seed, and writes every report row to a JSON file.

Usage:
    python scripts/eval_fresh.py --out fresh_rows.json [--seeds 0 1 2] [--models tiny tiny-grove] [--backend torch]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np

from moe_local import demo
from moe_local.errors import UserError
from moe_local.files import atomic_write_text

SPLITS = ("test_unseen", "test_fresh")
COLUMNS = ("base", "router", "roma", "oracle", "oracle_wrong")


def run(models, seeds, backend: str, splits=SPLITS, log=print) -> list[dict]:
    """Report rows of every (model, seed): the demo's run_model, on ``splits``."""
    settings = dataclasses.replace(demo.read_settings(), eval_splits=tuple(splits))
    rows = []
    for seed in seeds:
        for name in models:
            with tempfile.TemporaryDirectory() as work:  # the adapters are not kept
                model_rows, _ = demo.run_model(name, settings, Path(work), backend, seed, progress="off", log=log)
            rows += model_rows
    return rows


def mean_std(values) -> str:
    values = np.asarray(values, dtype=float)
    if not len(values):
        return ""
    return f"{values.mean():.1f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.1f}"


def summary(rows: list[dict]) -> list[str]:
    """Markdown: one line per (model, split), accuracy in % as mean ± std over the rows' seeds, and the
    difference roma − router within each seed."""
    keys = list(dict.fromkeys((r["model"], r["split"]) for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        f"| model | split | n | {' | '.join(COLUMNS)} | roma − router |  (seeds {', '.join(map(str, seeds))})",
        "|---|---|---|" + "---|" * (len(COLUMNS) + 1),
    ]
    for model, split in keys:
        acc = {
            (r["method"], r["seed"]): 100 * r["accuracy"] for r in rows if (r["model"], r["split"]) == (model, split)
        }
        cells = [mean_std([acc[m, s] for s in seeds if (m, s) in acc]) for m in COLUMNS]
        paired = [acc["roma", s] - acc["router", s] for s in seeds if ("roma", s) in acc and ("router", s) in acc]
        n = next(r["n"] for r in rows if (r["model"], r["split"]) == (model, split))
        lines.append(f"| {model} | {split} | {n} | " + " | ".join([*cells, mean_std(paired)]) + " |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="a new JSON file for every report row")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--models", nargs="+", default=["tiny", "tiny-grove"])
    ap.add_argument("--backend", default="torch")
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"error: {out} exists; give a new file")
    try:
        rows = run(args.models, args.seeds, args.backend)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    atomic_write_text(out, json.dumps(rows, indent=2) + "\n")
    print("\n".join(summary(rows)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
