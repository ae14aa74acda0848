"""Function-calling sources: Google Mobile Actions JSONL and the flat Arabic_Function_Calling columns."""

from __future__ import annotations

import random
from typing import Any

from dagtune.data.errors import BadRowLog
from dagtune.data.io import RawRow, SourceRows, row_id
from dagtune.data.tools import (
    RowProblem,
    ToolCatalog,
    decode_arguments,
    normalize_tool,
    schema_problems,
    tool_name,
)

MOBILE_ACTIONS_FIELDS = ("tools", "messages", "dialect", "domain")
FLAT_FIELDS = ("query_ar", "function_name", "arguments", "dialect", "domain", "requires_function")
# Roles that carry instructions rather than the request; the node writes its own developer turn.
INSTRUCTION_ROLES = ("system", "developer")


def require_str(rec: dict[str, Any], key: str, allow_empty: bool = False) -> str:
    value = rec.get(key)
    if value is None:
        raise RowProblem("missing field", key)
    if not isinstance(value, str):
        raise RowProblem("wrong type", f"{key} is {type(value).__name__}, expected a string")
    if not allow_empty and not value.strip():
        raise RowProblem("missing field", f"{key} is empty")
    return value.strip()


def require_fields(rec: dict[str, Any], fields: tuple[str, ...]) -> None:
    missing = [f for f in fields if f not in rec]
    if missing:
        raise RowProblem("missing field", ", ".join(missing))


def parse_bool(value: Any, key: str) -> bool:
    """CSV exports write booleans as text."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise RowProblem("wrong type", f"{key}={value!r}, expected a boolean")


def example(
    rid: str,
    source: str,
    user: str,
    dialect: str,
    domain: str,
    tools: list[dict[str, Any]],
    name: str = "",
    arguments: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": rid,
        "source": source,
        "group": rid,
        "user": user,
        "dialect": dialect,
        "domain": domain,
        "has_call": bool(name),
        "target_name": name,
        "target_arguments": arguments or {},
        "tools": tools,
    }


def split_messages(messages: Any) -> tuple[str, dict[str, Any]]:
    """(user text, assistant message) of a single-turn conversation."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise RowProblem("wrong type", "messages must be a list of objects")
    turns = [m for m in messages if m.get("role") not in INSTRUCTION_ROLES]
    roles = [m.get("role") for m in turns]
    if roles != ["user", "assistant"]:
        raise RowProblem("malformed conversation", f"expected user then assistant, got roles {roles}")
    user = require_str(turns[0], "content")
    return user, turns[1]


def assistant_call(assistant: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The (name, arguments) the assistant calls, or None for a negative (no tool_calls)."""
    calls = assistant.get("tool_calls") or []
    if not isinstance(calls, list):
        raise RowProblem("wrong type", "tool_calls must be a list")
    if not calls:
        return None
    if len(calls) > 1:
        raise RowProblem(
            "unsupported", f"{len(calls)} parallel tool calls; one call per example is supported"
        )
    fn = calls[0].get("function") if isinstance(calls[0], dict) else None
    if not isinstance(fn, dict):
        raise RowProblem("missing field", "tool_calls[0].function")
    name = require_str(fn, "name")
    return name, decode_arguments(fn.get("arguments"))


def check_call(
    name: str,
    arguments: dict[str, Any],
    tools: dict[str, dict[str, Any]],
    policy: str,
    row: RawRow,
    bad: BadRowLog,
) -> None:
    """Unknown tool: always bad. Schema mismatch: bad under policy=drop, reported-and-kept under keep."""
    tool = tools.get(name)
    if tool is None:
        raise RowProblem("unknown tool", f"{name!r} is not among the declared tools")
    problems = schema_problems(arguments, tool)
    if not problems:
        return
    if policy == "drop":
        raise RowProblem("schema mismatch", f"{name}: " + "; ".join(problems))
    bad.add(row.line, "schema mismatch", f"{name}: " + "; ".join(problems), action="kept")


def parse_mobile_actions_row(
    row: RawRow, catalog: ToolCatalog, policy: str, bad: BadRowLog, name: str
) -> dict[str, Any]:
    rec = row.record
    require_fields(rec, MOBILE_ACTIONS_FIELDS)
    if not isinstance(rec["tools"], list):
        raise RowProblem("wrong type", "tools must be a list")
    tools = [normalize_tool(t) for t in rec["tools"]]
    user, assistant = split_messages(rec["messages"])
    dialect, domain = require_str(rec, "dialect"), require_str(rec, "domain")
    call = assistant_call(assistant)
    if call:  # last check: a kept schema mismatch is reported only for a row that is kept
        check_call(call[0], call[1], {tool_name(t): t for t in tools}, policy, row, bad)
    for t in tools:
        catalog.add(t)
    rid = row_id(rec, name, row.line, "original_id", "id")
    return example(rid, f"{name}:{row.line}", user, dialect, domain, tools, *(call or ("", None)))


def load_mobile_actions(src: SourceRows, policy: str) -> tuple[list[dict[str, Any]], ToolCatalog]:
    """Google Mobile Actions rows -> examples; the catalog is every tool the source declares."""
    catalog = ToolCatalog()
    return _parse_rows(src, catalog, policy, parse_mobile_actions_row), catalog


def _parse_rows(src: SourceRows, catalog: ToolCatalog, policy: str, parse: Any) -> list[dict[str, Any]]:
    """Every row through ``parse``; a row it rejects goes to the bad-row log with its reason."""
    out = []
    for row in src.rows:
        try:
            out.append(parse(row, catalog, policy, src.bad, src.name))
        except RowProblem as e:
            src.bad.add(row.line, e.reason, e.detail)
    return out


def parse_flat_row(
    row: RawRow, catalog: ToolCatalog, policy: str, bad: BadRowLog, name: str
) -> dict[str, Any]:
    rec = row.record
    require_fields(rec, FLAT_FIELDS)
    user = require_str(rec, "query_ar")
    requires = parse_bool(rec["requires_function"], "requires_function")
    fname = rec.get("function_name") or ""
    if not isinstance(fname, str):
        raise RowProblem("wrong type", f"function_name is {type(fname).__name__}, expected a string")
    fname = fname.strip()
    if requires != bool(fname):
        raise RowProblem("inconsistent", f"requires_function={requires} but function_name={fname!r}")
    dialect, domain = require_str(rec, "dialect"), require_str(rec, "domain")
    arguments = decode_arguments(rec["arguments"]) if requires else {}
    tools: list[dict[str, Any]] = []
    if requires:  # last check: a kept schema mismatch is reported only for a row that is kept
        check_call(fname, arguments, catalog.tools, policy, row, bad)
        tools = [catalog.tools[fname]]
    rid = row_id(rec, name, row.line, "id")
    return example(rid, f"{name}:{row.line}", user, dialect, domain, tools, fname, arguments)


def load_flat(src: SourceRows, catalog: ToolCatalog, policy: str) -> list[dict[str, Any]]:
    """HeshamHaroon/Arabic_Function_Calling columns; the schemas come from the catalog file."""
    return _parse_rows(src, catalog, policy, parse_flat_row)


def add_distractors(examples: list[dict[str, Any]], catalog: ToolCatalog, k: int, seed: int) -> None:
    """Give each example k other catalog tools at shuffled positions, so the model must choose a tool.
    Seeded per example id: an example's tools do not change when other rows are added or dropped.
    Negatives get k + 1 tools, like a positive, so the number of tools does not give the label away."""
    names = catalog.names()
    for ex in examples:
        rng = random.Random(f"{seed}:distractors:{ex['id']}")
        own = [tool_name(t) for t in ex["tools"]]
        want = k + (0 if own else 1)
        pool = [n for n in names if n not in own]
        picked = rng.sample(pool, min(want, len(pool)))
        tools = list(ex["tools"]) + [catalog.tools[n] for n in picked]
        rng.shuffle(tools)
        ex["tools"] = tools
