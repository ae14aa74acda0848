"""Reliability of the artifact store: nothing damaged is ever served.

A flipped byte, a deleted file, a truncated manifest: each makes the key "not built" (the damaged dir
is moved aside with a logged reason and the node recomputes); `dagtune status` reports it, never
crashes. Builds that write symlinks fail; commits fsync before the rename.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

import dagtune.store as store_mod
from dagtune.store import MANIFEST, ArtifactError, ArtifactStore, artifact_problem, content_key
from tests.test_data import root, tiny_store  # noqa: F401  (pytest fixtures)


def _build(out: Path, scratch: Path) -> dict:
    (out / "sub").mkdir()
    (out / "weights.bin").write_bytes(bytes(range(256)) * 64)
    (out / "sub" / "split.parquet").write_bytes(b"PAR1" + b"\x01" * 500 + b"PAR1")
    return {"n": 1}


def _flip(p: Path, offset: int = 100) -> None:
    b = bytearray(p.read_bytes())
    b[offset] ^= 0x01
    st = p.stat()
    p.write_bytes(bytes(b))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # hide it from an mtime check: the hash finds it


def _rebuilds(store: ArtifactStore, inputs: dict) -> bool:
    calls = []

    def build(out, scratch):
        calls.append(1)
        return _build(out, scratch)

    _, ran = store.build_once("n", inputs, build)
    return ran and calls == [1]


@pytest.mark.parametrize("rel", ["weights.bin", "sub/split.parquet"])
def test_flipped_byte_is_not_served_and_the_key_rebuilds(tmp_path, caplog, rel):
    store = ArtifactStore(tmp_path)
    art, _ = store.build_once("n", {"k": 1}, _build)
    good = (art.dir / rel).read_bytes()
    _flip(art.dir / rel)
    with caplog.at_level(logging.WARNING, logger="dagtune"):
        assert store.get("n", art.key) is None
    assert f"{rel}: sha256 differs" in caplog.text
    assert _rebuilds(store, {"k": 1})
    assert (art.dir / rel).read_bytes() == good and store.get("n", art.key) is not None


def test_deleted_file_rebuilds(tmp_path):
    store = ArtifactStore(tmp_path)
    art, _ = store.build_once("n", {"k": 2}, _build)
    (art.dir / "sub" / "split.parquet").unlink()
    assert artifact_problem(art.dir) == "sub/split.parquet: missing"
    assert _rebuilds(store, {"k": 2})


def test_truncated_grown_or_replaced_file_rebuilds(tmp_path):
    store = ArtifactStore(tmp_path)
    art, _ = store.build_once("n", {"k": 3}, _build)
    (art.dir / "weights.bin").write_bytes(b"short")
    assert "size 5 != manifest" in artifact_problem(art.dir)
    assert _rebuilds(store, {"k": 3})
    (art.dir / "weights.bin").unlink()
    (art.dir / "weights.bin").symlink_to(tmp_path / "elsewhere")
    assert artifact_problem(art.dir) == "weights.bin: not a regular file"


def test_large_files_use_size_and_mtime_then_hash_when_they_moved(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "ALWAYS_HASH_BYTES", 0)
    store = ArtifactStore(tmp_path)
    art, _ = store.build_once("n", {"k": 4}, _build)
    p = art.dir / "weights.bin"
    hashed = []
    real = store_mod.sha256_file
    monkeypatch.setattr(store_mod, "sha256_file", lambda q, *a: hashed.append(q.name) or real(q, *a))
    assert store.get("n", art.key) is not None and hashed == []  # fast path: nothing re-read
    recorded = p.stat().st_mtime_ns
    os.utime(p, ns=(recorded, recorded + 10**9))  # e.g. a copy without -p: same bytes, new mtime
    assert store.get("n", art.key) is not None and hashed == ["weights.bin"]
    assert p.stat().st_mtime_ns == recorded  # verified, so the recorded mtime is restored
    b = bytearray(p.read_bytes())
    b[7] ^= 0xFF
    p.write_bytes(bytes(b))  # an in-place write moves the mtime: full hash, mismatch
    assert "weights.bin: sha256 differs" in artifact_problem(art.dir)


def test_copied_store_is_verified_and_served(tmp_path):
    store = ArtifactStore(tmp_path / "a")
    art, _ = store.build_once("n", {"k": 5}, _build)
    shutil.copytree(tmp_path / "a", tmp_path / "b", copy_function=shutil.copyfile)  # mtimes change
    copy = ArtifactStore(tmp_path / "b")
    assert copy.get("n", art.key) is not None


@pytest.mark.parametrize("text", ["", "{", '{"files": [', "[]", "null", '{"node": "n"}', "\x00\x00"])
def test_empty_or_truncated_manifest_is_not_built(tmp_path, text):
    store = ArtifactStore(tmp_path)
    art, _ = store.build_once("n", {"k": 6}, _build)
    (art.dir / MANIFEST).write_text(text)
    assert store.get("n", art.key) is None
    assert store.list_keys("n") == []
    assert _rebuilds(store, {"k": 6})


def test_status_reports_a_truncated_manifest(state_dir, capsys):
    from dagtune.cli import main
    from dagtune.config import load_config
    from dagtune.pipeline import plan

    cfg = load_config(None, "tiny")
    key = plan(cfg)["prepare_data"]["key"]
    d = ArtifactStore(cfg.artifact_root).path("prepare_data", key)
    d.mkdir(parents=True)
    (d / MANIFEST).write_text('{"node": "prepare_data", "files": [{"path"')
    assert main(["status", "--profile", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "(no readable manifest: rebuilt by the next run)" in out
    assert main(["status", "--profile", "tiny", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["nodes"]
    assert rows[0]["exists"] is False and rows[0]["problem"] == "no readable manifest"
    assert d.exists()  # status only reports; the next run moves it aside and rebuilds


def test_build_writing_a_symlink_fails(tmp_path):
    store = ArtifactStore(tmp_path)
    secret = tmp_path / "outside.txt"
    secret.write_text("not part of any artifact")

    def build(out, scratch):
        (out / "a.txt").write_text("x")
        (out / "link.txt").symlink_to(secret)

    with pytest.raises(ArtifactError, match="symlink into its artifact: link.txt"):
        store.build_once("n", {"k": 7}, build)
    assert store.get("n", content_key({"k": 7})) is None


def test_commit_fsyncs_files_and_dirs_before_the_rename(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    fd_names: dict[int, str] = {}
    real_open = os.open

    def track_open(path, flags, *a, **kw):
        fd = real_open(path, flags, *a, **kw)
        fd_names[fd] = str(path)
        return fd

    def track_fsync(fd):
        synced.append(Path(fd_names.get(fd, "?")).name)
        return real_fsync(fd)

    def track_replace(src, dst):
        if Path(dst).name == content_key({"k": 8}):
            synced.append("<rename>")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "open", track_open)
    monkeypatch.setattr(os, "fsync", track_fsync)
    monkeypatch.setattr(os, "replace", track_replace)
    ArtifactStore(tmp_path).build_once("n", {"k": 8}, _build)
    before = synced[: synced.index("<rename>")]
    assert {"weights.bin", "split.parquet", MANIFEST, "sub"} <= set(before)
    assert before[-1].startswith("n-")  # the temp dir itself, last
    assert synced[synced.index("<rename>") + 1 :] == ["n"]  # then the parent of the final dir


def test_prepare_data_with_a_flipped_parquet_byte_recomputes(root, caplog):  # noqa: F811
    from dagtune.pipeline import run_node
    from tests.test_data import SMALL, make_cfg

    cfg = make_cfg(**{t: SMALL for t in ("function_calling", "extractor", "classifier")})
    art, res = run_node("prepare_data", cfg, {})
    split = art.dir / "extractor" / "train.parquet"
    good = split.read_bytes()
    _flip(split, offset=len(good) // 2)
    with caplog.at_level(logging.WARNING, logger="dagtune"):
        again, res2 = run_node("prepare_data", cfg, {})
    assert res.status == "ran" and res2.status == "ran"
    assert "extractor/train.parquet: sha256 differs" in caplog.text
    assert split.read_bytes() == good
    assert run_node("prepare_data", cfg, {})[1].status == "cached"
    (art.dir / "classifier" / "test.parquet").unlink()
    assert run_node("prepare_data", cfg, {})[1].status == "ran"
