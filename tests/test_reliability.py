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
from typing import Any

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

    _, ran = store.build("n", inputs, build)
    return ran and calls == [1]


@pytest.mark.parametrize("rel", ["weights.bin", "sub/split.parquet"])
def test_flipped_byte_is_not_served_and_the_key_rebuilds(tmp_path, caplog, rel):
    store = ArtifactStore(tmp_path)
    art, _ = store.build("n", {"k": 1}, _build)
    good = (art.dir / rel).read_bytes()
    _flip(art.dir / rel)
    with caplog.at_level(logging.WARNING, logger="dagtune"):
        assert store.get("n", art.key) is None
    assert f"{rel}: sha256 differs" in caplog.text
    assert _rebuilds(store, {"k": 1})
    assert (art.dir / rel).read_bytes() == good and store.get("n", art.key) is not None


def test_deleted_file_rebuilds(tmp_path):
    store = ArtifactStore(tmp_path)
    art, _ = store.build("n", {"k": 2}, _build)
    (art.dir / "sub" / "split.parquet").unlink()
    assert artifact_problem(art.dir) == "sub/split.parquet: missing"
    assert _rebuilds(store, {"k": 2})


def test_truncated_grown_or_replaced_file_rebuilds(tmp_path):
    store = ArtifactStore(tmp_path)
    art, _ = store.build("n", {"k": 3}, _build)
    (art.dir / "weights.bin").write_bytes(b"short")
    assert "size 5 != manifest" in artifact_problem(art.dir)
    assert _rebuilds(store, {"k": 3})
    (art.dir / "weights.bin").unlink()
    (art.dir / "weights.bin").symlink_to(tmp_path / "elsewhere")
    assert artifact_problem(art.dir) == "weights.bin: not a regular file"


def test_large_files_use_size_and_mtime_then_hash_when_they_moved(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "ALWAYS_HASH_BYTES", 0)
    store = ArtifactStore(tmp_path)
    art, _ = store.build("n", {"k": 4}, _build)
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
    art, _ = store.build("n", {"k": 5}, _build)
    shutil.copytree(tmp_path / "a", tmp_path / "b", copy_function=shutil.copyfile)  # mtimes change
    copy = ArtifactStore(tmp_path / "b")
    assert copy.get("n", art.key) is not None


@pytest.mark.parametrize("text", ["", "{", '{"files": [', "[]", "null", '{"node": "n"}', "\x00\x00"])
def test_empty_or_truncated_manifest_is_not_built(tmp_path, text):
    store = ArtifactStore(tmp_path)
    art, _ = store.build("n", {"k": 6}, _build)
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
        store.build("n", {"k": 7}, build)
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
    ArtifactStore(tmp_path).build("n", {"k": 8}, _build)
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


# ------------------------------------------------------------------------------------------------
# data loaders: parser blowups are bad rows naming file and line
# ------------------------------------------------------------------------------------------------
def _read(tmp_path: Path, name: str, text: str, max_chars: int = 100_000):
    from dagtune.data.errors import BadRowLog
    from dagtune.data.io import read_file

    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    bad = BadRowLog("t", name)
    return read_file(name, tmp_path, bad, max_chars), bad


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    lines = [
        json.dumps({"q": f"a{sep}b", "n": i}, ensure_ascii=False)
        for i, sep in enumerate("\u2028\u2029\u0085\x0b\x0c\x1c")
    ]
    lines.insert(3, "{broken")
    src, bad = _read(tmp_path, "d.jsonl", "\r\n".join(lines) + "\n")
    assert [r.record["n"] for r in src.rows] == [0, 1, 2, 3, 4, 5]
    assert [r.line for r in src.rows] == [1, 2, 3, 5, 6, 7]
    assert [(b.line, b.reason) for b in bad.rows] == [(4, "malformed JSON")]


def test_deep_json_huge_int_and_long_rows_are_bad_rows_with_lines(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    lines = [
        '{"a": 1}',
        '{"a": ' + deep + "}",
        '{"a": ' + "9" * 5000 + "}",
        '{"a": "' + "x" * 300 + '"}',
        '{"a": 2}',
    ]
    src, bad = _read(tmp_path, "d.jsonl", "\n".join(lines), max_chars=200)
    assert [r.line for r in src.rows] == [1, 5]
    assert [(b.file, b.line, b.reason) for b in bad.rows] == [
        ("d.jsonl", 2, "row too long"),
        ("d.jsonl", 3, "row too long"),
        ("d.jsonl", 4, "row too long"),
    ]
    src, bad = _read(tmp_path, "e.jsonl", "\n".join(lines), max_chars=10**6)
    assert [(b.line, b.reason, b.detail) for b in bad.rows][:2] == [
        (2, "malformed JSON", "nested too deeply"),
        (3, "malformed JSON", bad.rows[1].detail),
    ]
    assert "4300" in bad.rows[1].detail or "digits" in bad.rows[1].detail
    assert [r.line for r in src.rows] == [1, 4, 5]


def test_json_file_nested_too_deep_is_a_data_error(tmp_path):
    from dagtune.data import DataError

    with pytest.raises(DataError, match=r"d.json: not usable JSON \(nested too deeply\)"):
        _read(tmp_path, "d.json", "[" * 100_000 + "]" * 100_000)


def test_csv_huge_field_is_a_bad_row_and_the_rest_is_kept(tmp_path):
    import csv

    limit = csv.field_size_limit()
    text = 'line,eqn,type\na,1+1=2,x\n"' + "y" * 200_000 + '",2,z\nb,2+2=4,x\nc,' + "w" * 150 + ",x\n"
    src, bad = _read(tmp_path, "d.csv", text, max_chars=100)
    assert [r.record["line"] for r in src.rows] == ["a", "b"]
    assert [(b.line, b.reason) for b in bad.rows] == [(3, "row too long"), (5, "row too long")]
    assert csv.field_size_limit() == limit  # the process-wide limit is restored


def test_parquet_long_rows_are_bad_rows(tmp_path):
    import pandas as pd

    pd.DataFrame({"line": ["a", "b" * 500, "c"], "eqn": ["1", "2", "3"]}).to_parquet(tmp_path / "d.parquet")
    from dagtune.data.errors import BadRowLog
    from dagtune.data.io import read_file

    bad = BadRowLog("t", "d.parquet")
    src = read_file("d.parquet", tmp_path, bad, 100)
    assert [r.line for r in src.rows] == [1, 3] and [b.line for b in bad.rows] == [2]


def test_split_hygiene_counts_and_drops_duplicates_and_counts_nul():
    import pandas as pd

    from dagtune.data.node import split_hygiene

    df = pd.DataFrame({"text": ["a", "b", "a", "c\x00", "a"], "id": [1, 2, 3, 4, 5]})
    out, counts = split_hygiene(df, True)
    assert counts == {"duplicates": 2, "duplicates_dropped": True, "rows_with_nul": 1}
    assert out["id"].tolist() == [1, 2, 4]
    kept, counts = split_hygiene(df, False)
    assert len(kept) == 5 and counts["duplicates"] == 2 and not counts["duplicates_dropped"]


def test_prepare_data_drops_duplicate_rows_and_reports_them(root, tmp_path):  # noqa: F811
    from dagtune.pipeline import run_node
    from tests.test_data import SMALL, make_cfg

    rows = [f"Tom has {i} + 1 = {i + 1} cars.,{i}+1={i + 1},correct\n" for i in range(80)]
    rows += rows[:10]  # ten exact duplicates
    src = tmp_path / "eq.csv"
    src.write_text("line,eqn,type\n" + "".join(rows))
    cfg = make_cfg(
        function_calling=SMALL,
        classifier=SMALL,
        extractor={"source": {"kind": "file", "path": str(src)}},
        near_duplicate_threshold=1.0,
    )
    art, _ = run_node("prepare_data", cfg, {})
    st = json.loads((art.dir / "stats.json").read_text())["tasks"]["extractor"]["splits"]
    assert sum(s["duplicates"] for s in st.values()) >= 1
    assert all(s["duplicates_dropped"] and s["rows_with_nul"] == 0 for s in st.values())
    import pandas as pd

    for split in ("train", "validation", "test"):
        assert pd.read_parquet(art.dir / "extractor" / f"{split}.parquet")["text"].is_unique


# ------------------------------------------------------------------------------------------------
# config loading: hostile YAML exits 2 naming the YAML path, fast and with bounded messages
# ------------------------------------------------------------------------------------------------
def _bomb(levels: int = 9) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def _tiny_yaml(tmp_path: Path, edit) -> Path:
    import yaml

    from dagtune.config import DEFAULT_CONFIG

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    edit(raw)
    p = tmp_path / f"c{len(list(tmp_path.glob('c*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return p


@pytest.mark.parametrize(
    "content, expected",
    [
        (_bomb().encode(), "more than 100000 values once aliases are expanded"),
        ("project:\n  name: caf\xe9\n".encode("latin-1"), "not UTF-8 (byte 20"),
        (b"profiles: 5\n", "profiles: must be a mapping"),
        (b"profiles:\n  real: [1, 2]\n", "profiles.real: must be a mapping"),
        (b"default_profile: [tiny]\nprofiles: {tiny: {}}\n", "default_profile: must be a profile name"),
        (b"a: " + b"[" * 20_000 + b"]" * 20_000 + b"\n", "nest"),
        (b"a: 'x\n" + b"y" * 2_000_000, "not valid YAML"),
    ],
    ids=["alias-bomb", "latin-1", "profiles-int", "profile-list", "default-profile-list", "deep", "bad-yaml"],
)
def test_hostile_yaml_exits_2_fast_with_a_bounded_message(tmp_path, capsys, content, expected):
    import time

    from dagtune.cli import main

    p = tmp_path / "c.yaml"
    p.write_bytes(content)
    t0 = time.perf_counter()
    assert main(["config", "validate", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err) < 2000, err[:3000]
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize(
    "path, value, expected",
    [
        ("train_extractor.optim.epochs", float("inf"), "finite number"),
        ("train_extractor.optim.epochs", 1e6, "less than or equal to 10000"),
        ("train_extractor.optim.learning_rate", float("nan"), "finite number"),
        ("prepare_data.extractor.source.num_examples", 100_000_000, "less than or equal to 1000000"),
        ("evaluate.max_new_tokens", 10**12, "at most 4294967296"),
        ("register.backoff_seconds", 1e300, "at most 4294967296"),
    ],
)
def test_numeric_fields_are_bounded_and_name_the_yaml_path(tmp_path, path, value, expected):
    from dagtune.config import ConfigError, load_config

    def edit(raw):
        node = raw["profiles"]["tiny"]  # the overlay wins over the base section
        *parents, leaf = path.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value

    with pytest.raises(ConfigError) as e:
        load_config(_tiny_yaml(tmp_path, edit), "tiny")
    assert f"  {path}: " in str(e.value) and expected in str(e.value)


def test_a_huge_value_is_shown_as_a_bounded_excerpt(tmp_path):
    from dagtune.config import ConfigError, load_config

    p = _tiny_yaml(
        tmp_path, lambda raw: raw["profiles"]["tiny"].update(evaluate={"batch_size": "9" * 10**6 + "x"})
    )
    with pytest.raises(ConfigError) as e:
        load_config(p, "tiny")
    assert "evaluate.batch_size" in str(e.value) and len(str(e.value)) < 2000


def test_config_is_parsed_once_per_process(tmp_path, monkeypatch):
    import dagtune.config as config_mod

    p = _tiny_yaml(tmp_path, lambda raw: None)
    calls = []
    real = config_mod._parse_yaml
    monkeypatch.setattr(config_mod, "_parse_yaml", lambda q: calls.append(q) or real(q))
    for profile in ("tiny", "real", "tiny"):
        config_mod.load_config(p, profile)
    assert len(calls) == 1
    p.write_text(p.read_text() + "\n# edited\n")  # a changed file is parsed again
    config_mod.load_config(p, "tiny")
    assert len(calls) == 2


def test_a_symlink_planted_later_makes_the_artifact_damaged(tmp_path):
    store = ArtifactStore(tmp_path / "s")
    art, _ = store.build("n", {"k": 9}, _build)
    (tmp_path / "secret.txt").write_text("outside")
    (art.dir / "sub" / "notes.md").symlink_to(tmp_path / "secret.txt")
    assert artifact_problem(art.dir) == "sub/notes.md: symlink inside the artifact"
    assert _rebuilds(store, {"k": 9})


def test_uploads_take_only_regular_files_listed_in_the_manifest(tmp_path):
    from dagtune.registry.tracking import report_files

    def build(out, scratch):
        (out / "report.md").write_text("# r")
        (out / "stats.json").write_text("{}")

    art, _ = ArtifactStore(tmp_path / "s").build("n", {"k": 10}, build)
    (tmp_path / "secret.json").write_text('{"token": "outside"}')
    (art.dir / "planted.md").write_text("not in the manifest")
    (art.dir / "link.json").symlink_to(tmp_path / "secret.json")
    (art.dir / "prefect-result").write_text("{}")
    assert [p.name for p in report_files(art.dir)] == [MANIFEST, "report.md", "stats.json"]


def test_symlinked_data_path_is_read_resolved_and_recorded_in_the_manifest(root, tmp_path):  # noqa: F811
    """Issue 18 item 16: a data path the user names (relative to the config, through a symlinked
    folder and a symlinked file) is resolved once, read there and recorded resolved in the manifest,
    outside the key's inputs (the key holds the content hash) and outside the artifact's files."""
    from dagtune.pipeline import plan, run_node
    from tests.test_data import SMALL, make_cfg

    def eq_csv(path: Path, n: int) -> Path:
        rows = [f"Tom has {i} + 1 = {i + 1} cars.,{i}+1={i + 1},correct\n" for i in range(n)]
        path.write_text("line,eqn,type\n" + "".join(rows))
        return path

    first, second = eq_csv(tmp_path / "v1.csv", 80), eq_csv(tmp_path / "v2.csv", 90)
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "eq.csv").symlink_to(first)
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "data").symlink_to(tmp_path / "real", target_is_directory=True)
    cfg = make_cfg(
        function_calling=SMALL,
        classifier=SMALL,
        extractor={"source": {"kind": "file", "path": "data/eq.csv"}},
    ).model_copy(update={"config_dir": str(tmp_path / "conf")})

    art, res = run_node("prepare_data", cfg, {})
    manifest = art.manifest()
    assert manifest["sources_resolved"] == {"extractor": {"source": str(first.resolve())}}
    assert str(first.resolve()) not in json.dumps(manifest["inputs"])  # the key holds the content hash
    assert "sha256" in manifest["inputs"]["extra"]["sources"]["extractor"]["file"]
    assert "sources_resolved" not in manifest["metrics"]
    for f in manifest["files"]:  # no path of this machine in the artifact's own files
        assert str(tmp_path) not in (art.dir / f["path"]).read_bytes().decode("utf-8", "replace")
    stats = json.loads((art.dir / "stats.json").read_text())["tasks"]["extractor"]
    assert stats["source"]["name"] == "data/eq.csv" and stats["input"]["rows_read"] == 80

    # the link now points at other bytes: a new key, read from (and recorded as) the new target
    (tmp_path / "real" / "eq.csv").unlink()
    (tmp_path / "real" / "eq.csv").symlink_to(second)
    assert plan(cfg)["prepare_data"]["key"] != res.key
    art2, res2 = run_node("prepare_data", cfg, {})
    assert res2.status == "ran"
    assert art2.manifest()["sources_resolved"] == {"extractor": {"source": str(second.resolve())}}
    assert json.loads((art2.dir / "stats.json").read_text())["tasks"]["extractor"]["input"]["rows_read"] == 90


def test_clean_tmp_removes_dirs_of_dead_owners_only(tmp_path):
    import subprocess
    import sys
    import time

    store = ArtifactStore(tmp_path)
    mine = store.tmp_dir("n", "k1")  # this process: alive
    dead_pid = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = tmp_path / ".tmp" / f"n-k2-p{int(dead_pid.stdout)}-abcd1234"
    dead.mkdir()
    old_corrupt = tmp_path / ".tmp" / "corrupt-n-k3-abcd1234"
    old_corrupt.mkdir()
    os.utime(old_corrupt, (time.time() - 2 * 86400,) * 2)
    fresh_corrupt = tmp_path / ".tmp" / "corrupt-n-k4-abcd1234"
    fresh_corrupt.mkdir()
    assert sorted(store.clean_tmp()) == sorted([dead.name, old_corrupt.name])
    assert mine.is_dir() and fresh_corrupt.is_dir()


_PARENT = """
import subprocess, sys, time
from dagtune.procs import reap_children_on_exit
reap_children_on_exit()
child = subprocess.Popen([sys.executable, "-c", "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"])
time.sleep(1.5)  # the watchdog has seen the child and the grandchild
print(child.pid, flush=True)
time.sleep(300)
"""


def test_children_and_grandchildren_die_with_a_sigkilled_parent():
    import signal
    import subprocess
    import sys
    import time

    from dagtune.procs import descendants

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True, env=env)
    int(parent.stdout.readline())
    below = descendants(parent.pid)
    assert len(below) >= 3  # watchdog, child, grandchild (sleep)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 15
    alive = below
    while time.time() < deadline and alive:
        time.sleep(0.2)
        alive = {p for p in below if _state(p) not in ("Z", "gone")}
    assert not alive, f"still running after the parent's SIGKILL: {alive}"


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return stat[stat.rfind(")") + 2]


@pytest.mark.parametrize("where", ["build", "manifest", "rename"])
def test_disk_full_leaves_no_artifact_and_the_rerun_builds(tmp_path, monkeypatch, where):
    import errno

    store = ArtifactStore(tmp_path)
    full = OSError(errno.ENOSPC, "No space left on device")

    def build(out, scratch):
        _build(out, scratch)
        if where == "build":
            raise full

    real_write, real_fsync = Path.write_text, store_mod.fsync_tree
    if where == "manifest":
        monkeypatch.setattr(
            Path,
            "write_text",
            lambda p, *a, **k: (
                (_ for _ in ()).throw(full) if p.name.endswith(".part") else real_write(p, *a, **k)
            ),
        )
    if where == "rename":
        monkeypatch.setattr(store_mod, "fsync_tree", lambda d: (_ for _ in ()).throw(full))
    with pytest.raises(OSError, match="No space left"):
        store.build("n", {"k": 11}, build)
    monkeypatch.undo()
    assert store.get("n", content_key({"k": 11})) is None and not list((tmp_path / ".tmp").iterdir())
    assert real_fsync is store_mod.fsync_tree and _rebuilds(store, {"k": 11})


def test_planted_environment_secrets_reach_no_artifact(root, monkeypatch):  # noqa: F811
    from dagtune.pipeline import run_node
    from tests.test_data import SMALL, make_cfg

    secret = "PLANTED-env-secret-5c1a"
    for var in ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "WANDB_API_KEY"):
        monkeypatch.setenv(var, secret)
    cfg = make_cfg(**{t: SMALL for t in ("function_calling", "extractor", "classifier")})
    run_node("prepare_data", cfg, {})
    assert not [p for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def _prepare_data_under_planned_key(salt: int) -> tuple[Any, str, Path]:
    """The tiny profile's config, prepare_data's planned key, and an intact artifact built under it."""
    from dagtune.config import load_config
    from dagtune.pipeline import plan

    cfg = load_config(None, "tiny")
    key = plan(cfg)["prepare_data"]["key"]
    art, _ = ArtifactStore(cfg.artifact_root).build("prepare_data", {"x": salt}, _build)
    good = ArtifactStore(cfg.artifact_root).path("prepare_data", key)
    good.parent.mkdir(parents=True, exist_ok=True)
    os.replace(art.dir, good)
    return cfg, key, good


def test_prefect_record_is_dropped_when_its_artifact_is_damaged(state_dir):
    from dagtune.runner import cache_record_key, prefect_results_dir

    cfg, key, good = _prepare_data_under_planned_key(1)  # an intact artifact under the planned key
    record = cache_record_key("prepare_data", cfg, {}, [])
    assert record == f"prepare_data/{key}/prefect-result"
    stored = prefect_results_dir(cfg) / record
    stored.parent.mkdir(parents=True)
    stored.write_text("{}")
    assert cache_record_key("prepare_data", cfg, {}, []) == record and stored.exists()
    (good / "weights.bin").unlink()
    assert cache_record_key("prepare_data", cfg, {}, []) == record and not stored.exists()
    assert cache_record_key("prepare_data", cfg, {}, ["prepare_data"]) is None


def test_prefect_record_of_another_location_is_dropped(state_dir):
    from dagtune.runner import cache_record_key, prefect_results_dir

    cfg, key, _ = _prepare_data_under_planned_key(2)
    stored = prefect_results_dir(cfg) / f"prepare_data/{key}/prefect-result"
    stored.parent.mkdir(parents=True)
    stored.write_text(json.dumps({"metadata": {"storage_key": str(stored.resolve())}, "result": "{}"}))
    cache_record_key("prepare_data", cfg, {}, [])
    assert stored.exists()  # its own location: kept
    stored.write_text(json.dumps({"metadata": {"storage_key": "/elsewhere/state/prefect-results/x"}}))
    cache_record_key("prepare_data", cfg, {}, [])
    assert not stored.exists()  # copied from another state dir: dropped, Prefect writes a fresh one


def test_prefect_records_of_another_state_dir_are_dropped_at_start(tmp_path, monkeypatch):
    """Issue 18 item 2: a copied state dir brings Prefect records of every key, each naming its own
    absolute path in the original (metadata.storage_key). The run's start removes those that name
    another location, whatever key they are for; its own and half-written ones stay."""
    from dagtune.config import load_config
    from dagtune.runner import drop_foreign_records, prefect_results_dir

    monkeypatch.setenv("DAGTUNE_STATE_DIR", str(tmp_path / "copy"))
    cfg = load_config(profile="tiny")
    results = prefect_results_dir(cfg)

    def record(node: str, key: str, where: Path | None) -> Path:
        p = results / node / key / store_mod.PREFECT_RECORD
        p.parent.mkdir(parents=True)
        meta = {"storage_key": str(where)} if where else {}
        p.write_text(json.dumps({"metadata": meta, "result": "{}"}))
        return p

    original = tmp_path / "state" / "prefect-results"
    foreign = record("evaluate", "k1", original / "evaluate" / "k1" / store_mod.PREFECT_RECORD)
    own = record("evaluate", "k2", None)
    own.write_text(json.dumps({"metadata": {"storage_key": str(own)}, "result": "{}"}))
    partial = record("register", "k3", None)
    partial.write_text('{"metadata": {"stor')  # a concurrent run writing it: not ours to judge here
    assert drop_foreign_records(cfg) == ["evaluate/k1/prefect-result"]
    assert not foreign.exists() and own.exists() and partial.exists()
    assert drop_foreign_records(cfg) == []


def test_register_key_moves_with_the_state_dir_and_ignores_passwords(tmp_path, monkeypatch):
    from dagtune.config import load_config
    from dagtune.pipeline import plan

    def register_key(**env):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        return plan(load_config(None, "tiny"), ["register"])["register"]["key"]

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    a = register_key(DAGTUNE_STATE_DIR=str(tmp_path / "a"))
    assert register_key(DAGTUNE_STATE_DIR=str(tmp_path / "b")) == a  # embedded store: same place in it
    pw1 = register_key(MLFLOW_TRACKING_URI="http://alice:one@mlflow:5000")
    assert register_key(MLFLOW_TRACKING_URI="http://alice:two@mlflow:5000") == pw1 != a
    assert register_key(MLFLOW_TRACKING_URI="http://other:5000") != pw1
