"""Read a task's source into plain records with their line numbers: files, HF datasets, saved datasets."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dagtune.data.errors import BadRowLog, DataError

FILE_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class RawRow:
    line: int  # 1-based line (JSONL/CSV) or record number (JSON/Parquet/HF)
    record: dict[str, Any]


@dataclass
class SourceRows:
    name: str  # the path or id as configured: reports stay the same on every machine
    rows: list[RawRow]
    columns: list[str]
    rows_read: int  # every record seen, including lines that could not be parsed
    bad: BadRowLog = field(repr=False)  # problems found while reading; the loaders add theirs


def row_id(rec: dict[str, Any], name: str, line: int, *keys: str) -> str:
    """The source's own id when it has one, else "<file name>:<line>" (short, stable across machines)."""
    for key in keys:
        if rec.get(key) not in (None, ""):
            return str(rec[key])
    return f"{Path(name).name}:{line}"


def resolve(path: str, config_dir: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (config_dir / p)


def read_text(path: Path) -> str:
    """UTF-8 only (a BOM is fine): a latin-1 or UTF-16 export would otherwise turn into mojibake rows."""
    if not path.is_file():
        raise DataError(f"{path}: source file not found")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: unreadable encoding, not UTF-8 (byte {e.start}: {data[e.start : e.start + 4]!r})"
        ) from None


def clean_value(v: Any) -> Any:
    """Parquet/Arrow hand back NaN for missing cells and numpy arrays for lists; make them plain Python."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):
        return clean_value(v.tolist())
    if isinstance(v, dict):
        return {k: clean_value(x) for k, x in v.items()}
    if isinstance(v, list):
        return [clean_value(x) for x in v]
    return v


def read_jsonl(text: str, bad: BadRowLog) -> tuple[list[RawRow], int]:
    rows, seen = [], 0
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        seen += 1
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            bad.add(i, "malformed JSON", e.msg)
            continue
        if not isinstance(rec, dict):
            bad.add(i, "wrong type", f"line is a JSON {type(rec).__name__}, expected an object")
            continue
        rows.append(RawRow(i, rec))
    return rows, seen


def read_json(text: str, path: Path, bad: BadRowLog) -> tuple[list[RawRow], int]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if isinstance(data, dict):  # {"data": [...]} style exports
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of records or an object holding one list")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    rows = []
    for i, rec in enumerate(data, start=1):
        if isinstance(rec, dict):
            rows.append(RawRow(i, rec))
        else:
            bad.add(i, "wrong type", f"record is a JSON {type(rec).__name__}, expected an object")
    return rows, len(data)


def read_csv(text: str, path: Path, bad: BadRowLog) -> tuple[list[RawRow], int, list[str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), restkey="__extra__")
    columns = [c.strip() for c in (reader.fieldnames or [])]
    if not columns:
        raise DataError(f"{path}: empty CSV (no header)")
    reader.fieldnames = columns
    rows, seen, prev_end = [], 0, 1
    for rec in reader:
        start = prev_end + 1  # a quoted field may span lines: report where the record starts
        prev_end = reader.line_num
        seen += 1
        if "__extra__" in rec:
            bad.add(
                start,
                "malformed row",
                f"{len(columns) + len(rec['__extra__'])} fields, header has {len(columns)}",
            )
            continue
        missing = [c for c, v in rec.items() if v is None]
        if missing:
            bad.add(start, "missing field", f"row ends before column(s) {missing}")
            continue
        rows.append(RawRow(start, dict(rec)))
    return rows, seen, columns


def read_parquet(path: Path) -> tuple[list[RawRow], int, list[str]]:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"{path}: source file not found")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: unreadable Parquet file ({e})") from None
    records = table.to_pylist()
    return (
        [RawRow(i, clean_value(r)) for i, r in enumerate(records, start=1)],
        len(records),
        table.column_names,
    )


def read_file(path_str: str, config_dir: Path, bad: BadRowLog) -> SourceRows:
    path = resolve(path_str, config_dir)
    kind = FILE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; allowed: {sorted(FILE_SUFFIXES)}")
    if kind == "parquet":
        rows, seen, columns = read_parquet(path)
    elif kind == "csv":
        rows, seen, columns = read_csv(read_text(path), path, bad)
    else:
        text = read_text(path)
        rows, seen = read_jsonl(text, bad) if kind == "jsonl" else read_json(text, path, bad)
        columns = sorted({k for r in rows for k in r.record})
    if seen == 0:
        raise DataError(f"{path}: empty dataset (no rows)")
    return SourceRows(path_str, rows, columns, seen, bad)


def is_saved_dataset(path: Path) -> bool:
    """A directory written by Dataset(Dict).save_to_disk (as opposed to a folder of data files)."""
    return path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json"))


def read_hf(
    hf_id: str,
    hf_config: str | None,
    split: str,
    config_dir: Path,
    bad: BadRowLog,
    revision: str | None = None,
) -> SourceRows:
    """A save_to_disk directory, a local dataset folder, or a hub dataset at the commit sha its key
    holds (``revision``: the configured branch/tag/sha, see dagtune.hub)."""
    import datasets

    local = resolve(hf_id, config_dir)
    name = f"{hf_id}[{split}]"
    try:
        if is_saved_dataset(local):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{local}: split {split!r} not found; available: {sorted(ds)}")
                ds = ds[split]
        elif local.is_dir():
            ds = datasets.load_dataset(str(local), hf_config, split=split)
        else:
            from dagtune.hub import loaded_revision

            sha = loaded_revision("dataset", hf_id, revision, f"source {hf_id}")
            ds = datasets.load_dataset(hf_id, hf_config, split=split, revision=sha)
    except DataError:
        raise
    except Exception as e:  # hub errors, missing splits, bad data files: say which dataset, then stop
        raise DataError(
            f"{hf_id}: cannot load Hugging Face dataset (config={hf_config}, split={split}): {e}"
        ) from e
    records = ds.to_list()
    if not records:
        raise DataError(f"{name}: empty dataset (no rows)")
    rows = [RawRow(i, clean_value(r)) for i, r in enumerate(records, start=1)]
    return SourceRows(name, rows, list(ds.column_names), len(records), bad)


def read_rows(source: Any, config_dir: Path, task: str) -> SourceRows:
    """Every record of a file or HF source, with bad lines already reported (source: SourceConfig)."""
    if source.kind == "file":
        return read_file(source.path, config_dir, BadRowLog(task, source.path))
    if source.kind == "hf":
        name = f"{source.hf_id}[{source.hf_split}]"
        return read_hf(
            source.hf_id,
            source.hf_config,
            source.hf_split,
            config_dir,
            BadRowLog(task, name),
            source.revision,
        )
    raise ValueError(f"read_rows: source kind {source.kind!r} has no rows to read")
