"""Node code and pinned libraries are in every key, and `dagtune status` says why a node is not built."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dagtune import code_identity
from dagtune.config import load_config
from dagtune.pipeline import NODE_ORDER, NODES, node_status, plan
from dagtune.staleness import rebuild_reasons
from dagtune.store import ArtifactStore

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def src_copy(tmp_path, monkeypatch) -> Path:
    """A private copy of the dagtune sources whose bytes the test may change; keys hash this copy."""
    root = tmp_path / "src"
    shutil.copytree(ROOT / "dagtune", root / "dagtune", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(code_identity, "SOURCE_ROOT", root)
    return root


def build_all(cfg) -> None:
    """Commit an (empty) artifact for every planned key, as a finished run would have."""
    store = ArtifactStore(cfg.artifact_root)
    for name, p in plan(cfg).items():
        store.build(name, p["inputs"], lambda out, scratch: {})


def rows_by_name(cfg) -> dict[str, dict]:
    return {r["name"]: r for r in node_status(cfg)}


def test_every_node_declares_existing_code():
    for node in NODES.values():
        assert node.code, f"{node.name} declares no source paths"
        assert code_identity.source_hashes(node.code)  # raises on a path that does not exist


def test_changing_sft_source_reports_code_for_the_sft_nodes(state_dir, src_copy, capsys):
    cfg = load_config()
    build_all(cfg)
    assert all(r["exists"] for r in rows_by_name(cfg).values())

    sft = src_copy / "dagtune" / "training" / "sft.py"
    sft.write_bytes(sft.read_bytes() + b"\n# one more byte\n")
    rows = rows_by_name(cfg)
    for name in ("train_function_calling", "train_extractor"):
        assert not rows[name]["exists"]
        first = rows[name]["reasons"][0]
        assert first["kind"] == "code" and first["changed"] == ["dagtune/training/sft.py"], rows[name]
    assert rows["prepare_data"]["exists"]  # data code did not change
    kinds = {r["kind"] for r in rows["register"]["reasons"]}
    assert kinds == {"upstream"}  # register's own code is unchanged; its upstream keys moved

    from dagtune import cli

    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "train_function_calling" in x)
    assert "not built: code (dagtune/training/sft.py)" in line


def test_line_endings_do_not_change_the_key(state_dir, src_copy):
    cfg = load_config()
    before = plan(cfg)
    sft = src_copy / "dagtune" / "training" / "sft.py"
    sft.write_bytes(sft.read_bytes().replace(b"\n", b"\r\n"))
    after = plan(cfg)
    assert {n: before[n]["key"] for n in NODE_ORDER} == {n: after[n]["key"] for n in NODE_ORDER}


def test_library_upgrade_moves_only_the_nodes_that_use_it(state_dir, monkeypatch):
    cfg = load_config()
    before = plan(cfg)
    real = code_identity.library_version
    monkeypatch.setattr(code_identity, "library_version", lambda n: "9.9" if n == "mlflow" else real(n))
    after = plan(cfg)
    moved = {n for n in NODE_ORDER if before[n]["key"] != after[n]["key"]}
    assert moved == {"register"}
    reasons = rebuild_reasons(after["register"]["inputs"], {"inputs": before["register"]["inputs"]})
    assert reasons == [{"kind": "code", "changed": ["mlflow"]}]


def test_torch_enters_as_major_minor():
    v = code_identity.library_version("torch")
    assert v.count(".") == 1 and "+" not in v


def test_unsloth_counts_only_on_the_unsloth_backend(monkeypatch):
    monkeypatch.setattr(code_identity, "library_version", lambda n: "1.0")
    libs = ("torch", "unsloth", "bitsandbytes")
    assert set(code_identity.library_pins(libs, "hf")) == {"torch"}
    assert set(code_identity.library_pins(libs, "unsloth")) == set(libs)


def test_reasons_classify_data_config_upstream_and_missing():
    old = {
        "inputs": {
            "version": "1",
            "config": {"seed": 1, "lora": {"r": 8}},
            "upstream": {"prepare_data": "a"},
            "extra": {"device": "cpu", "sources": {"function_calling": {"file": {"sha256": "x"}}}},
            "code": {"sources": {"f.py": "1"}, "libraries": {}},
        }
    }
    new = {
        "version": "1",
        "config": {"seed": 1, "lora": {"r": 16}},
        "upstream": {"prepare_data": "b"},
        "extra": {"device": "cuda", "sources": {"function_calling": {"file": {"sha256": "y"}}}},
        "code": {"sources": {"f.py": "1"}, "libraries": {}},
    }
    assert rebuild_reasons(new, old) == [
        {"kind": "data", "changed": ["sources.function_calling.file.sha256"]},
        {"kind": "config", "changed": ["lora.r", "device"]},
        {"kind": "upstream", "changed": ["prepare_data"]},
    ]
    assert rebuild_reasons(new, None) == [{"kind": "missing", "changed": []}]


def test_changed_source_file_reports_data_and_moves_its_downstream_only(state_dir, tmp_path):
    src = tmp_path / "calls.jsonl"
    src.write_text('{"messages": [], "tools": []}\n', encoding="utf-8")
    source = {"kind": "file", "path": str(src), "format": "mobile_actions"}
    cfg = load_config(overrides={"prepare_data": {"function_calling": {"source": source}}})
    build_all(cfg)
    src.write_text(src.read_text() + '{"messages": [], "tools": []}\n', encoding="utf-8")
    rows = rows_by_name(cfg)
    assert rows["prepare_data"]["reasons"] == [
        {"kind": "data", "changed": ["sources.function_calling.file.sha256"]}
    ]
    for name in ("train_function_calling", "train_extractor", "train_classifier"):
        assert rows[name]["reasons"] == [{"kind": "upstream", "changed": ["prepare_data"]}]
