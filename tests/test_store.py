"""The artifact store: content keys, manifest written last, atomic rename, one computation per key."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest

from dagtune.store import MANIFEST, ArtifactStore, canonical_json, content_key, sha256_file


def test_content_key_is_canonical():
    a = {"b": 1, "a": [1, 2, {"y": 1.5, "x": "ü"}]}
    b = {"a": [1, 2, {"x": "ü", "y": 1.5}], "b": 1}
    assert canonical_json(a) == canonical_json(b)
    assert content_key(a) == content_key(b)
    assert content_key(a) != content_key({**a, "b": 2})
    assert len(content_key(a)) == 64


def _write_two(out: Path, scratch: Path):
    (out / "sub").mkdir()
    (out / "a.txt").write_text("hello")
    (out / "sub" / "b.bin").write_bytes(b"\x00" * 10)
    return {"rows": 2}


def test_build_writes_manifest_with_hashes_and_caches(tmp_path):
    store = ArtifactStore(tmp_path)
    inputs = {"node": "n", "x": 1}
    art, ran = store.build("n", inputs, _write_two)
    assert ran
    m = art.manifest()
    assert m["key"] == content_key(inputs) == art.key
    assert m["inputs"] == inputs and m["metrics"] == {"rows": 2}
    files = {f["path"]: f for f in m["files"]}
    assert set(files) == {"a.txt", "sub/b.bin"}
    assert files["a.txt"]["sha256"] == sha256_file(art.dir / "a.txt") and files["sub/b.bin"]["size"] == 10
    assert "transformers" in m["libraries"] and m["timings"]["seconds"] >= 0

    def boom(out, scratch):
        raise AssertionError("must not rebuild a cached key")

    art2, ran2 = store.build("n", inputs, boom)
    assert not ran2 and art2.path == art.path


def test_failed_build_leaves_nothing(tmp_path):
    store = ArtifactStore(tmp_path)

    def fail(out, scratch):
        (out / "partial").write_text("x")
        raise RuntimeError("node failed")

    try:
        store.build("n", {"k": 1}, fail)
    except RuntimeError:
        pass
    assert store.get("n", content_key({"k": 1})) is None
    assert not any((tmp_path / ".tmp").iterdir())


def test_stale_dir_without_manifest_is_not_an_artifact_and_is_replaced(tmp_path):
    store = ArtifactStore(tmp_path)
    key = content_key({"k": 2})
    stale = store.path("n", key)
    stale.mkdir(parents=True)
    (stale / "half.bin").write_text("half")
    assert store.get("n", key) is None
    art, ran = store.build("n", {"k": 2}, _write_two)
    assert ran and not (art.dir / "half.bin").exists() and (art.dir / MANIFEST).exists()


def test_force_rebuilds(tmp_path):
    store = ArtifactStore(tmp_path)
    store.build("n", {"k": 3}, _write_two)
    calls = []

    def again(out, scratch):
        calls.append(1)
        return _write_two(out, scratch)

    _, ran = store.build("n", {"k": 3}, again, force=True)
    assert ran and calls == [1]


def _slow_build(root: str, marker_dir: str) -> None:
    store = ArtifactStore(root)

    def build(out, scratch):
        Path(marker_dir, f"built-{os.getpid()}").write_text("1")
        time.sleep(1.0)
        (out / "f").write_text("x")

    store.build("n", {"k": "same"}, build)


def test_two_processes_compute_a_key_once(tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_slow_build, args=(str(tmp_path / "store"), str(markers))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(list(markers.iterdir())) == 1
    assert ArtifactStore(tmp_path / "store").get("n", content_key({"k": "same"})) is not None


def _killed_build(root: str) -> None:
    store = ArtifactStore(root)

    def build(out, scratch):
        (out / "big.bin").write_bytes(b"x" * 1000)
        (scratch / "checkpoint").write_text("step 5")
        time.sleep(60)

    store.build("n", {"k": "kill"}, build)


def test_sigkill_while_writing_leaves_no_manifest_and_rerun_succeeds(tmp_path):
    root = tmp_path / "store"
    p = mp.get_context("spawn").Process(target=_killed_build, args=(str(root),))
    p.start()
    deadline = time.time() + 30
    while time.time() < deadline and not list((root / ".scratch").glob("*/checkpoint")):
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    store = ArtifactStore(root)
    key = content_key({"k": "kill"})
    assert store.get("n", key) is None
    assert not store.path("n", key).exists()
    # The scratch dir (resumable checkpoints) survives the kill; the rerun sees it, then it is removed.
    seen = {}

    def build(out, scratch):
        seen["checkpoint"] = (scratch / "checkpoint").read_text()
        (out / "f").write_text("ok")

    art, ran = store.build("n", {"k": "kill"}, build)
    assert ran and seen["checkpoint"] == "step 5"
    assert json.loads((art.dir / MANIFEST).read_text())["key"] == key
    assert not (root / ".scratch" / f"n-{key}").exists()


_HOLD_KEY_LOCK = """
import sys, time
from dagtune.store import ArtifactStore
with ArtifactStore(sys.argv[1]).lock("n", "k1"):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_clean_tmp_keeps_a_build_whose_key_lock_another_host_holds(tmp_path):
    """On a root shared by several hosts, a build dir's pid means nothing here (another host's build,
    or a pid that is free on this one): its key lock, held by the builder, is what keeps it."""
    import subprocess
    import sys

    store = ArtifactStore(tmp_path)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    building = tmp_path / ".tmp" / f"n-k1-p{int(gone.stdout)}-abcd1234"  # "another host's" pid
    building.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_KEY_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert store.clean_tmp() == [] and building.is_dir()
    finally:
        holder.kill()
        holder.wait()
    assert store.clean_tmp() == [building.name] and not building.exists()


def test_a_root_without_flock_is_refused_by_name(tmp_path, monkeypatch):
    """No silent soft-lock fallback on a filesystem without flock(2) (some network mounts)."""
    import errno
    import fcntl

    import pytest

    from dagtune.store import ArtifactError

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(ArtifactError, match=f"artifact root {tmp_path}: its filesystem has no flock"):
        ArtifactStore(tmp_path).build("n", {"a": 1}, _write_two)


def test_a_build_returning_something_other_than_metrics_is_refused(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(TypeError, match="node n's build returned int, not a metrics mapping"):
        store.build("n", {"k": 1}, lambda out, _s: (out / "f").write_text("x"))
    assert store.get("n", content_key({"k": 1})) is None
