"""Task data -> records and how they are asked: the reading side of the pipeline.

:func:`read_records` reads any task source (formats.py: JSONL, CSV, parquet, Arrow, datasets folders)
and maps its rows through their layout (layouts.py) to checked records (records.py); :func:`read_task`
adds the :class:`Prompting`, the format and the few-shot examples, that data.py renders.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .formats import check_source, read_table, splits_of
from .layouts import NATIVE, FieldMap, choose, known_layout, parse_fields, to_record
from .records import Record

FORMATS = ("mc", "rc")
DEV_SPLIT = "dev"


def parse_record(obj, path, line) -> Record:
    """One JSON object of today's JSONL layout (``question``, ``choices``, ``answer``, ...) as a record."""
    return to_record(NATIVE, obj, line, f"{path}:{line}")


def read_records(path, split: str | None = None, fields=None, limit: int | None = None) -> list[Record]:
    """The first ``limit`` records (all by default) of a task file or datasets folder, checked.

    ``split``: the split of a DatasetDict folder; ``fields``: a ``--fields`` text or FieldMap for a
    layout the package does not know.
    """
    fields = parse_fields(fields) if isinstance(fields, str) else fields
    table = read_table(path, split, is_header=lambda cells: _names_columns(cells, fields))
    layout = None if table.headerless or table.columns is None else choose(table.columns, table.name, fields)
    records = []
    for line, where, row in table.rows:
        if limit is not None and len(records) >= limit:
            break
        if table.columns is None and not table.headerless and not records:  # JSONL: the first object decides
            layout = choose(list(row), table.name, fields, jsonl=True) if isinstance(row, dict) else NATIVE
        records.append(to_record(layout, row, line, where, table.text_cells))
    if not records:
        raise UserError(f"{table.name} holds no records")
    return records


def _names_columns(cells: list[str], fields: FieldMap | None) -> bool:
    """Whether a CSV's first row is a header: always with --fields (its columns are checked then),
    else when it names a known layout's columns."""
    return fields is not None or known_layout(cells) is not None


def source_sha256(path) -> str:
    """The hash of a task file, or of every file in a datasets folder (their names and bytes)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Prompting:
    """How records are asked: ``format`` (mc or rc) and ``shots`` worked examples before each, the
    first of ``examples``: a dev split's records, or (``own_split``) the evaluated split's first
    records, each record left out of its own examples (lm-eval's ``first_n`` sampler)."""

    format: str = "mc"
    shots: int = 0
    examples: tuple[Record, ...] = ()
    own_split: bool = True

    def examples_for(self, index: int) -> list[Record]:
        if not self.shots:
            return []
        pool = [e for j, e in enumerate(self.examples) if not (self.own_split and j == index)]
        return pool[: self.shots]

    def fingerprint(self) -> dict | None:
        """What a bank or checkpoint must agree on; None for today's default (mc, no examples)."""
        if self.format == "mc" and not self.shots:
            return None
        examples = [
            [e.question, list(e.choices), e.answer, e.context, e.cloze] for e in self.examples[: self.shots + 1]
        ]
        digest = hashlib.sha256(json.dumps(examples, ensure_ascii=False).encode()).hexdigest()
        return {"format": self.format, "shots": self.shots, "own_split": self.own_split, "examples_sha256": digest}


def read_task(
    path, split: str | None = None, fields=None, limit: int | None = None, format: str = "mc", num_fewshot: int = 0
) -> tuple[list[Record], Prompting]:
    """Records (as :func:`read_records`) and how to ask them: the format, and ``num_fewshot`` examples
    from the folder's ``dev`` split when it has one (and it is not the split asked for), else the
    split's own first records."""
    shots = num_fewshot
    if format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if shots < 0:
        raise UserError(f"--num-fewshot must be at least 0, got {shots}")
    fields = parse_fields(fields) if isinstance(fields, str) else fields
    dev = None
    if shots and check_source(path).is_dir() and split != DEV_SPLIT and DEV_SPLIT in (splits_of(Path(path)) or []):
        dev = read_records(path, DEV_SPLIT, fields)
    wanted = limit if limit is None or dev is not None else max(limit, shots + 1)
    records = read_records(path, split, fields, wanted)
    pool = dev if dev is not None else records[: shots + 1]
    needed = shots if dev is not None else shots + 1
    if shots and len(pool) < needed:
        where = f"the {DEV_SPLIT} split" if dev is not None else "the data"
        raise UserError(f"--num-fewshot {shots} needs {needed} records in {where}; it has {len(pool)}")
    prompting = Prompting(format, shots, tuple(pool) if shots else (), own_split=dev is None)
    return records[:limit], prompting
