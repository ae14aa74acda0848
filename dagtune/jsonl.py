"""Reading JSON-lines logs (train_log.jsonl): one JSON object per line; a line cut by a kill or not
an object is skipped, not fatal (the writer appends while it trains)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file, in order; [] when the file does not exist."""
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out
