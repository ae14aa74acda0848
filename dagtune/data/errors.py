"""Bad input handling: every rejected row is reported with file, line and reason, never silently kept."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("dagtune.data")

# Enough log lines to see what is wrong without flooding the log on a 45k-row source.
MAX_LOGGED_PER_SOURCE = 20


class DataError(ValueError):
    """The data cannot be used: raised before any training starts, naming the file and the reason.
    ``bad_rows`` holds the rejected rows when too many were bad, so the node can save them."""

    def __init__(self, message: str, bad_rows: BadRowLog | None = None):
        super().__init__(message)
        self.bad_rows = bad_rows


@dataclass(frozen=True)
class BadRow:
    task: str
    file: str
    line: int  # 1-based line for JSONL/CSV; 1-based record number for JSON, Parquet and HF datasets
    reason: str  # short category used for counts, e.g. "malformed JSON"
    detail: str  # the specific problem, e.g. the field name or the parser message
    action: str = "dropped"  # dropped | kept (schema mismatches under schema_mismatch=keep)


@dataclass
class BadRowLog:
    """Collects bad rows of one source so the node can count, report and enforce max_bad_fraction."""

    task: str
    file: str
    rows: list[BadRow] = field(default_factory=list)

    def add(self, line: int, reason: str, detail: str = "", action: str = "dropped") -> None:
        row = BadRow(self.task, self.file, line, reason, detail, action)
        self.rows.append(row)
        if len(self.rows) <= MAX_LOGGED_PER_SOURCE:
            log.warning(
                "%s: %s line %d: %s%s (%s)",
                self.task,
                self.file,
                line,
                reason,
                f": {detail}" if detail else "",
                action,
            )

    @property
    def dropped(self) -> list[BadRow]:
        return [r for r in self.rows if r.action == "dropped"]

    @property
    def kept(self) -> list[BadRow]:
        return [r for r in self.rows if r.action == "kept"]

    def counts(self, action: str) -> dict[str, int]:
        return dict(sorted(Counter(r.reason for r in self.rows if r.action == action).items()))

    def log_total(self) -> None:
        if len(self.rows) > MAX_LOGGED_PER_SOURCE:
            log.warning(
                "%s: %s: %d bad rows in all (first %d logged; all in bad_rows.jsonl)",
                self.task,
                self.file,
                len(self.rows),
                MAX_LOGGED_PER_SOURCE,
            )

    def check_fraction(self, rows_read: int, max_bad_fraction: float) -> None:
        """Stop when too much of a source is bad: a broken export should fail loudly, not shrink quietly."""
        n_bad = len(self.dropped)
        if rows_read and n_bad / rows_read > max_bad_fraction:
            first = "; ".join(f"line {r.line}: {r.reason}" for r in self.dropped[:5])
            raise DataError(
                f"{self.file}: {n_bad} of {rows_read} rows are bad ({n_bad / rows_read:.1%} > "
                f"max_bad_fraction {max_bad_fraction:.1%}) for task {self.task}; first: {first}. "
                f"Fix the source or raise prepare_data.max_bad_fraction.",
                bad_rows=self,
            )


def write_bad_rows(path: Path, logs: list[BadRowLog]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for bad in logs:
            for row in bad.rows:
                f.write(json.dumps(asdict(row), ensure_ascii=False) + "\n")


def bad_row_summary(bad: BadRowLog) -> dict[str, Any]:
    return {
        "file": bad.file,
        "dropped": len(bad.dropped),
        "dropped_by_reason": bad.counts("dropped"),
        "kept_with_warning": len(bad.kept),
        "kept_by_reason": bad.counts("kept"),
    }
