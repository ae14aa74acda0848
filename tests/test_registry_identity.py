"""Registry digests depend on model content only (not paths, dict or set order, run timings), and the
same training inputs on CPU give byte-identical adapters, so a rerun registers nothing new."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dagtune.registry.identity import content_digest
from dagtune.store import sha256_file


def manifest_of(root: Path) -> dict:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {"files": [{"path": p.relative_to(root).as_posix(), "sha256": sha256_file(p)} for p in files]}


def write_adapter(root: Path, base: str, targets: list[str], weights: bytes, log: str) -> None:
    (root / "adapter").mkdir(parents=True)
    cfg = {"base_model_name_or_path": base, "target_modules": targets, "r": 8, "peft_type": "LORA"}
    (root / "adapter" / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    (root / "adapter" / "adapter_model.safetensors").write_bytes(weights)
    (root / "train_log.jsonl").write_text(log)


def test_digest_ignores_paths_list_order_and_timings(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    key = "4f" * 32
    write_adapter(a, f"/home/x/.state/artifacts/base_models/{key}", ["q_proj", "v_proj"], b"w1", "1.0 s\n")
    write_adapter(b, f"/srv/other/state/artifacts/base_models/{key}", ["v_proj", "q_proj"], b"w1", "9 s\n")
    write_adapter(c, f"/srv/other/state/artifacts/base_models/{key}", ["v_proj", "q_proj"], b"w2", "9 s\n")
    da, db, dc = (content_digest(manifest_of(d), d, "adapter/") for d in (a, b, c))
    assert da == db  # same weights, other state dir, other set order
    assert dc != db  # other weights
    assert content_digest(manifest_of(a), a) == content_digest(manifest_of(b), b)  # train log ignored
    # another base model is another adapter
    write_adapter(tmp_path / "d", "/x/base_models/" + "00" * 32, ["q_proj", "v_proj"], b"w1", "")
    assert content_digest(manifest_of(tmp_path / "d"), tmp_path / "d", "adapter/") != da


def test_same_inputs_on_cpu_give_byte_identical_adapters(tmp_path):
    """Two trainings of the function caller from the same inputs, from base copies in two different
    directories (another machine's state dir): identical adapter bytes and the same registry digest."""
    from test_training_common import make_ctx, shared_store, tiny_section

    from dagtune.models import resolve_model
    from dagtune.training import sft

    src = Path(resolve_model("tiny-functiongemma", shared_store()))
    outs = []
    for machine in ("a", "b"):
        base = tmp_path / machine / "state" / "tiny-functiongemma"
        shutil.copytree(src, base)
        sec = tiny_section(
            "train_function_calling",
            model={"name": str(base)},
            optim={"max_steps": 3},
            log_every=1,
            checkpoint_every=100,
            save_merged=False,
        )
        sft.build_function_calling(make_ctx(tmp_path / machine, "train_function_calling", sec))
        outs.append(tmp_path / machine / "out")
    a, b = outs
    wa, wb = (o / "adapter" / "adapter_model.safetensors" for o in outs)
    assert wa.read_bytes() == wb.read_bytes()
    assert (a / "adapter" / "adapter_config.json").read_text() != (
        b / "adapter" / "adapter_config.json"
    ).read_text()
    assert content_digest(manifest_of(a), a, "adapter/") == content_digest(manifest_of(b), b, "adapter/")
