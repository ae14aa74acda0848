"""Padding-free packing in the SFT nodes (CPU, tiny models): the step plan keeps the examples per optimizer
step, the packed rows keep the completion-only labels and restart the positions per example, and one
optimizer step packed gives the same loss and the same gradients as the unpacked reference recipe
(per-example loss weighting unchanged), with one and with several packed micro-batches per step."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import pytest
import torch
from test_training_common import _chat_rows, _extract, _fc_rows, make_ctx, tiny_section, write_task

from dagtune.data import packing
from dagtune.store import Artifact
from dagtune.training import sft


# ----------------------------------------------------------------------------------------------
# the plan
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [64, 70, 5])
def test_pack_plan_keeps_examples_per_step(n):
    rng = random.Random(n)
    lengths = [rng.randint(50, 400) for _ in range(n)]
    per_step, cap, total = 32, 1000, 5
    micro, accum = packing.pack_plan(lengths, per_step, cap, seed=7, total_steps=total)
    assert len(micro) == total * accum
    steps = [micro[i * accum : (i + 1) * accum] for i in range(total)]
    groups = packing.step_groups(n, per_step, 7, total)
    for step, group in zip(steps, groups, strict=True):
        flat = [i for b in step for i in b]
        assert sorted(flat) == sorted(group), "a step packs exactly its group of examples, each once"
        assert all(sum(lengths[i] for i in b) <= cap for b in step), "token cap per micro-batch"
    # Every epoch covers every example once, in groups of 32 (a last smaller one), like the Trainer's
    # batch_size * grad_accum examples per step.
    per_epoch = -(-n // per_step)
    first_epoch = [i for g in groups[:per_epoch] for i in g]
    if total >= per_epoch:
        assert sorted(first_epoch) == list(range(n))
        assert [len(g) for g in groups[:per_epoch]] == [per_step] * (n // per_step) + (
            [n % per_step] if n % per_step else []
        )
    again = packing.pack_plan(lengths, per_step, cap, seed=7, total_steps=total)
    assert again == (micro, accum), "deterministic"
    # A large cap: one micro-batch per step.
    assert packing.pack_plan(lengths, per_step, 10**6, seed=7, total_steps=total)[1] == 1


def test_split_by_tokens_balances_and_keeps_order():
    lengths = [100, 900, 300, 300, 200, 100]
    bins = packing.split_by_tokens([5, 1, 0, 2, 3, 4], lengths, 2)
    assert sorted(i for b in bins for i in b) == [0, 1, 2, 3, 4, 5]
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert sorted(loads) == [900, 1000]  # the best split of 1900 tokens
    order = [5, 1, 0, 2, 3, 4]
    assert all(b == sorted(b, key=order.index) for b in bins)
    assert packing.split_by_tokens([3], lengths, 3) == [[3], [], []]


# ----------------------------------------------------------------------------------------------
# the node's packed rows
# ----------------------------------------------------------------------------------------------
def _data(n_train: int, task: str = "function_calling") -> Artifact:
    root = Path(tempfile.mkdtemp(prefix="dagtune-pack-data-"))
    if task == "function_calling":
        write_task(root, task, _fc_rows(n_train + 3, 11), 2, 1)
    else:
        write_task(root, task, _chat_rows("tiny-gemma3", n_train + 3, 12, _extract), 2, 1)
    return Artifact("prepare_data", "test", str(root))


def _run(tmp: Path, node: str, spec: sft.SFTSpec, data: Artifact, runtime=None, **updates):
    sec = tiny_section(node, log_every=1, checkpoint_every=100, **updates)
    return sft.setup(make_ctx(tmp, node, sec, data=data, runtime=runtime), spec)


@pytest.mark.parametrize(("node", "spec", "task"), [
    ("train_function_calling", sft.FUNCTION_CALLING, "function_calling"),
    ("train_extractor", sft.EXTRACTOR, "extractor"),
])  # fmt: skip
def test_packed_rows_keep_completion_only_labels(tmp_path, node, spec, task):
    data = _data(20, task)
    run = _run(tmp_path, node, spec, data, packing=True, packed_tokens_per_batch=600,
               optim={"batch_size": 4, "grad_accum": 2, "max_steps": 3})  # fmt: skip
    unpacked = _run(
        tmp_path / "u", node, spec, data, optim={"batch_size": 4, "grad_accum": 2, "max_steps": 3}
    )
    ref = {tuple(r["input_ids"]): r["labels"] for r in unpacked.trainer.train_dataset}  # TRL's labels
    accum = run.stats["packed_micro_batches_per_step"]
    assert (
        run.trainer.args.gradient_accumulation_steps == accum
        and run.trainer.args.per_device_train_batch_size == 1
    )
    seen = 0
    for k in range(len(run.trainer.train_dataset)):
        item = run.trainer.train_dataset[k]
        batch = run.trainer.data_collator([item])
        assert set(batch) == {"input_ids", "labels", "position_ids"}, "padding-free: no attention mask"
        ids, labels, pos = (batch[x][0].tolist() for x in ("input_ids", "labels", "position_ids"))
        assert len(ids) <= 600 and len(ids) == sum(item["seq_lengths"])
        start = 0
        for n in item["seq_lengths"]:
            assert pos[start : start + n] == list(range(n)), "positions restart at every example"
            ex_ids, ex_labels = tuple(ids[start : start + n]), labels[start : start + n]
            assert ex_labels == ref[ex_ids], "the same completion-only labels as the unpacked path"
            assert ex_labels[0] == -100
            start += n
            seen += 1
    assert seen == 20, "one epoch of 20 examples: steps of 8, 8 and 4"


# ----------------------------------------------------------------------------------------------
# one optimizer step: packed == unpacked
# ----------------------------------------------------------------------------------------------
class _GradCapture:
    def __init__(self):
        self.grads: dict[str, torch.Tensor] = {}

    def callback(self):
        from transformers import TrainerCallback

        cap = self

        class _Cb(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
                for n, p in model.named_parameters():
                    if p.requires_grad and p.grad is not None:
                        cap.grads[n.replace("module.", "")] = p.grad.detach().float().cpu().clone()

        return _Cb()


def _one_step(
    tmp: Path, data: Artifact, runtime=None, optim: dict | None = None, **updates
) -> tuple[float, dict[str, torch.Tensor], dict]:
    """One optimizer step (default: 2 micro-batches of 4); the stats also record what the Trainer passed to
    its loss per micro-batch (``num_items_in_batch``: the step's label-token count, or None when it
    falls back to a mean per micro-batch)."""
    optim = {"batch_size": 4, "grad_accum": 2, "max_steps": 1, "max_grad_norm": 1e9, **(optim or {})}
    run = _run(tmp, "train_function_calling", sft.FUNCTION_CALLING, data, runtime, optim=optim, **updates)
    # LoRA B starts at zero, which would leave every A gradient zero: give B the same random values in
    # both runs so the gradients of both factors depend on the attention pattern.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in sorted(run.trainer.model.named_parameters()):
            if "lora_B" in n:
                p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p.device, p.dtype))
    cap = _GradCapture()
    run.trainer.add_callback(cap.callback())
    seen: list = []
    compute_loss = run.trainer.compute_loss

    def recording(model, inputs, *a, **kw):
        n = kw.get("num_items_in_batch")
        seen.append(None if n is None else int(n))
        return compute_loss(model, inputs, *a, **kw)

    run.trainer.compute_loss = recording
    result = run.trainer.train()
    return float(result.training_loss), cap.grads, {**run.stats, "num_items_in_batch": seen}


@pytest.mark.slow
def test_packed_step_same_loss_and_gradients_as_unpacked(tmp_path):
    """8 examples per step: unpacked = 2 padded micro-batches of 4 (the reference recipe's shape),
    packed = one padding-free row of 8, and packed with a small token cap = several rows. The step's
    loss (mean over its completion tokens) and every LoRA gradient agree."""
    data = _data(8)
    loss_u, grads_u, su = _one_step(tmp_path / "u", data)
    loss_p1, grads_p1, st1 = _one_step(tmp_path / "p1", data, packing=True, packed_tokens_per_batch=100_000)
    loss_p3, grads_p3, st3 = _one_step(tmp_path / "p3", data, packing=True, packed_tokens_per_batch=16)
    assert st1["packed_micro_batches_per_step"] == 1 and st3["packed_micro_batches_per_step"] > 2
    # Token-weighted over the whole step both ways: every micro-batch's loss is divided by the step's
    # label-token count, the same count packed or not.
    assert len(su["num_items_in_batch"]) == 2 and len(st3["num_items_in_batch"]) > 2
    counts = {*su["num_items_in_batch"], *st1["num_items_in_batch"], *st3["num_items_in_batch"]}
    assert len(counts) == 1 and None not in counts, counts
    assert grads_u and set(grads_u) == set(grads_p1) == set(grads_p3)
    assert any(float(v.abs().sum()) > 0 for k, v in grads_u.items() if "lora_A" in k)
    for loss, grads in ((loss_p1, grads_p1), (loss_p3, grads_p3)):
        assert loss == pytest.approx(loss_u, rel=1e-5, abs=1e-6)
        for k in grads_u:
            torch.testing.assert_close(grads[k], grads_u[k], rtol=1e-4, atol=1e-6, msg=k)
    # And the check has teeth: positions running on across examples (attention crossing them) differ.
    orig = sft.PackedCollator.__call__

    def leaky(self, items):
        b = orig(self, items)
        if "position_ids" in b:
            b["position_ids"] = torch.arange(b["input_ids"].shape[1]).unsqueeze(0)
        return b

    sft.PackedCollator.__call__ = leaky
    try:
        loss_bad, _, _ = _one_step(tmp_path / "bad", data, packing=True, packed_tokens_per_batch=100_000)
    finally:
        sft.PackedCollator.__call__ = orig
    assert abs(loss_bad - loss_u) > 1e-4


@pytest.mark.slow
def test_packed_node_trains_and_resumes_plan(tmp_path):
    """A whole packed run through the node entry point: steps, stats and the train log."""
    sec = tiny_section("train_function_calling", packing=True, packed_tokens_per_batch=2048, log_every=1,
                       checkpoint_every=100, optim={"max_steps": 3, "batch_size": 4, "grad_accum": 2})  # fmt: skip
    m = sft.build_function_calling(make_ctx(tmp_path, "train_function_calling", sec))
    assert m["steps"] == 3 and m["packing"] is True and m["packed_micro_batches_per_step"] >= 1
    assert m["train_loss_first"] is not None and m["val_loss"] is not None
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
