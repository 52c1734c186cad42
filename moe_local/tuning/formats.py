"""Task files on disk -> rows: JSONL, CSV (or TSV), parquet, Arrow, and Hugging Face ``save_to_disk`` folders.

What the reader is follows from the path: a folder is a datasets folder (``Dataset.save_to_disk``:
``state.json`` and ``data-*.arrow``; or a ``DatasetDict`` of such folders, one per split, ``--split``
picking one); ``.csv``/``.tsv``, ``.parquet`` and ``.arrow`` files are what they say; any other file is
JSONL, as it always was. Text files are UTF-8 (a byte-order mark is accepted); parquet and Arrow are
read with pyarrow (``pip install 'moe-local[data]'``), a batch at a time, so ``--limit`` reads only
what it keeps. Nothing here knows what a row means: layouts.py maps rows to records.

Each row comes with where it is, for messages: ``FILE:LINE`` in text files (1-based), ``FILE row N``
in tables (0-based, as ``dataset[N]`` counts).
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

TABLE_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow", ".csv": "csv", ".tsv": "csv"}
DATASET_FILES = ("state.json", "dataset_info.json")
DICT_FILE = "dataset_dict.json"
BATCH_ROWS = 1024


@dataclass
class Table:
    """Rows of one task source. ``columns``: the names a table declares (None for JSONL, whose objects
    carry their own keys; None with ``headerless`` for a CSV without a header, whose rows are lists).
    ``rows`` yields ``(line, where, row)``; ``text_cells``: values are text (CSV)."""

    name: str
    columns: list[str] | None
    rows: Iterator[tuple[int, str, object]]
    text_cells: bool = False
    headerless: bool = False


def check_source(path) -> Path:
    """The path as a regular file or a folder; anything else (missing, a FIFO, a device) is refused."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"data file not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read the data file {path}: {e.strerror}") from None
    kinds = {
        stat.S_ISFIFO: "a named pipe (FIFO)",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISSOCK: "a socket",
    }
    for test, kind in kinds.items():
        if test(mode):
            raise UserError(f"{path} is {kind}, not a task file; give a file or a datasets folder")
    return path


def read_table(path, split: str | None = None, is_header: Callable[[list[str]], bool] = lambda cells: True) -> Table:
    """The rows of a task file or datasets folder. ``is_header``: whether a CSV's first row names
    columns (else every row is MMLU's ``question, choice..., answer``)."""
    path = check_source(path)
    if path.is_dir():
        return _datasets_folder(path, split)
    if split is not None:
        raise UserError(f"--split picks a split of a datasets folder; {path} is a file")
    kind = TABLE_SUFFIXES.get(path.suffix.lower(), "jsonl")
    if kind == "csv":
        return _csv(path, is_header)
    if kind == "parquet":
        return _parquet(path)
    if kind == "arrow":
        return _arrow(path, [path])
    return _jsonl(path)


# -- text files -------------------------------------------------------------------------------


def read_text(path: Path) -> str:
    """UTF-8 text with a leading byte-order mark dropped; bad bytes are named by their line."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read the data file {path}: {e.strerror}") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (save the file as UTF-8)") from None


def _lines(text: str) -> list[str]:
    """Lines split at newlines only (not at the other separators ``str.splitlines`` knows, which JSON
    strings may hold as they are)."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def _jsonl(path: Path) -> Table:
    text = read_text(path)

    def rows():
        for number, raw in enumerate(_lines(text), 1):
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            except (ValueError, RecursionError) as e:  # an integer of thousands of digits, nesting too deep
                raise UserError(f"{where}: not valid JSON ({type(e).__name__}: {str(e)[:80]})") from None
            yield number, where, obj

    return Table(str(path), None, rows())


def _csv(path: Path, is_header) -> Table:
    """CSV (TSV for ``.tsv``): quoted cells may hold commas and newlines; blank lines are skipped."""
    text = read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")

    def numbered():
        end = 0
        try:
            for cells in reader:
                start, end = end + 1, reader.line_num
                if any(c.strip() for c in cells):
                    yield start, cells
        except csv.Error as e:
            raise UserError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None

    rows = numbered()
    first = next(rows, None)
    if first is None:
        return Table(str(path), [], iter(()), text_cells=True)
    if not is_header([c.strip() for c in first[1]]):
        return Table(str(path), None, _with_where(path, _chain(first, rows)), text_cells=True, headerless=True)
    columns = [c.strip() for c in first[1]]

    def as_dicts():
        for line, cells in rows:
            if len(cells) != len(columns):
                raise UserError(f"{path}:{line}: {len(cells)} cells, but the header names {len(columns)} columns")
            yield line, f"{path}:{line}", dict(zip(columns, cells))

    return Table(str(path), columns, as_dicts(), text_cells=True)


def _chain(first, rest):
    yield first
    yield from rest


def _with_where(path, rows):
    for line, cells in rows:
        yield line, f"{path}:{line}", cells


# -- tables (pyarrow) -------------------------------------------------------------------------


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise UserError("reading parquet and Arrow files needs pyarrow: pip install 'moe-local[data]'") from None
    return pyarrow


def _unreadable(path, kind: str, error: Exception, row: int | None = None):
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    at = f" row {row}" if row else ""
    raise UserError(f"{path}{at}: not a readable {kind} file ({message})") from None


def _batch_rows(path, batches, kind: str):
    """(row, where, dict) from record batches, naming the file and row where reading fails."""
    pa = _pyarrow()
    row = 0
    try:
        for batch in batches:
            for item in batch.to_pylist():
                yield row, f"{path} row {row}", item
                row += 1
    except (pa.ArrowException, OSError, ValueError) as e:
        _unreadable(path, kind, e, row)


def _parquet(path: Path) -> Table:
    pa = _pyarrow()
    try:
        handle = pa.parquet.ParquetFile(str(path))
        columns = handle.schema_arrow.names
    except (pa.ArrowException, OSError, ValueError) as e:
        _unreadable(path, "parquet", e)
    return Table(str(path), columns, _batch_rows(path, handle.iter_batches(batch_size=BATCH_ROWS), "parquet"))


def _arrow_schema(path: Path):
    """The schema of an Arrow IPC stream (what ``datasets`` writes) or file."""
    pa = _pyarrow()
    try:
        with pa.memory_map(str(path)) as source:
            try:
                return pa.ipc.open_stream(source).schema
            except pa.ArrowInvalid:
                return pa.ipc.open_file(source).schema
    except (pa.ArrowException, OSError, ValueError) as e:
        _unreadable(path, "Arrow", e)


def _arrow_batches(path: Path):
    """The record batches of an Arrow stream or file, the file closed once they are read."""
    pa = _pyarrow()
    with pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
            return
        yield from reader


def _arrow(name, files: list[Path]) -> Table:
    """Arrow files read one after the other (a dataset's shards), with the first one's columns."""
    schema = _arrow_schema(files[0])

    def rows():
        for path in files:
            yield from _batch_rows(path, _arrow_batches(path), "Arrow")

    return Table(str(name), schema.names, rows())


# -- datasets folders -------------------------------------------------------------------------


def _is_dataset(folder: Path) -> bool:
    return any((folder / f).is_file() for f in DATASET_FILES) or any(folder.glob("*.arrow"))


def _read_json(path: Path):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def splits_of(folder: Path) -> list[str] | None:
    """A DatasetDict folder's splits (its dataset_dict.json, else the dataset folders in it);
    None for a folder that is one dataset."""
    if (folder / DICT_FILE).is_file():
        splits = _read_json(folder / DICT_FILE).get("splits")
        if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
            raise UserError(f"{folder / DICT_FILE} has no list of 'splits'")
        return splits
    if _is_dataset(folder):
        return None
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and _is_dataset(p))


def _dataset_files(folder: Path) -> list[Path]:
    """A dataset's Arrow shards in order: state.json's ``_data_files``, else the .arrow files by name."""
    state = folder / "state.json"
    if state.is_file():
        entries = _read_json(state).get("_data_files")
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "filename" in e for e in entries):
            raise UserError(f"{state} lists no '_data_files'")
        files = [folder / e["filename"] for e in entries]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{missing[0]} is listed in {state} but missing")
        return files
    return sorted(folder.glob("*.arrow"))


def _datasets_folder(folder: Path, split: str | None) -> Table:
    splits = splits_of(folder)
    if splits is None:  # one dataset; a --split must be the one it holds
        saved = _read_json(folder / "state.json").get("_split") if (folder / "state.json").is_file() else None
        if split is not None and split != saved:
            raise UserError(f"{folder} is one dataset (split {saved!r}); --split {split} names no split of it")
        dataset = folder
    else:
        if not splits:
            raise UserError(f"{folder} is not a datasets folder (no state.json, dataset_dict.json or .arrow files)")
        if split is None and len(splits) > 1:
            raise UserError(f"{folder} has the splits {', '.join(splits)}; pick one with --split")
        split = split if split is not None else splits[0]
        if split not in splits:
            raise UserError(f"{folder} has no split {split!r} (it has {', '.join(splits)})")
        dataset = folder / split
        if not dataset.is_dir():
            raise UserError(f"{folder} lists the split {split!r}, but {dataset} is missing")
    files = _dataset_files(dataset)
    if not files:  # what `datasets` saves for an empty split
        raise UserError(f"{dataset} holds no records")
    return _arrow(dataset, files)
