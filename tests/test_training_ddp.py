"""Data parallel inside a training node (dagtune/training/ddp.py): the real build functions of
train_classifier and train_extractor on the tiny profile, once as one plain process and once under
``torchrun --nproc_per_node 2`` on CPU (gloo), both from tests/ddp_child.py. Both ranks train; only rank
0 writes the artifact and the train log; every optimizer step takes the same examples as the
one-process run (the classifier's collated micro-batches, compared example by example), and the loss
and gradient norm of the first steps are the one-process run's. LoRA dropout is 0 here: with dropout
the gradient depends on the random masks, which differ from one process to two (the loss of step 1
does not, LoRA B starting at zero)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_training_common import prepared_data, shared_store

from dagtune.config import ConfigError, load_config
from dagtune.training import ddp

TESTS = Path(__file__).resolve().parent
STEPS = 3
UPDATES = {"optim": {"max_steps": STEPS}, "lora": {"dropout": 0.0}, "log_every": 1, "checkpoint_every": 100}
NODES = {  # node -> (files only rank 0 may write, updates)
    "train_classifier": (
        ("adapter", "head.safetensors", "classifier_config.json", "train_log.jsonl"),
        {**UPDATES, "save_merged": False},
    ),  # fmt: skip
    "train_extractor": (("adapter", "tokenizer", "merged", "train_log.jsonl"), UPDATES),
}


def _specs(work: Path, store: Path) -> list[dict]:
    data = str(prepared_data().dir)
    return [{"work": str(work / node), "node": node, "updates": upd, "data": data, "store": str(store)}
            for node, (_, upd) in NODES.items()]  # fmt: skip


def _launch(cmd: list[str], work: Path, store: Path) -> subprocess.Popen:
    work.mkdir(parents=True)
    spec = work / "spec.json"
    spec.write_text(json.dumps(_specs(work, store)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=str(TESTS.parent), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = open(work / "log.txt", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([*cmd, str(TESTS / "ddp_child.py"), str(spec)], env=env, stdout=log, stderr=log)


def _wait(proc: subprocess.Popen, work: Path) -> None:
    rc = proc.wait(timeout=400)
    assert rc == 0, (work / "log.txt").read_text()[-4000:]


def _result(work: Path, node: str, rank: int) -> dict:
    return json.loads((work / node / f"result-rank{rank}.json").read_text())


def _train_log(work: Path, node: str) -> list[dict]:
    lines = (work / node / "scratch" / "train_log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """(one-process run, two-rank torchrun run), started side by side. The one-process run reads the
    tiny models built here; the torchrun run starts from an empty store, so its ranks build them (rank 0
    first: transformers saves nothing on another rank once the process group is up)."""
    from dagtune.models import resolve_model

    root = tmp_path_factory.mktemp("ddp")
    store = shared_store()
    for model in ("tiny-phi3", "tiny-gemma3"):
        resolve_model(model, store)
    torchrun = Path(sys.executable).with_name("torchrun")
    one = _launch([sys.executable], root / "one", store.root)
    two = _launch(
        [str(torchrun), "--standalone", "--nproc_per_node", "2"], root / "two", root / "empty-store"
    )
    _wait(one, root / "one")
    _wait(two, root / "two")
    return root / "one", root / "two"


@pytest.mark.slow
@pytest.mark.parametrize("node", list(NODES))
def test_both_ranks_train_and_only_rank_0_writes(runs, node):
    _, two = runs
    ranks = [_result(two, node, r) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [[0, 0, 2], [1, 1, 2]]
    assert all(r["metrics"]["steps"] == STEPS and r["metrics"]["world_size"] == 2 for r in ranks)
    written, _ = NODES[node]
    assert all((two / node / "out-rank0" / f).exists() for f in written)
    assert list((two / node / "out-rank1").iterdir()) == []  # rank 1 trained but wrote nothing
    assert list((two / node / "out").iterdir()) == []
    assert [r["step"] for r in _train_log(two, node)] == list(range(1, STEPS + 1))  # one writer, once a step
    base = Path(ranks[1]["metrics"]["base_model_path"])  # built by rank 0 in the run's own store
    assert base.parent == two.parent / "empty-store" / "base_models"
    assert (base / "model.safetensors").is_file() and (base / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("node", list(NODES))
def test_same_global_batch_and_same_loss_as_one_process(runs, node):
    one, two = runs
    m1, m2 = _result(one, node, 0)["metrics"], _result(two, node, 0)["metrics"]
    per_step = lambda m: m["per_device_train_batch_size"] * m["per_device_grad_accum"] * m["world_size"]  # noqa: E731
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    assert per_step(m1) == per_step(m2) == 8  # the tiny profile's batch_size 8 x grad_accum 1
    assert m2["per_device_train_batch_size"] == 4
    log1, log2 = _train_log(one, node), _train_log(two, node)
    assert log2[0]["loss"] == pytest.approx(log1[0]["loss"], rel=1e-5)
    # Same gradient, hence the same update: the next steps' losses agree too.
    for a, b in zip(log1, log2, strict=True):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["num_tokens"] == a["num_tokens"]  # the non-pad tokens of the step, over both ranks
    if node == "train_classifier":  # the final validation: the same predictions, the same loss
        assert (m2["val_accuracy"], m2["val_macro_f1"]) == (m1["val_accuracy"], m1["val_macro_f1"])
        assert m2["val_loss"] == pytest.approx(m1["val_loss"], rel=1e-4)


@pytest.mark.slow
def test_each_step_takes_the_one_process_examples(runs):
    """The classifier's collated training micro-batches: rank r's k-th is the one-process run's examples
    of that step, split between the ranks without overlap."""
    one, two = runs
    node = "train_classifier"
    single = _result(one, node, 0)["micro_batches"][:STEPS]
    r0, r1 = (_result(two, node, r)["micro_batches"][:STEPS] for r in (0, 1))
    for step in range(STEPS):
        assert len(single[step]) == 8 and len(r0[step]) == len(r1[step]) == 4
        assert not set(r0[step]) & set(r1[step])
        assert sorted(r0[step] + r1[step]) == sorted(single[step])


def test_per_device_batch_keeps_the_examples_per_step():
    assert ddp.per_device_batch(8, 8, 1) == (8, 1)
    assert ddp.per_device_batch(32, 8, 2) == (8, 2)  # the micro-batch kept, the accumulation halved
    assert ddp.per_device_batch(8, 8, 2) == (4, 1)  # no accumulation to divide: the micro-batch halved
    assert ddp.per_device_batch(24, 8, 4) == (6, 1)
    assert ddp.per_device_batch(12, 4, 2) == (3, 2)
    with pytest.raises(ValueError, match="cannot be split evenly over 3 GPUs"):
        ddp.per_device_batch(8, 8, 3)


def test_world_outside_and_inside_torchrun(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert ddp.world() == (0, 0, 1) and ddp.is_main() and not ddp.is_distributed()
    ddp.barrier()  # no-op on one process
    ddp.wait_for_main()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert ddp.world() == (3, 1, 4) and not ddp.is_main()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="inconsistent torchrun environment"):
        ddp.world()


def test_config_gpus_validation(monkeypatch):
    ok = load_config(profile="tiny", overrides={"train_classifier": {"gpus": 2}})
    assert ok.train_classifier.gpus == 2 and ok.train_extractor.gpus == 1
    with pytest.raises(
        ConfigError, match=r"train_extractor.gpus=2 with runtime.backend=unsloth.*unsloth.ai/docs"
    ):
        load_config(
            profile="tiny", overrides={"runtime": {"backend": "unsloth"}, "train_extractor": {"gpus": 2}}
        )
    with pytest.raises(
        ConfigError, match=r"train_classifier: .*gpus=3: optim.batch_size \* optim.grad_accum = 8"
    ):
        load_config(profile="tiny", overrides={"train_classifier": {"gpus": 3}})
    # auto: a node on several GPUs trains with hf even where Unsloth would be picked for one GPU
    from dagtune import runtime as R
    from dagtune.config import RuntimeConfig

    auto = RuntimeConfig(device="cuda", backend="auto")
    monkeypatch.setattr(R, "unsloth_installed", lambda: True)
    assert R.resolve_backend(auto, "cuda", 1) == "unsloth"
    assert R.resolve_backend(auto, "cuda", 2) == "hf"
    with pytest.raises(RuntimeError, match="unsloth backend trains on one GPU"):
        R.resolve_backend(RuntimeConfig(device="cuda", backend="unsloth"), "cuda", 2)


def test_packed_plan_gives_every_rank_an_equal_share_of_each_step():
    """Packing under W ranks: the micro-batches per step round up to a multiple of W (accelerate deals
    them out round-robin, accum / W to each rank), and each step still holds exactly its group."""
    from dagtune.data.packing import pack_plan, step_groups

    lengths = [17, 230, 45, 90, 12, 300, 64, 128, 33, 75, 41, 250]
    plain, k1 = pack_plan(lengths, 6, 400, seed=7, total_steps=4)
    split, k2 = pack_plan(lengths, 6, 400, seed=7, total_steps=4, multiple_of=2)
    assert k1 == 3 and k2 == 4  # 3 micro-batches fit the cap; 2 ranks need an even count
    groups = step_groups(len(lengths), 6, 7, 4)
    for step, group in enumerate(groups):
        share = split[step * k2 : (step + 1) * k2]
        assert sorted(i for mb in share for i in mb) == sorted(group)
        assert all(sum(lengths[i] for i in mb) <= 400 for mb in share)
    assert len(plain) == 4 * k1 and len(split) == 4 * k2
