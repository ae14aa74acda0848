"""prepare_data building blocks without tokenizers: parsing, validation, splitting, leakage, synthetic data."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from dagtune.data import DataError
from dagtune.data.errors import BadRowLog
from dagtune.data.function_calling import add_distractors, load_flat, load_mobile_actions
from dagtune.data.io import read_file
from dagtune.data.math_tasks import load_eqn_rows, load_labeled_rows, load_pairs_rows
from dagtune.data.split import (
    allocate,
    jaccard,
    lsh_shape,
    normalize_text,
    remove_leakage,
    split_stratified,
    trigrams,
)
from dagtune.data.synthetic import (
    DEVELOPER_PROMPT,
    DIALECTS,
    KEYWORDS,
    NEGATIVE_REPLY,
    SYNTHETIC_TOOLS,
    synthetic_classifier,
    synthetic_extractor,
    synthetic_function_calling,
    tokenizer_corpus,
)
from dagtune.data.tools import RowProblem, ToolCatalog, decode_arguments, normalize_tool, schema_problems

WEATHER = {
    "function": {
        "name": "get_weather",
        "description": "Weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    }
}


def ma_row(user: str, args: object | None, dialect: str = "MSA", tools: list | None = None) -> dict:
    """One Mobile Actions record; args=None makes a negative, a dict is encoded twice like the real data."""
    if args is None:
        assistant = {"role": "assistant", "content": ""}
    else:
        encoded = json.dumps(json.dumps(args)) if isinstance(args, dict) else args
        call = {"type": "function", "function": {"name": "get_weather", "arguments": encoded}}
        assistant = {"role": "assistant", "tool_calls": [call]}
    return {
        "tools": [WEATHER] if tools is None else tools,
        "messages": [{"role": "user", "content": user}, assistant],
        "dialect": dialect,
        "domain": "weather" if args is not None else "unknown",
    }


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n"
    )
    return path


# ------------------------------------------------------------------------------------------------
# arguments and schemas
# ------------------------------------------------------------------------------------------------
def test_arguments_encoded_twice_are_decoded():
    once = json.dumps({"city": "جدة", "days": 1}, ensure_ascii=False)
    assert decode_arguments(json.dumps(once)) == {"city": "جدة", "days": 1}
    assert decode_arguments(once) == {"city": "جدة", "days": 1}
    assert decode_arguments({"city": "x"}) == {"city": "x"}
    with pytest.raises(RowProblem, match="malformed JSON"):
        decode_arguments('{"city": ')
    with pytest.raises(RowProblem, match="expected an object"):
        decode_arguments("[1, 2]")


def test_schema_problems_name_each_mismatch():
    tool = normalize_tool(WEATHER)
    assert schema_problems({"city": "Cairo", "days": 3}, tool) == []
    problems = schema_problems({"town": "Cairo", "days": "3"}, tool)
    assert "unknown argument 'town'" in problems
    assert "missing required argument 'city'" in problems
    assert any("'days' is str, schema says integer" in p for p in problems)
    assert schema_problems({"city": "x", "days": True}, tool)  # a bool is not an integer


def test_mobile_actions_rows_reported_with_line_and_reason(tmp_path):
    rows = [
        ma_row("الطقس في جدة", {"city": "جدة", "days": 1}),
        "{not json",
        ma_row("كيفك", None, dialect="Levantine"),
        {"tools": [WEATHER], "messages": [{"role": "user", "content": "x"}], "domain": "weather"},
        ma_row("الطقس في دبي", {"town": "دبي"}),
        ma_row("الطقس", '"{\\"city\\": "'),
        ma_row("الطقس في عمان", {"city": 5}),
    ]
    src = read_file(str(write_jsonl(tmp_path / "ma.jsonl", rows)), tmp_path, BadRowLog("fc", "ma.jsonl"))
    examples, catalog = load_mobile_actions(src, policy="drop")
    assert [e["target_arguments"] for e in examples] == [{"city": "جدة", "days": 1}, {}]
    assert [e["has_call"] for e in examples] == [True, False]
    got = {(r.line, r.reason) for r in src.bad.rows}
    assert got == {
        (2, "malformed JSON"),
        (4, "missing field"),
        (5, "schema mismatch"),
        (6, "malformed JSON"),
        (7, "schema mismatch"),
    }
    assert src.rows_read == 7 and catalog.names() == ["get_weather"]

    src = read_file(str(tmp_path / "ma.jsonl"), tmp_path, BadRowLog("fc", "ma.jsonl"))
    examples, _ = load_mobile_actions(src, policy="keep")
    assert len(examples) == 4  # the two schema mismatches are kept ...
    assert sorted(r.line for r in src.bad.kept) == [5, 7]  # ... and still reported


def test_flat_format_with_catalog(tmp_path):
    catalog = ToolCatalog()
    catalog.add(normalize_tool(WEATHER))
    rows = [
        {
            "id": "a",
            "query_ar": "الطقس في جدة",
            "function_name": "get_weather",
            "arguments": json.dumps({"city": "جدة"}),
            "dialect": "Gulf",
            "domain": "weather",
            "requires_function": True,
        },
        {
            "id": "b",
            "query_ar": "شكرا",
            "function_name": "",
            "arguments": "{}",
            "dialect": "MSA",
            "domain": "unknown",
            "requires_function": "false",
        },
        {
            "id": "c",
            "query_ar": "احجز",
            "function_name": "book_flight",
            "arguments": "{}",
            "dialect": "MSA",
            "domain": "travel",
            "requires_function": True,
        },
        {
            "id": "d",
            "query_ar": "x",
            "function_name": "",
            "arguments": "{}",
            "dialect": "MSA",
            "domain": "travel",
            "requires_function": True,
        },
    ]
    src = read_file(str(write_jsonl(tmp_path / "flat.jsonl", rows)), tmp_path, BadRowLog("fc", "flat"))
    examples = load_flat(src, catalog, policy="drop")
    assert [e["id"] for e in examples] == ["a", "b"]
    assert {(r.line, r.reason) for r in src.bad.rows} == {(3, "unknown tool"), (4, "inconsistent")}


def test_distractors_are_deterministic_shuffled_and_exclude_the_target():
    examples, catalog = synthetic_function_calling(40, 0.1, seed=3)
    add_distractors(examples, catalog, k=3, seed=3)
    again, _ = synthetic_function_calling(40, 0.1, seed=3)
    add_distractors(list(reversed(again)), catalog, k=3, seed=3)  # order of rows does not matter
    positions = Counter()
    for ex, ex2 in zip(examples, again, strict=True):
        names = [t["function"]["name"] for t in ex["tools"]]
        assert names == [t["function"]["name"] for t in ex2["tools"]]
        assert len(names) == 4 and len(set(names)) == 4
        if ex["has_call"]:
            positions[names.index(ex["target_name"])] += 1
    assert len(positions) > 1  # the target is not always in the same place


# ------------------------------------------------------------------------------------------------
# CSV formats and file errors
# ------------------------------------------------------------------------------------------------
def test_eqn_csv_validation_and_line_numbers(tmp_path):
    text = (
        "line,eqn,type\n"
        "Sara has 3 + 4 = 7 apples.,3+4=7,correct\n"
        '"A line that spans\ntwo lines, 2 * 3 = 7",2*3=7,flawed\n'
        "No equation here.,,missing\n"
        "Bad type,1+1=2,wrong\n"
        "Missing needs empty eqn,1+1=2,missing\n"
        "Too short\n"
        "Flawed needs an eqn,,flawed\n"
    )
    path = tmp_path / "eq.csv"
    path.write_text(text)
    src = read_file(str(path), tmp_path, BadRowLog("extractor", "eq.csv"))
    rows = load_eqn_rows(src)
    assert [r["type"] for r in rows] == ["correct", "flawed", "missing"]
    assert rows[2]["eqn"] == ""
    # the multi-line record starts on line 3, so the next records are on lines 5, 6, 7, 8, 9
    assert sorted((r.line, r.reason) for r in src.bad.rows) == [
        (6, "bad value"),
        (7, "inconsistent"),
        (8, "missing field"),
        (9, "missing field"),
    ]


def test_pairs_and_labeled_csv(tmp_path):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(
        "question,correct_answer,wrong_answer,error_type\nQ1,2+2=4,2+2=5,arithmetic\nQ2,ok,,arithmetic\n"
    )
    src = read_file(str(pairs), tmp_path, BadRowLog("classifier", "pairs.csv"))
    items = load_pairs_rows(src)
    # arithmetic is in the error-type vocabulary: stored as its class (issue 16)
    assert [(i["label"], i["error_type"]) for i in items] == [(0, ""), (1, "computational")]
    assert items[0]["group"] == items[1]["group"]
    assert [(r.line, r.reason) for r in src.bad.rows] == [(3, "missing field")]

    labeled = tmp_path / "labeled.csv"
    labeled.write_text("question,solution,label\nQ,S,0\nQ,T,flawed\nQ,U,maybe\n")
    src = read_file(str(labeled), tmp_path, BadRowLog("classifier", "labeled.csv"))
    assert [i["label"] for i in load_labeled_rows(src)] == [0, 1]
    # a flawed row without error_type is kept and reported (issue 16)
    assert [(r.line, r.reason, r.action) for r in src.bad.rows] == [
        (4, "bad value", "dropped"),
        (3, "no error_type", "kept"),
    ]


def test_wrong_columns_missing_file_empty_file_and_encoding(tmp_path):
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("a,b\n1,2\n")
    src = read_file(str(wrong), tmp_path, BadRowLog("extractor", "wrong.csv"))
    with pytest.raises(DataError, match=r"wrong\.csv: format eqn_csv needs columns"):
        load_eqn_rows(src)
    with pytest.raises(DataError, match="not found"):
        read_file("nope.jsonl", tmp_path, BadRowLog("t", "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty dataset"):
        read_file("empty.jsonl", tmp_path, BadRowLog("t", "empty.jsonl"))
    (tmp_path / "latin1.csv").write_bytes("line,eqn,type\ncafé 1+1=2,1+1=2,correct\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.csv: unreadable encoding"):
        read_file("latin1.csv", tmp_path, BadRowLog("t", "latin1.csv"))


def test_bad_fraction_threshold_names_the_file():
    bad = BadRowLog("extractor", "data/lines.csv")
    for line in range(2, 5):
        bad.add(line, "missing field", "eqn")
    bad.check_fraction(rows_read=15, max_bad_fraction=0.2)  # 20%: allowed
    bad.add(9, "bad value", "type")
    with pytest.raises(DataError, match=r"data/lines\.csv: 4 of 15 rows are bad"):
        bad.check_fraction(rows_read=15, max_bad_fraction=0.2)


# ------------------------------------------------------------------------------------------------
# splitting and leakage
# ------------------------------------------------------------------------------------------------
def test_allocation_is_hierarchical():
    # 6 negatives over three dialects round to zero each; the first level still gives them one slot.
    sizes = {
        ("no_call", "MSA"): 4,
        ("no_call", "Egyptian"): 1,
        ("no_call", "Levantine"): 1,
        ("call", "MSA"): 94,
    }
    take = allocate(sizes, dict(sizes), 10)
    assert sum(take.values()) == 10
    assert sum(v for k, v in take.items() if k[0] == "no_call") == 1


def test_split_is_deterministic_stratified_and_keeps_groups_together():
    rows = synthetic_classifier(400, seed=5)
    splits = split_stratified(rows, lambda r: (str(r["label"]),), 0.1, 0.1, seed=9, task="classifier")
    again = split_stratified(
        list(reversed(rows)), lambda r: (str(r["label"]),), 0.1, 0.1, seed=9, task="classifier"
    )
    assert {k: [r["id"] for r in v] for k, v in splits.items()} == {
        k: [r["id"] for r in v] for k, v in again.items()
    }
    assert [len(v) for v in splits.values()] == [320, 40, 40]
    for rows_ in splits.values():
        assert Counter(r["label"] for r in rows_)[0] == len(rows_) // 2
    groups = {name: {r["group"] for r in v} for name, v in splits.items()}
    assert not groups["train"] & groups["validation"] and not groups["train"] & groups["test"]
    other = split_stratified(rows, lambda r: (str(r["label"]),), 0.1, 0.1, seed=10, task="classifier")
    assert [r["id"] for r in other["test"]] != [r["id"] for r in splits["test"]]


def test_normalization_folds_arabic_variants():
    assert normalize_text("إلى   أحمد، مدرسةٌ!") == normalize_text("الى احمد مدرسه")
    assert normalize_text("٣+٤=٧") == "3+4=7"
    assert normalize_text("3+4=7") != normalize_text("3-4=7")


def test_leakage_removal_matches_brute_force():
    rows = synthetic_extractor(500, seed=4)
    splits = split_stratified(rows, lambda r: (r["type"],), 0.15, 0.15, seed=1, task="extractor")
    threshold = 0.8
    cleaned, counts = remove_leakage(splits, lambda r: r["line"], threshold)
    assert counts["exact"] > 0 and counts["near"] > 0
    train = {normalize_text(r["line"]) for r in splits["train"]}
    train_grams = [trigrams(t) for t in train]
    expected = {"exact": 0, "near": 0}
    for r in splits["validation"]:
        norm = normalize_text(r["line"])
        if norm in train:
            expected["exact"] += 1
        elif any(jaccard(trigrams(norm), g) >= threshold for g in train_grams):
            expected["near"] += 1
    assert counts["by_split"]["validation"] == expected
    held_out = cleaned["validation"] + cleaned["test"]
    assert len(held_out) == len(splits["validation"]) + len(splits["test"]) - counts["exact"] - counts["near"]
    for r in held_out:
        grams = trigrams(normalize_text(r["line"]))
        assert all(jaccard(grams, g) < threshold for g in train_grams)


def test_lsh_shape_keeps_recall_at_the_threshold():
    for t in (0.5, 0.8, 0.9, 0.95):
        bands, rows = lsh_shape(t)
        assert (1 - t**rows) ** bands <= 1e-6


# ------------------------------------------------------------------------------------------------
# synthetic data
# ------------------------------------------------------------------------------------------------
def test_synthetic_function_calling_is_deterministic_and_learnable():
    rows, catalog = synthetic_function_calling(300, 0.1, seed=7)
    assert rows == synthetic_function_calling(300, 0.1, seed=7)[0]
    assert rows != synthetic_function_calling(300, 0.1, seed=8)[0]
    assert len(catalog) >= 10 and set(r["dialect"] for r in rows) == set(DIALECTS)
    assert sum(not r["has_call"] for r in rows) == 30
    domains = {r["domain"] for r in rows if r["has_call"]}
    assert len(domains) >= 5
    for r in rows:
        if not r["has_call"]:
            continue
        tool = catalog.get(r["target_name"])
        assert schema_problems(r["target_arguments"], tool) == []
        for value in r["target_arguments"].values():  # every value can be copied from the request
            for v in value if isinstance(value, list) else [value]:
                assert str(v) in r["user"]
    # learnable: each request names its tool's keyword and no other tool's
    for r in rows:
        hits = {name for name, word in KEYWORDS.items() if word in r["user"]}
        assert hits == ({r["target_name"]} if r["has_call"] else set()), r["user"]


def test_every_template_of_a_tool_shares_its_keyword():
    """One keyword per tool, as a word of every template (two unrelated phrasings per tool made the tiny
    model learn the tool choice measurably slower)."""
    assert set(KEYWORDS) == {t[0]["function"]["name"] for t in SYNTHETIC_TOOLS}
    assert len(set(KEYWORDS.values())) == len(KEYWORDS)
    for schema, _, templates in SYNTHETIC_TOOLS:
        name = schema["function"]["name"]
        for template in templates:
            assert KEYWORDS[name] in template.split(), (name, template)
            others = {n for n, w in KEYWORDS.items() if n != name and w in template}
            assert not others, (name, template, others)


def test_synthetic_prompt_constants_match_the_config_defaults():
    from dagtune.config import FunctionCallingDataConfig

    fields = FunctionCallingDataConfig.model_fields
    assert DEVELOPER_PROMPT == fields["developer_prompt"].default
    assert NEGATIVE_REPLY == fields["negative_reply"].default


def test_tokenizer_corpus_is_deterministic_and_covers_the_vocabulary():
    lines = tokenizer_corpus()
    assert lines == tokenizer_corpus()
    text = "\n".join(lines)
    assert DEVELOPER_PROMPT in lines
    for schema, _, _ in SYNTHETIC_TOOLS:
        fn = schema["function"]
        assert f"call:{fn['name']}{{" in text and f"declaration:{fn['name']}{{" in text
        for key in fn["parameters"]["properties"]:
            assert f"{key}:" in text
    assert all(KEYWORDS[n] in text for n in KEYWORDS)


def test_synthetic_math_sets():
    lines = synthetic_extractor(200, seed=1)
    assert Counter(r["type"] for r in lines) == {"correct": 80, "flawed": 60, "missing": 60}
    for r in lines:
        if r["type"] == "missing":
            assert r["eqn"] == ""
            continue
        lhs, rhs = r["eqn"].split("=")
        value = eval(lhs.replace("/", "//"))  # noqa: S307 - digits and operators we generated
        assert (value == int(rhs)) == (r["type"] == "correct")
    items = synthetic_classifier(200, seed=1)
    assert Counter(r["label"] for r in items) == {0: 100, 1: 100}
    assert {r["error_type"] for r in items if r["label"] == 1} == {
        "arithmetic",
        "wrong_operation",
        "final_answer",
    }
    assert synthetic_classifier(200, seed=1) == items


def test_saved_hf_dataset_reads_like_the_jsonl(tmp_path):
    """Arrow unifies the tools' structs (every tool gains every other tool's properties as None) and the
    messages' keys; the loader must still see the schemas and calls the JSONL file has."""
    import datasets

    from dagtune.data.io import read_hf

    sample = (
        Path(__file__).resolve().parents[1]
        / "../shared/data/external/arabic_mobile_actions_sample/test_sample.jsonl"
    )
    if not sample.is_file():
        pytest.skip("shared/ sample not present beside the checkout")
    records = [json.loads(x) for x in sample.read_text(encoding="utf-8").splitlines()]
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    from_hf, catalog_hf = load_mobile_actions(
        read_hf("saved", None, "train", tmp_path, BadRowLog("fc", "hf")), "keep"
    )
    from_file, catalog_file = load_mobile_actions(
        read_file(str(sample), tmp_path, BadRowLog("fc", "f")), "keep"
    )
    drop_source = [{k: v for k, v in e.items() if k != "source"} for e in from_hf]
    assert drop_source == [{k: v for k, v in e.items() if k != "source"} for e in from_file]
    assert catalog_hf.tools == catalog_file.tools and len(catalog_file) == 29


def test_token_counts_use_every_cpu_and_leave_the_runners_setting(monkeypatch):
    """prepare_data counts tokens with the fast tokenizer's parallel batch encoding, then the process is
    back to the runner's TOKENIZERS_PARALLELISM=false (node processes are started after it)."""
    import os

    from dagtune.data import render

    seen = []

    class Tok:
        def __call__(self, texts, add_special_tokens):
            seen.append(os.environ.get("TOKENIZERS_PARALLELISM"))
            return {"input_ids": [t.split() for t in texts]}

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    assert render.count_tokens(Tok(), ["a b c", "d"]) == [3, 1]
    assert seen == ["true"] and os.environ["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    render.count_tokens(Tok(), ["x"])
    assert "TOKENIZERS_PARALLELISM" not in os.environ
