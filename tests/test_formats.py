"""FunctionGemma call and <eq> formats: exact rendering, round trips, and malformed output -> None."""

from __future__ import annotations

import math

import pytest

from dagtune.formats import (
    ESCAPE,
    format_eq,
    format_function_call,
    format_function_calls,
    parse_eq,
    parse_function_calls,
)

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    HAVE_HYPOTHESIS = True
except ImportError:  # hypothesis is a test-only extra; the hand-written round trips still run
    HAVE_HYPOTHESIS = False

ARGS = {
    "key": "string value",
    "count": 3,
    "flag": True,
    "ratio": 0.5,
    "items": ["a", 2],
    "nested": {"k": "v"},
}


def test_format_matches_functiongemma_layout() -> None:
    assert format_function_call("NAME", ARGS) == (
        "<start_function_call>call:NAME{key:<escape>string value<escape>,count:3,flag:true,"
        "ratio:0.5,items:[<escape>a<escape>,2],nested:{k:<escape>v<escape>}}<end_function_call>"
    )
    assert format_function_call("ping", {}) == "<start_function_call>call:ping{}<end_function_call>"
    assert format_function_call("f", {"x": None, "y": False, "z": -1.5e-07}) == (
        "<start_function_call>call:f{x:null,y:false,z:-1.5e-07}<end_function_call>"
    )


@pytest.mark.parametrize(
    "arguments",
    [
        ARGS,
        {},
        {"city": "القاهرة", "note": "  spaces kept  ", "empty": "", "lst": [], "obj": {}},
        {"tricky": "a,b:{c}[d] <end_function_call> call:x{}", "n": -0.0, "big": 10**30},
        {"deep": {"a": [{"b": [1, 2.25, None, True, "s"]}]}},
    ],
)
def test_round_trip_examples(arguments: dict) -> None:
    text = format_function_call("get_weather", arguments)
    assert parse_function_calls(text) == [{"name": "get_weather", "arguments": arguments}]


def test_numpy_values_are_unwrapped() -> None:
    np = pytest.importorskip("numpy")
    text = format_function_call(
        "f", {"n": np.int64(3), "x": np.float64(0.5), "b": np.bool_(True), "a": np.array([1, 2])}
    )
    assert text == "<start_function_call>call:f{n:3,x:0.5,b:true,a:[1,2]}<end_function_call>"


def test_parallel_calls_and_trailers() -> None:
    calls = [
        {"name": "get_weather", "arguments": {"city": "Tokyo"}},
        {"name": "get_stock_price", "arguments": {"ticker": "GOOG"}},
    ]
    text = format_function_calls(calls)
    assert parse_function_calls(text) == calls
    # Whitespace between calls, end-of-turn and a hallucinated tool response after them are fine.
    spaced = text.replace("<end_function_call><start", "<end_function_call>\n <start")
    assert parse_function_calls(spaced) == calls
    assert parse_function_calls(text + "<end_of_turn>\nanything") == calls
    assert parse_function_calls(text + "<start_function_response>response:x{}") == calls
    assert parse_function_calls("Sure! " + text) == calls  # preamble ignored


def test_tolerates_whitespace_between_tokens() -> None:
    text = "<start_function_call> call:f{ a : 1 , b : [ 2 , 3 ] }<end_function_call>"
    assert parse_function_calls(text) == [{"name": "f", "arguments": {"a": 1, "b": [2, 3]}}]


def test_types_survive_parsing() -> None:
    (call,) = parse_function_calls(
        "<start_function_call>call:f{i:3,f:3.0,e:1e3,b:true,n:null}<end_function_call>"
    )
    args = call["arguments"]
    assert args == {"i": 3, "f": 3.0, "e": 1000.0, "b": True, "n": None}
    assert type(args["i"]) is int and type(args["f"]) is float and type(args["b"]) is bool


def test_no_call_is_empty_list() -> None:
    assert parse_function_calls("I can't help with that.") == []
    assert parse_function_calls("") == []
    assert parse_function_calls("call:f{a:1} without the start token") == []


GOOD = "<start_function_call>call:f{a:<escape>x<escape>,b:2}<end_function_call>"


@pytest.mark.parametrize(
    "text",
    [
        GOOD[:-5],  # truncated end tag
        GOOD.replace("<end_function_call>", ""),  # no end tag
        "<start_function_call>call:f{a:<escape>x",  # unterminated string
        "<start_function_call>call:f{a:Cairo}<end_function_call>",  # unescaped string
        "<start_function_call>call:f{a:1,a:2}<end_function_call>",  # duplicate key
        "<start_function_call>call:f{a:1,}<end_function_call>",  # trailing comma
        "<start_function_call>call:f{a:}<end_function_call>",  # missing value
        "<start_function_call>f{a:1}<end_function_call>",  # missing call: prefix
        "<start_function_call>call:{a:1}<end_function_call>",  # missing name
        "<start_function_call>call:f(a=1)<end_function_call>",  # python syntax
        "<start_function_call>call:f{a:[1,2}<end_function_call>",  # unbalanced
        '<start_function_call>call:f{"a": 1}<end_function_call>',  # JSON keys
        GOOD + " and some chatter",  # trailing text that is not an end marker
        "<start_function_call><start_function_call>call:f{}<end_function_call>",
        "stray <end_function_call>",  # end without start
        "<start_function_call>call:f{a:" + "[" * 10_000 + "1",  # deep garbage, no RecursionError
        "<start_function_call>" * 500,
    ],
)
def test_malformed_is_none(text: str) -> None:
    assert parse_function_calls(text) is None


def test_non_string_input_is_none() -> None:
    assert parse_function_calls(None) is None
    assert parse_function_calls(42) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name,arguments",
    [
        ("bad name", {}),
        ("", {}),
        ("f", {"bad key": 1}),
        ("f", {"k:v": 1}),
        ("f", {"x": math.nan}),
        ("f", {"x": math.inf}),
        ("f", {"x": f"has {ESCAPE} inside"}),
        ("f", {"x": {1, 2}}),
    ],
)
def test_formatter_rejects_unrepresentable(name: str, arguments: dict) -> None:
    with pytest.raises((ValueError, TypeError)):
        format_function_call(name, arguments)


if HAVE_HYPOTHESIS:
    _keys = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True)
    _strings = st.text(max_size=30).filter(lambda s: ESCAPE not in s)
    _scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(10**18), max_value=10**18)
        | st.floats(allow_nan=False, allow_infinity=False)
        | _strings
    )
    _values = st.recursive(
        _scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4),
        max_leaves=20,
    )

    @settings(max_examples=300, deadline=None)
    @given(
        name=st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,20}", fullmatch=True),
        arguments=st.dictionaries(_keys, _values, max_size=6),
    )
    def test_round_trip_property(name: str, arguments: dict) -> None:
        assert parse_function_calls(format_function_call(name, arguments)) == [
            {"name": name, "arguments": arguments}
        ]

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=200))
    def test_parser_never_raises(text: str) -> None:
        result = parse_function_calls("<start_function_call>call:f{" + text)
        assert result is None or isinstance(result, list)

else:  # pragma: no cover

    @pytest.mark.skip(reason="hypothesis not installed")
    def test_round_trip_property() -> None: ...


def test_format_eq() -> None:
    assert format_eq("2+3=5") == "<eq>2+3=5</eq>"
    assert format_eq(" 2+3=5 ") == "<eq>2+3=5</eq>"
    assert format_eq(None) == "<eq></eq>"
    assert format_eq("") == "<eq></eq>"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("<eq>2+3=5</eq>", "2+3=5"),
        ("<eq> 2 + 3 = 5 </eq><end_of_turn>", "2 + 3 = 5"),
        ("<eq></eq>", ""),
        ("The equation is <eq>4*5=20</eq>.", "4*5=20"),
        ("<eq>1=1</eq><eq>2=2</eq>", "1=1"),  # first pair wins
        ("2+3=5", None),  # no tags
        ("<eq>2+3=5", None),  # unclosed
        ("2+3=5</eq>", None),  # no opening tag
        ("<eq><eq>2+3=5</eq>", None),  # nested
        ("", None),
        (None, None),
    ],
)
def test_parse_eq(text: str | None, expected: str | None) -> None:
    assert parse_eq(text) == expected


def test_eq_round_trip() -> None:
    for eqn in ["12*3=36", "", "٣+٤=٧"]:
        assert parse_eq(format_eq(eqn)) == eqn
