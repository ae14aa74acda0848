"""Read a task's source into plain records with their line numbers: files, HF datasets, saved datasets."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dagtune.data.errors import BadRowLog, DataError

FILE_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# Default for prepare_data.max_row_chars (real rows are a few KB; a 50 MB row once went into training).
MAX_ROW_CHARS = 100_000


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
    resolved: str | None = None  # the local file or folder actually read (symlinks followed); None: hub


def row_id(rec: dict[str, Any], name: str, line: int, *keys: str) -> str:
    """The source's own id when it has one, else "<file name>:<line>" (short, stable across machines)."""
    for key in keys:
        if rec.get(key) not in (None, ""):
            return str(rec[key])
    return f"{Path(name).name}:{line}"


def resolve(path: str, config_dir: Path) -> Path:
    """A path the user named, made absolute against the config's folder with every symlink followed:
    the file that is read is the one the manifest records (``SourceRows.resolved``)."""
    p = Path(path).expanduser()
    return (p if p.is_absolute() else config_dir / p).resolve()


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


def parse_json_line(line: str) -> tuple[Any, str | None]:
    """(value, None) or (None, why): every parser failure, however deep or huge, is a row problem."""
    try:
        return json.loads(line), None
    except json.JSONDecodeError as e:
        return None, e.msg
    except RecursionError:
        return None, "nested too deeply"
    except ValueError as e:  # e.g. an integer literal over Python's digit limit
        return None, str(e)[:200]


def read_jsonl(text: str, bad: BadRowLog, max_chars: int = MAX_ROW_CHARS) -> tuple[list[RawRow], int]:
    rows, seen = [], 0
    # JSON Lines ends records at "\n" only: str.splitlines() would also split at U+2028, U+0085 and
    # friends, which are legal inside JSON strings, and shift every later line number.
    for i, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        seen += 1
        if len(line) > max_chars:
            bad.add(i, "row too long", f"{len(line)} characters > prepare_data.max_row_chars {max_chars}")
            continue
        rec, why = parse_json_line(line)
        if why is not None:
            bad.add(i, "malformed JSON", why)
            continue
        if not isinstance(rec, dict):
            bad.add(i, "wrong type", f"line is a JSON {type(rec).__name__}, expected an object")
            continue
        rows.append(RawRow(i, rec))
    return rows, seen


def record_chars(value: Any) -> int:
    """Characters of a parsed record's text (strings and keys, nested): what a row costs downstream."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(len(str(k)) + record_chars(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(record_chars(v) for v in value)
    return 8


def drop_long_rows(rows: list[RawRow], bad: BadRowLog, max_chars: int) -> list[RawRow]:
    kept = []
    for r in rows:
        n = record_chars(r.record)
        if n > max_chars:
            bad.add(r.line, "row too long", f"{n} characters > prepare_data.max_row_chars {max_chars}")
        else:
            kept.append(r)
    return kept


def read_json(text: str, path: Path, bad: BadRowLog) -> tuple[list[RawRow], int]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except RecursionError:
        raise DataError(f"{path}: not usable JSON (nested too deeply)") from None
    except ValueError as e:
        raise DataError(f"{path}: not usable JSON ({str(e)[:200]})") from None
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


def read_csv(
    text: str, path: Path, bad: BadRowLog, max_chars: int = MAX_ROW_CHARS
) -> tuple[list[RawRow], int, list[str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), restkey="__extra__")
    with csv_field_limit(max_chars):
        try:
            columns = [c.strip() for c in (reader.fieldnames or [])]
        except csv.Error as e:
            raise DataError(f"{path}: unreadable CSV header ({e})") from None
        if not columns:
            raise DataError(f"{path}: empty CSV (no header)")
        reader.fieldnames = columns
        rows, seen, prev_end = [], 0, reader.line_num
        while True:
            start = prev_end + 1  # a quoted field may span lines: report where the record starts
            try:
                rec = next(reader)
            except StopIteration:
                break
            except csv.Error as e:  # a field over the limit, ...: this record is bad, the reader goes on
                prev_end = reader.line_num
                seen += 1
                why = "row too long" if "field limit" in str(e) else "malformed row"
                bad.add(start, why, f"{e} (prepare_data.max_row_chars {max_chars})")
                continue
            prev_end = reader.line_num
            seen += 1
            problem = csv_row_problem(rec, columns, max_chars)
            if problem:
                bad.add(start, *problem)
                continue
            rows.append(RawRow(start, dict(rec)))
    return rows, seen, columns


def csv_row_problem(rec: dict[str, Any], columns: list[str], max_chars: int) -> tuple[str, str] | None:
    if "__extra__" in rec:
        return "malformed row", f"{len(columns) + len(rec['__extra__'])} fields, header has {len(columns)}"
    missing = [c for c, v in rec.items() if v is None]
    if missing:
        return "missing field", f"row ends before column(s) {missing}"
    n = sum(len(v) for v in rec.values())
    if n > max_chars:
        return "row too long", f"{n} characters > prepare_data.max_row_chars {max_chars}"
    return None


@contextmanager
def csv_field_limit(max_chars: int) -> Iterator[None]:
    """csv's field limit is process-global: set it for this read only."""
    old = csv.field_size_limit()
    csv.field_size_limit(max(1, max_chars))
    try:
        yield
    finally:
        csv.field_size_limit(old)


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


def read_file(path_str: str, config_dir: Path, bad: BadRowLog, max_chars: int = MAX_ROW_CHARS) -> SourceRows:
    path = resolve(path_str, config_dir)
    kind = FILE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; allowed: {sorted(FILE_SUFFIXES)}")
    if kind == "parquet":
        rows, seen, columns = read_parquet(path)
        rows = drop_long_rows(rows, bad, max_chars)
    elif kind == "csv":
        rows, seen, columns = read_csv(read_text(path), path, bad, max_chars)
    elif kind == "jsonl":
        rows, seen = read_jsonl(read_text(path), bad, max_chars)
        columns = sorted({k for r in rows for k in r.record})
    else:
        rows, seen = read_json(read_text(path), path, bad)
        rows = drop_long_rows(rows, bad, max_chars)
        columns = sorted({k for r in rows for k in r.record})
    if seen == 0:
        raise DataError(f"{path}: empty dataset (no rows)")
    return SourceRows(path_str, rows, columns, seen, bad, resolved=str(path))


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
    max_chars: int = MAX_ROW_CHARS,
) -> SourceRows:
    """A save_to_disk directory, a local dataset folder, or a hub dataset at the commit sha its key
    holds (``revision``: the configured branch/tag/sha, see dagtune.hub); rows over ``max_chars``
    characters are bad rows."""
    import datasets

    local = resolve(hf_id, config_dir)
    name = f"{hf_id}[{split}]"
    read_from = str(local) if local.is_dir() else None  # a local dataset folder, else the hub
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
    rows = drop_long_rows(rows, bad, max_chars)
    return SourceRows(name, rows, list(ds.column_names), len(records), bad, resolved=read_from)


def read_rows(source: Any, config_dir: Path, task: str, max_chars: int = MAX_ROW_CHARS) -> SourceRows:
    """Every record of a file or HF source, with bad lines already reported (source: SourceConfig);
    rows over ``max_chars`` characters are bad rows."""
    if source.kind == "file":
        return read_file(source.path, config_dir, BadRowLog(task, source.path), max_chars)
    if source.kind == "hf":
        name = f"{source.hf_id}[{source.hf_split}]"
        return read_hf(
            source.hf_id,
            source.hf_config,
            source.hf_split,
            config_dir,
            BadRowLog(task, name),
            source.revision,
            max_chars,
        )
    raise ValueError(f"read_rows: source kind {source.kind!r} has no rows to read")
