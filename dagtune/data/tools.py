"""Tool schemas and call arguments: normalize OpenAI-style tools, decode arguments, check them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dagtune.data.errors import DataError

# JSON-schema type -> the Python types a decoded JSON value of that type has (bool is not a number).
JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
    "null": (type(None),),
}


class RowProblem(Exception):
    """A problem with one row: (reason category, detail). Caught by the loaders and reported."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def drop_nones(obj: Any) -> Any:
    """Arrow-backed sources (Parquet, HF) unify structs, so a tool's properties gain every other tool's
    keys with None values; drop them so the schema is the one the tool declared."""
    if isinstance(obj, dict):
        return {k: drop_nones(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [drop_nones(v) for v in obj]
    return obj


def normalize_tool(tool: Any) -> dict[str, Any]:
    """{"type": "function", "function": {name, description, parameters}} from the usual variants
    (with or without the "type"/"function" wrapper, as the Mobile Actions data omits "type")."""
    if not isinstance(tool, dict):
        raise RowProblem("wrong type", f"tool is a {type(tool).__name__}, expected an object")
    fn = tool.get("function", tool)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise RowProblem("missing field", "tool without function.name")
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(params, dict) or not isinstance(params.get("properties", {}), dict):
        raise RowProblem("wrong type", f"tool {fn['name']}: parameters must be an object schema")
    params = {"type": "object", "properties": {}, **drop_nones(params)}
    return {
        "type": "function",
        "function": {
            "name": fn["name"],
            "description": str(fn.get("description") or ""),
            "parameters": params,
        },
    }


def tool_name(tool: dict[str, Any]) -> str:
    return tool["function"]["name"]


def decode_arguments(raw: Any) -> dict[str, Any]:
    """Arguments as a dict. The real data encodes them as JSON twice (a JSON string holding a JSON object
    string): decode until an object comes out instead of rejecting the row."""
    value = raw
    for _ in range(3):
        if not isinstance(value, str):
            break
        if not value.strip():
            value = {}
            break
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RowProblem("malformed JSON", f"arguments: {e.msg}") from None
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise RowProblem(
            "wrong type", f"arguments decode to a JSON {type(value).__name__}, expected an object"
        )
    return value


def type_matches(value: Any, expected: str | list[str]) -> bool:
    names = expected if isinstance(expected, list) else [expected]
    for name in names:
        allowed = JSON_TYPES.get(name)
        if allowed is None:  # a type we do not know: do not reject the row for it
            return True
        if isinstance(value, bool) and bool not in allowed:
            continue
        if isinstance(value, allowed):
            return True
    return False


def schema_problems(arguments: dict[str, Any], tool: dict[str, Any]) -> list[str]:
    """Unknown keys, missing required keys, wrong JSON types, values outside an enum."""
    params = tool["function"]["parameters"]
    props: dict[str, Any] = params.get("properties") or {}
    problems = [f"unknown argument {k!r}" for k in arguments if k not in props]
    problems += [
        f"missing required argument {k!r}" for k in params.get("required") or [] if k not in arguments
    ]
    for key, value in arguments.items():
        spec = props.get(key)
        if not isinstance(spec, dict):
            continue
        if "type" in spec and not type_matches(value, spec["type"]):
            problems.append(f"argument {key!r} is {type(value).__name__}, schema says {spec['type']}")
        elif "enum" in spec and value not in spec["enum"]:
            problems.append(f"argument {key!r}={value!r} not in enum")
    return problems


class ToolCatalog:
    """Every tool seen in a source (or given in a catalog file), by name; the first definition wins."""

    def __init__(self) -> None:
        self.tools: dict[str, dict[str, Any]] = {}
        self.conflicts: set[str] = set()

    def add(self, tool: dict[str, Any]) -> None:
        name = tool_name(tool)
        if name not in self.tools:
            self.tools[name] = tool
        elif self.tools[name] != tool:
            self.conflicts.add(name)

    def get(self, name: str) -> dict[str, Any] | None:
        return self.tools.get(name)

    def names(self) -> list[str]:
        return sorted(self.tools)

    def __len__(self) -> int:
        return len(self.tools)


def load_catalog(path: Path) -> ToolCatalog:
    """A JSON file with a list of OpenAI-style tools, {"tools": [...]}, or {name: function-schema}."""
    if not path.is_file():
        raise DataError(f"{path}: tool catalog file not found")
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: tool catalog is not valid UTF-8 JSON ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("tools"), list):
        data = data["tools"]
    elif isinstance(data, dict):
        data = [{"name": k, **v} if isinstance(v, dict) else v for k, v in data.items()]
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}: tool catalog must be a non-empty list of tools")
    catalog = ToolCatalog()
    for i, tool in enumerate(data, start=1):
        try:
            catalog.add(normalize_tool(tool))
        except RowProblem as e:
            raise DataError(f"{path}: tool #{i}: {e.reason}: {e.detail}") from None
    return catalog
