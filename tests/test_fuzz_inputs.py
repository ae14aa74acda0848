"""Hypothesis fuzzing of the data loaders and the config loader.

Whatever the bytes, only the project's own errors escape (``DataError`` / ``ConfigError``), and what
they report names the file and line (data) or the YAML path (config). Budgets are fixed and the runs
derandomized so CI time and results are the same every run (whole file: well under a minute on a
2-core machine).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dagtune.config import DEFAULT_CONFIG, ConfigError, PrepareDataConfig, load_config
from dagtune.data import DataError
from dagtune.data.node import load_task

FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
WEIRD = st.characters(codec="utf-8", exclude_categories=["Cs"]) | st.sampled_from(
    ["\u2028", "\u0085", "\x00", "\r", "\n", '"', ",", "{", "}", "[", "]", "\\", "\ufeff"]
)
JSON_LEAF = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(WEIRD, max_size=20)
)
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(WEIRD, max_size=8), kids, max_size=4),
    max_leaves=20,
)
# Records that look like each task's formats, with every field free to be wrong.
EQN_RECORD = st.fixed_dictionaries(
    {},
    optional={
        "line": JSON_LEAF,
        "eqn": st.sampled_from(["1+1=2", "", "2*3=6=6", "x"]) | JSON_LEAF,
        "type": st.sampled_from(["correct", "flawed", "missing", "other"]) | JSON_LEAF,
        "id": JSON_LEAF,
    },
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", "x"]) | JSON_LEAF},
    optional={"content": JSON_VALUE, "tool_calls": JSON_VALUE},
)
MOBILE_RECORD = st.fixed_dictionaries(
    {},
    optional={
        "messages": st.lists(MESSAGE, max_size=3) | JSON_VALUE,
        "tools": JSON_VALUE,
        "dialect": JSON_LEAF,
        "domain": JSON_LEAF,
    },
)
LABELED_RECORD = st.fixed_dictionaries(
    {},
    optional={"question": JSON_LEAF, "solution": JSON_LEAF, "label": JSON_LEAF, "error_type": JSON_LEAF},
)


def _load(task: str, name: str, content: bytes, fmt: str = "auto") -> None:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / name).write_bytes(content)
        cfg = PrepareDataConfig.model_validate(
            {task: {"source": {"kind": "file", "path": name, "format": fmt}}, "max_row_chars": 2000}
        )
        loaded = load_task(task, getattr(cfg, task), 0, Path(d), cfg.max_row_chars)
    n_lines = content.count(b"\n") + 1
    for bad in loaded.bad.rows:
        assert bad.file == name and 1 <= bad.line <= max(n_lines, len(content)), bad


def _only_data_errors(task: str, name: str, content: bytes, fmt: str = "auto") -> None:
    try:
        _load(task, name, content, fmt)
    except DataError as e:
        assert name in str(e), str(e)


def _jsonl(records: list[Any], junk: list[str]) -> bytes:
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    for i, j in enumerate(junk):
        lines.insert((i * 7) % (len(lines) + 1), j)
    return "\n".join(lines).encode("utf-8", "surrogatepass")


@FUZZ
@given(st.lists(MOBILE_RECORD | JSON_VALUE, max_size=8), st.lists(st.text(WEIRD, max_size=30), max_size=3))
def test_jsonl_function_calling_loader_raises_only_data_errors(records, junk):
    _only_data_errors("function_calling", "fc.jsonl", _jsonl(records, junk), "mobile_actions")


@FUZZ
@given(st.lists(EQN_RECORD, max_size=8), st.lists(st.text(WEIRD, max_size=30), max_size=3))
def test_jsonl_extractor_loader_raises_only_data_errors(records, junk):
    _only_data_errors("extractor", "eq.jsonl", _jsonl(records, junk), "eqn_csv")


@FUZZ
@given(st.lists(st.lists(st.text(WEIRD, max_size=12), min_size=1, max_size=5), max_size=8))
def test_csv_loaders_raise_only_data_errors(rows):
    header = ["question,solution,label", "line,eqn,type"]
    for i, head in enumerate(header):
        body = "\n".join(",".join(r) for r in rows)
        task = ("classifier", "extractor")[i]
        _only_data_errors(task, f"{task}.csv", (head + "\n" + body).encode("utf-8", "surrogatepass"))


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_data_errors(blob):
    for name in ("x.jsonl", "x.csv", "x.json"):
        _only_data_errors("classifier", name, blob)


@FUZZ
@given(st.lists(LABELED_RECORD | JSON_VALUE, max_size=8))
def test_json_list_loader_raises_only_data_errors(records):
    _only_data_errors("classifier", "c.json", json.dumps(records).encode())


@FUZZ
@given(st.lists(st.sampled_from(["\u2028", "\u0085", "\u2029", "\x1c", "\x0b"]), min_size=1, max_size=6))
def test_jsonl_line_numbers_survive_unicode_separators(seps):
    lines = [
        json.dumps({"line": f"a{s}b", "eqn": "1+1=2", "type": "correct"}, ensure_ascii=False) for s in seps
    ]
    lines.insert(1, "{not json")
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "e.jsonl").write_text("\n".join(lines), encoding="utf-8")
        cfg = PrepareDataConfig.model_validate({"extractor": {"source": {"kind": "file", "path": "e.jsonl"}}})
        loaded = load_task("extractor", cfg.extractor, 0, Path(d))
    assert [b.line for b in loaded.bad.rows] == [2]
    assert len(loaded.examples) == len(seps)


# ------------------------------------------------------------------------------------------------
# config loader
# ------------------------------------------------------------------------------------------------
BASE = yaml.safe_load(DEFAULT_CONFIG.read_text())
PATHS = [
    ("prepare_data", "extractor", "source", "num_examples"),
    ("train_extractor", "optim", "epochs"),
    ("train_extractor", "optim", "batch_size"),
    ("evaluate", "max_new_tokens"),
    ("register", "tracking_uri"),
    ("runtime", "backend"),
    ("profiles",),
    ("profiles", "tiny"),
    ("default_profile",),
    ("project",),
    ("convert_gguf", "quantizations"),
]


def _set(raw: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = raw
    for k in path[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[path[-1]] = value


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(PATHS), JSON_VALUE), min_size=1, max_size=3))
def test_config_values_raise_only_config_errors_naming_the_path(edits):
    import copy

    raw = copy.deepcopy(BASE)
    for path, value in edits:
        _set(raw, path, value)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "c.yaml"
        p.write_text(yaml.safe_dump(raw, allow_unicode=True))
        try:
            load_config(p)
        except ConfigError as e:
            msg = str(e)
            assert str(p) in msg and len(msg) < 20_000
            assert any(".".join(path[:2]) in msg or path[0] in msg for path, _ in edits), msg


@FUZZ
@given(
    st.binary(max_size=400) | st.text(WEIRD, max_size=400).map(lambda t: t.encode("utf-8", "surrogatepass"))
)
def test_config_bytes_raise_only_config_errors(blob):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "c.yaml"
        p.write_bytes(blob)
        try:
            load_config(p)
        except ConfigError as e:
            assert str(p) in str(e) and len(str(e)) < 20_000
