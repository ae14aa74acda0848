"""The prepare_data node end to end: real sample, synthetic defaults, written files, HF datasets, errors.

The tiny models (their tokenizers carry the real chat templates) are built once per session and copied
into each test's own artifact store, so every test starts from an empty store without rebuilding them.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from dagtune.config import PipelineConfig, deep_merge
from dagtune.data import DataError
from dagtune.data.split import normalize_text
from dagtune.data.synthetic import synthetic_classifier, synthetic_extractor, synthetic_function_calling
from dagtune.formats import format_eq, parse_eq, parse_function_calls
from dagtune.pipeline import plan, run_node
from dagtune.store import ArtifactStore

REPO = Path(__file__).resolve().parents[1]
SAMPLE = "../shared/data/external/arabic_mobile_actions_sample/test_sample.jsonl"
TOKENIZERS = {"function_calling": "tiny-functiongemma", "extractor": "tiny-gemma3", "classifier": "tiny-phi3"}
SPLITS = ("train", "validation", "test")
COLUMNS = {
    "function_calling": {"user", "dialect", "domain", "has_call", "tools", "target_name", "target_arguments"},
    "extractor": {"line", "eqn", "type"},
    "classifier": {"question", "solution", "label", "error_type"},
}
COMMON = {"id", "prompt", "completion", "text", "n_tokens", "truncated"}
SMALL = {"source": {"kind": "synthetic", "num_examples": 120}}


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dagtune.models import ensure_tiny

    root = tmp_path_factory.mktemp("tiny_models")
    store = ArtifactStore(root)
    for name in TOKENIZERS.values():
        ensure_tiny(name, store)
    return root


@pytest.fixture
def root(tmp_path: Path, tiny_store: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    r = tmp_path / "artifacts"
    shutil.copytree(tiny_store / "base_models", r / "base_models")
    monkeypatch.setenv("DAGTUNE_ARTIFACT_ROOT", str(r))
    return r


def make_cfg(**prepare_data: Any) -> PipelineConfig:
    section = deep_merge({"tokenizers": TOKENIZERS}, prepare_data)
    return PipelineConfig.model_validate(
        {
            "prepare_data": section,
            "train_function_calling": {"model": {"name": TOKENIZERS["function_calling"]}},
            "train_extractor": {"model": {"name": TOKENIZERS["extractor"]}},
            "train_classifier": {"model": {"name": TOKENIZERS["classifier"]}},
            "config_dir": str(REPO),
        }
    )


def read_splits(art_dir: Path, task: str) -> dict[str, pd.DataFrame]:
    return {s: pd.read_parquet(art_dir / task / f"{s}.parquet") for s in SPLITS}


def bad_rows(art_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (art_dir / "bad_rows.jsonl").read_text().splitlines()]


def check_rendering(task: str, frames: dict[str, pd.DataFrame], max_length: int = 512) -> None:
    """The invariants every task's files keep, whatever the source."""
    for df in frames.values():
        assert COMMON | COLUMNS[task] <= set(df.columns)
        assert df["id"].is_unique
        assert (df["prompt"] + df["completion"] == df["text"]).all()
        assert (df["truncated"] == (df["n_tokens"] > max_length)).all()
        if task == "classifier":
            assert df["prompt"].str.endswith("<|assistant|>").all()
            assert set(df["label"]) <= {0, 1}
        else:
            assert df["prompt"].str.endswith("<start_of_turn>model\n").all()
        if task == "extractor":
            for r in df.itertuples():
                assert r.completion == format_eq(r.eqn) + "<end_of_turn>\n"
                assert parse_eq(r.completion) == r.eqn
    all_ids = [i for df in frames.values() for i in df["id"]]
    assert len(all_ids) == len(set(all_ids))


def check_function_calls(frames: dict[str, pd.DataFrame], distractors: int) -> None:
    negative_reply = make_cfg().prepare_data.function_calling.negative_reply
    for df in frames.values():
        for r in df.itertuples():
            tools = [t["function"]["name"] for t in json.loads(r.tools)]
            assert len(tools) == distractors + 1 and len(set(tools)) == len(tools)
            assert "<start_function_declaration>declaration:" in r.prompt
            if r.has_call:
                assert r.target_name in tools
                calls = parse_function_calls(r.completion)
                assert calls == [{"name": r.target_name, "arguments": json.loads(r.target_arguments)}]
                assert r.completion.endswith("<end_function_call><start_function_response>")
            else:
                assert r.completion == negative_reply + "<end_of_turn>\n"


# ------------------------------------------------------------------------------------------------
def test_external_sample(root: Path):
    if not (REPO / SAMPLE).is_file():
        pytest.skip("shared/ sample not present beside the checkout")
    cfg = make_cfg(
        function_calling={"source": {"kind": "file", "path": SAMPLE}}, extractor=SMALL, classifier=SMALL
    )
    art, res = run_node("prepare_data", cfg, {})
    assert res.status == "ran"
    fc = json.loads((art.dir / "stats.json").read_text())["tasks"]["function_calling"]
    assert fc["input"]["rows_read"] == 100
    assert fc["input"]["with_call"] == 94 and fc["input"]["negatives"] == 6
    assert sorted(fc["input"]["dialects"]) == ["Egyptian", "Gulf", "Levantine", "MSA", "Maghrebi"]
    summary = (art.dir / "summary.md").read_text()
    for line in (
        "| rows read | 100 |",
        "| rows with a call | 94 |",
        "| negatives (no call) | 6 |",
        "| dialects | 5: ",
    ):
        assert line in summary

    # schema mismatches of the real data are kept (default) but every one is reported with its line
    bad = bad_rows(art.dir)
    assert len(bad) == fc["bad_rows"]["kept_with_warning"] == 45
    assert {(b["file"], b["reason"], b["action"]) for b in bad} == {(SAMPLE, "schema mismatch", "kept")}
    line3 = next(b for b in bad if b["line"] == 3)
    assert "search_flights" in line3["detail"] and "unknown argument 'origin'" in line3["detail"]

    frames = read_splits(art.dir, "function_calling")
    check_rendering("function_calling", frames)
    check_function_calls(frames, distractors=2)
    rows = pd.concat(frames.values())
    assert len(rows) == 100 - fc["leakage"]["exact"] - fc["leakage"]["near"]
    first = rows[rows["id"] == "gen_02305"]  # line 1: arguments encoded twice in the file
    assert len(first) == 1 and json.loads(first["target_arguments"].iloc[0]) == {"city": "جدة", "days": 1}

    drop = make_cfg(
        function_calling={"source": {"kind": "file", "path": SAMPLE}, "schema_mismatch": "drop"},
        extractor=SMALL,
        classifier=SMALL,
    )
    with pytest.raises(DataError, match=r"test_sample\.jsonl: 45 of 100 rows are bad"):
        run_node("prepare_data", drop, {})


def test_synthetic_defaults_deterministic_and_cached(root: Path):
    cfg = make_cfg()
    assert cfg.prepare_data.function_calling.source.kind == "synthetic"
    art, res = run_node("prepare_data", cfg, {})
    assert res.status == "ran"
    stats = json.loads((art.dir / "stats.json").read_text())
    frames = {task: read_splits(art.dir, task) for task in COLUMNS}
    for task, f in frames.items():
        check_rendering(task, f)
        total = sum(len(df) for df in f.values())
        leak = stats["tasks"][task]["leakage"]
        dups = sum(s["duplicates"] for s in stats["tasks"][task]["splits"].values())  # dropped in-split
        assert total + leak["exact"] + leak["near"] + dups == 600
        assert abs(len(f["validation"]) - 60) <= 6 and abs(len(f["test"]) - 60) <= 6
    check_function_calls(frames["function_calling"], distractors=2)

    # stratified: every split has every dialect, negatives near 10%, labels and types in proportion
    for df in frames["function_calling"].values():
        assert df["dialect"].nunique() == 5
        assert 0.05 <= (~df["has_call"]).mean() <= 0.15
    for df in frames["classifier"].values():
        assert df["label"].mean() == 0.5
    shares = {s: df["type"].value_counts(normalize=True) for s, df in frames["extractor"].items()}
    for s in ("validation", "test"):
        assert (shares[s] - shares["train"]).abs().max() < 0.06

    # same inputs: cache hit
    again, res2 = run_node("prepare_data", cfg, {})
    assert res2.status == "cached" and again.key == art.key
    assert art.manifest()["metrics"]["classifier_train_rows"] == len(frames["classifier"]["train"])


def test_rebuild_is_identical_and_seed_changes_splits(root: Path):
    small = make_cfg(function_calling=SMALL, extractor=SMALL, classifier=SMALL)
    art, _ = run_node("prepare_data", small, {})
    before = {task: read_splits(art.dir, task) for task in COLUMNS}
    _, res = run_node("prepare_data", small, {}, force=True)
    assert res.status == "ran"
    for task in COLUMNS:
        for s, df in read_splits(art.dir, task).items():
            pd.testing.assert_frame_equal(df, before[task][s])
    other, _ = run_node(
        "prepare_data", make_cfg(seed=99, function_calling=SMALL, extractor=SMALL, classifier=SMALL), {}
    )
    assert other.key != art.key
    assert list(read_splits(other.dir, "classifier")["test"]["id"]) != list(
        before["classifier"]["test"]["id"]
    )


# ------------------------------------------------------------------------------------------------
def mobile_actions_record(ex: dict) -> dict:
    """A synthetic example written the way the real Mobile Actions file is (arguments encoded twice)."""
    if ex["has_call"]:
        args = json.dumps(json.dumps(ex["target_arguments"], ensure_ascii=False))
        call = {
            "id": "call_1",
            "type": "function",
            "function": {"name": ex["target_name"], "arguments": args},
        }
        assistant = {"role": "assistant", "tool_calls": [call]}
        tools = [{"function": t["function"]} for t in ex["tools"]]
    else:
        assistant, tools = {"role": "assistant", "content": ""}, []
    return {
        "metadata": "train",
        "tools": tools,
        "messages": [{"role": "user", "content": ex["user"]}, assistant],
        "dialect": ex["dialect"],
        "domain": ex["domain"],
        "original_id": ex["id"],
    }


def write_sources(d: Path) -> dict[str, Path]:
    """Three files with known bad rows at known lines, and duplicated lines for the leakage check."""
    fc_rows = [
        json.dumps(mobile_actions_record(e), ensure_ascii=False)
        for e in synthetic_function_calling(60, 0.1, 1)[0]
    ]
    good = json.loads(fc_rows[10])
    unknown_key = json.loads(fc_rows[11])
    call = unknown_key["messages"][1]["tool_calls"][0]["function"]
    call["arguments"] = json.dumps(json.dumps({"not_a_parameter": "x"}))
    no_dialect = {k: v for k, v in good.items() if k != "dialect"}
    fc_rows[4:4] = ["{broken json", json.dumps(unknown_key, ensure_ascii=False), json.dumps(no_dialect)]
    fc = d / "fc.jsonl"
    fc.write_text("\n".join(fc_rows) + "\n", encoding="utf-8")  # bad rows on lines 5, 6 and 7

    lines = synthetic_extractor(80, 2)
    lines += [dict(lines[i]) for i in range(0, 40, 2)]  # 20 exact duplicates: some cross splits
    eq = d / "lines.csv"
    with open(eq, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["line", "eqn", "type"])
        for i, r in enumerate(lines):
            if i == 3:
                w.writerow(["It costs 5 + 5 = 10 dollars.", "5+5=10", "maybe"])  # line 5
            w.writerow([r["line"], r["eqn"], r["type"]])

    items = synthetic_classifier(80, 3)
    pairs = d / "pairs.csv"
    with open(pairs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "correct_answer", "wrong_answer", "error_type"])
        for good_, bad_ in zip(items[::2], items[1::2], strict=True):
            w.writerow([good_["question"], good_["solution"], bad_["solution"], bad_["error_type"]])
        w.writerow(["What is 2 + 2?", "2 + 2 = 4", "", "arithmetic"])  # line 42: no wrong answer
    return {"fc": fc, "eq": eq, "pairs": pairs}


def file_cfg(paths: dict[str, Path], **extra: Any) -> PipelineConfig:
    return make_cfg(
        function_calling={"source": {"kind": "file", "path": str(paths["fc"])}, "schema_mismatch": "drop"},
        extractor={"source": {"kind": "file", "path": str(paths["eq"])}},
        classifier={"source": {"kind": "file", "path": str(paths["pairs"])}},
        **extra,
    )


def test_written_files_bad_rows_leakage_and_cache_key(root: Path, tmp_path: Path):
    paths = write_sources(tmp_path)
    cfg = file_cfg(paths)
    art, res = run_node("prepare_data", cfg, {})
    assert res.status == "ran" and res.key == plan(cfg)["prepare_data"]["key"]

    got = {(Path(b["file"]).name, b["line"], b["reason"], b["action"]) for b in bad_rows(art.dir)}
    assert got == {
        ("fc.jsonl", 5, "malformed JSON", "dropped"),
        ("fc.jsonl", 6, "schema mismatch", "dropped"),
        ("fc.jsonl", 7, "missing field", "dropped"),
        ("lines.csv", 5, "bad value", "dropped"),
        ("pairs.csv", 42, "missing field", "dropped"),
    }
    stats = json.loads((art.dir / "stats.json").read_text())["tasks"]
    assert stats["function_calling"]["bad_rows"]["dropped_by_reason"] == {
        "malformed JSON": 1,
        "missing field": 1,
        "schema mismatch": 1,
    }
    assert stats["function_calling"]["input"]["rows_read"] == 63
    assert stats["classifier"]["input"]["items"] == 80

    # exact duplicates that crossed splits were removed from validation/test and counted
    ex = read_splits(art.dir, "extractor")
    assert stats["extractor"]["leakage"]["exact"] > 0
    train = {normalize_text(x) for x in ex["train"]["line"]}
    for s in ("validation", "test"):
        assert not train & {normalize_text(x) for x in ex[s]["line"]}
    for task in COLUMNS:
        check_rendering(task, read_splits(art.dir, task))
    summary = (art.dir / "summary.md").read_text()
    assert "| malformed JSON | 1 | dropped |" in summary

    # same bytes: cache hit; one changed source file: a new key
    assert run_node("prepare_data", cfg, {})[1].status == "cached"
    with open(paths["eq"], "a", newline="") as f:
        csv.writer(f).writerow(["She has 7 - 2 = 5 pens.", "7-2=5", "correct"])
    assert plan(cfg)["prepare_data"]["key"] != res.key
    art2, res2 = run_node("prepare_data", cfg, {})
    assert res2.status == "ran" and art2.key != art.key

    # over max_bad_fraction: a clear error naming the file
    with open(paths["pairs"], "a", newline="") as f:
        w = csv.writer(f)
        for _ in range(15):
            w.writerow(["Q", "A", "", ""])
    with pytest.raises(DataError, match=r"pairs\.csv: 16 of 56 rows are bad") as failed:
        run_node("prepare_data", cfg, {})
    saved = Path(str(failed.value).rsplit("All bad rows: ", 1)[1])  # no artifact: the rows are kept aside
    assert len(saved.read_text().splitlines()) == 16


def test_origin_error_labels_in_stats_and_bad_rows(root: Path, tmp_path: Path):
    """Issue 16: the origin's comp/concep labels are mapped, an unknown one is kept and reported, and
    stats.json shows the error types per split (each split holds both: stratified by error type)."""
    pairs = tmp_path / "pairs.csv"
    with open(pairs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "correct_answer", "wrong_answer", "error_type"])
        for i in range(40):
            a, b = 10 + i, 3 + 2 * i
            w.writerow(
                [
                    f"Sam has {a} pens and buys {b} more. How many now?",
                    f"{a}+{b}={a + b}",
                    f"{a}+{b}={a + b + 1}" if i % 2 else f"{a}-{b}={a - b}",
                    "comp" if i % 2 else "concep",
                ]
            )
        w.writerow(["Lena reads 7 pages a day for 3 days.", "7*3=21", "7+3=10", "misread"])  # line 42
    cfg = make_cfg(
        function_calling=SMALL,
        extractor=SMALL,
        classifier={"source": {"kind": "file", "path": str(pairs)}},
        val_fraction=0.2,
        test_fraction=0.2,
    )
    art, _ = run_node("prepare_data", cfg, {})
    stats = json.loads((art.dir / "stats.json").read_text())["tasks"]["classifier"]
    assert stats["input"]["by_error_type"] == {"computational": 20, "conceptual": 20, "misread": 1}
    assert (
        stats["bad_rows"]["kept_by_reason"] == {"unknown error_type": 1} and stats["bad_rows"]["dropped"] == 0
    )
    for split in SPLITS:
        by_type = stats["splits"][split]["by_error_type"]
        assert by_type["computational"] > 0 and by_type["conceptual"] > 0, (split, by_type)
    kept = [b for b in bad_rows(art.dir) if b["task"] == "classifier"]
    assert [(b["line"], b["reason"], b["action"]) for b in kept] == [(42, "unknown error_type", "kept")]
    assert "'misread'" in kept[0]["detail"]
    assert "| unknown error_type | 1 | kept (reported) |" in (art.dir / "summary.md").read_text()


def test_hf_saved_dataset_parquet_and_json_sources(root: Path, tmp_path: Path):
    import datasets

    examples, catalog = synthetic_function_calling(80, 0.1, 5)
    flat = [
        {
            "id": e["id"],
            "query_ar": e["user"],
            "query_en": "",
            "function_name": e["target_name"],
            "arguments": json.dumps(e["target_arguments"], ensure_ascii=False) if e["has_call"] else "{}",
            "dialect": e["dialect"],
            "domain": e["domain"],
            "requires_function": e["has_call"],
        }
        for e in examples
    ]
    saved = tmp_path / "afc_saved"
    datasets.Dataset.from_list(flat).save_to_disk(str(saved))
    (tmp_path / "tools.json").write_text(json.dumps(list(catalog.tools.values()), ensure_ascii=False))
    pd.DataFrame(synthetic_extractor(80, 6)).drop(columns=["id", "source", "group"]).to_parquet(
        tmp_path / "l.parquet"
    )
    labeled = [
        {"question": r["question"], "solution": r["solution"], "label": r["label"]}
        for r in synthetic_classifier(80, 7)
    ]
    (tmp_path / "labeled.json").write_text(json.dumps(labeled))

    cfg = make_cfg(
        function_calling={
            "source": {"kind": "hf", "hf_id": str(saved), "catalog": str(tmp_path / "tools.json")}
        },
        extractor={"source": {"kind": "file", "path": str(tmp_path / "l.parquet")}},
        classifier={"source": {"kind": "file", "path": str(tmp_path / "labeled.json")}},
    )
    art, res = run_node("prepare_data", cfg, {})
    stats = json.loads((art.dir / "stats.json").read_text())["tasks"]
    assert [stats[t]["source"]["format"] for t in COLUMNS] == ["flat", "eqn_csv", "labeled_csv"]
    assert stats["function_calling"]["input"]["rows_read"] == 80
    assert stats["function_calling"]["input"]["negatives"] == 8
    assert stats["function_calling"]["bad_rows"]["dropped"] == 0
    for task in COLUMNS:
        check_rendering(task, read_splits(art.dir, task))
    check_function_calls(read_splits(art.dir, "function_calling"), distractors=2)
    # the saved dataset's bytes are part of the key
    extra = plan(cfg)["prepare_data"]["inputs"]["extra"]
    assert "dir_sha256" in extra["sources"]["function_calling"]["hf_local"]
    assert "sha256" in extra["sources"]["function_calling"]["catalog"]
    assert extra["tokenizers"]["function_calling"]["tiny"] == "tiny-functiongemma"


def test_unusable_data_fails_before_rendering(root: Path, tmp_path: Path):
    with pytest.raises(DataError, match=r"missing\.jsonl: source file not found"):
        run_node(
            "prepare_data",
            make_cfg(function_calling={"source": {"kind": "file", "path": "missing.jsonl"}}),
            {},
        )
    same = tmp_path / "same.csv"
    same.write_text("line,eqn,type\n" + "Tom has 2 + 2 = 4 cars.,2+2=4,correct\n" * 12)
    cfg = make_cfg(extractor={"source": {"kind": "file", "path": str(same)}})
    with pytest.raises(DataError, match="extractor: split validation has zero rows"):
        run_node("prepare_data", cfg, {})
    empty = tmp_path / "empty.csv"
    empty.write_text("question,solution,label\n")
    with pytest.raises(DataError, match="empty dataset"):
        run_node("prepare_data", make_cfg(classifier={"source": {"kind": "file", "path": str(empty)}}), {})
    assert not (root / "prepare_data").exists()  # nothing half-written
