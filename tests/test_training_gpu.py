"""The training nodes on CUDA (skipped without a GPU; run on the GPU machine): the hf backend with NF4
4-bit bases and bf16, and the unsloth backend (FastModel / FastLanguageModel, get_peft_model with
"unsloth" gradient checkpointing, train_on_responses_only, save_pretrained_merged), on the tiny models.

    PYTHONPATH=$PWD/.gpu_site:$PWD python3 -m pytest -m gpu tests/test_training_gpu.py
"""

from __future__ import annotations

import importlib.util
import json

import pytest

if importlib.util.find_spec("unsloth") is not None:
    try:  # Unsloth patches transformers/trl/peft: it must be imported before them
        import unsloth  # noqa: F401
    except Exception:  # pragma: no cover - reported by the unsloth tests below
        pass

from test_training_common import make_ctx, prepared_data, tiny_section

from dagtune.config import RuntimeConfig
from dagtune.training import classifier as K
from dagtune.training import sft

pytestmark = pytest.mark.gpu
HAS_UNSLOTH = importlib.util.find_spec("unsloth") is not None
GPU = {"log_every": 1, "checkpoint_every": 2, "cpu_threads": None, "gradient_checkpointing": True}


def _check_merged(out, dtype: str | None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype="auto")
    if dtype:  # Unsloth's merged_16bit keeps the base checkpoint's dtype (fp32 for the tiny models)
        assert merged.dtype == getattr(torch, dtype)
    assert AutoTokenizer.from_pretrained(out / "merged").chat_template


def test_hf_backend_nf4_sft(tmp_path):
    sec = tiny_section("train_extractor", optim={"max_steps": 4}, model={"load_in_4bit": True}, **GPU)
    m = sft.build_extractor(
        make_ctx(tmp_path, "train_extractor", sec, runtime=RuntimeConfig(device="cuda", backend="hf"))
    )
    assert (m["backend"], m["device"], m["load_in_4bit"], m["dtype"]) == ("hf", "cuda", True, "bfloat16")
    assert m["peak_memory_kind"] == "cuda_max_allocated" and m["peak_memory_bytes"] > 0 and m["steps"] == 4
    _check_merged(tmp_path / "out", "bfloat16")


def test_hf_backend_nf4_classifier(tmp_path):
    sec = tiny_section("train_classifier", optim={"max_steps": 4}, model={"load_in_4bit": True},
                       early_stopping={"eval_every": 2}, **GPU)  # fmt: skip
    m = K.build_classifier(
        make_ctx(tmp_path, "train_classifier", sec, runtime=RuntimeConfig(device="cuda", backend="hf"))
    )
    assert (m["backend"], m["device"], m["load_in_4bit"]) == ("hf", "cuda", True)
    ref = json.loads((tmp_path / "out" / K.REFERENCE_FILE).read_text())
    model, _ = K.load_classifier(tmp_path / "out", device="cuda")
    import torch

    # Trained on an NF4 base, reloaded as the bf16 merge: close, not bit-equal.
    torch.testing.assert_close(model.logits(ref["texts"]), torch.tensor(ref["logits"]), atol=0.1, rtol=0.1)


@pytest.mark.skipif(not HAS_UNSLOTH, reason="unsloth not installed")
def test_unsloth_backend_sft(tmp_path):
    sec = tiny_section("train_function_calling", optim={"max_steps": 4}, model={"load_in_4bit": True}, **GPU)
    ctx = make_ctx(
        tmp_path, "train_function_calling", sec, runtime=RuntimeConfig(device="auto", backend="auto")
    )
    m = sft.build_function_calling(ctx)
    assert (m["backend"], m["device"]) == ("unsloth", "cuda") and m["steps"] == 4
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    _check_merged(tmp_path / "out", None)


@pytest.mark.skipif(not HAS_UNSLOTH, reason="unsloth not installed")
def test_unsloth_backend_classifier(tmp_path):
    sec = tiny_section("train_classifier", optim={"max_steps": 4}, model={"load_in_4bit": True},
                       early_stopping={"eval_every": 2}, **GPU)  # fmt: skip
    m = K.build_classifier(
        make_ctx(tmp_path, "train_classifier", sec, runtime=RuntimeConfig(device="cuda", backend="unsloth"))
    )
    assert (m["backend"], m["device"]) == ("unsloth", "cuda") and m["steps"] == 4
    assert set(m["target_modules"]) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    ref = json.loads((tmp_path / "out" / K.REFERENCE_FILE).read_text())
    model, _ = K.load_classifier(tmp_path / "out", device="cuda")
    import torch

    torch.testing.assert_close(model.logits(ref["texts"]), torch.tensor(ref["logits"]), atol=0.1, rtol=0.1)
    assert prepared_data()  # the same data as the CPU tests


# ----------------------------------------------------------------------------------------------
# the unsloth path in detail: response-only labels, LoRA-only updates on a 4-bit base, packing
# ----------------------------------------------------------------------------------------------
def _unsloth_setup(tmp_path, **updates):
    optim = {"max_steps": 3, **updates.pop("optim", {})}
    sec = tiny_section("train_function_calling", optim=optim, model={"load_in_4bit": True},
                       **{**GPU, **updates})  # fmt: skip
    ctx = make_ctx(
        tmp_path, "train_function_calling", sec, runtime=RuntimeConfig(device="cuda", backend="unsloth")
    )
    return ctx, sft.setup(ctx, sft.FUNCTION_CALLING)


def _reference_labels(tok, max_len: int) -> dict[tuple, list[int]]:
    import pandas as pd

    df = pd.read_parquet(prepared_data().dir / "function_calling" / "train.parquet")
    rows, _ = sft.tokenize_prompt_completion(tok, df["prompt"], df["completion"], max_len)
    return {tuple(r["input_ids"]): sft.with_labels(r)["labels"] for r in rows}


@pytest.mark.skipif(not HAS_UNSLOTH, reason="unsloth not installed")
def test_unsloth_response_only_labels_match_completion_mask(tmp_path):
    """train_on_responses_only (turn markers) labels exactly the completion tokens, like the hf path."""
    _, run = _unsloth_setup(tmp_path)
    ref = _reference_labels(run.loaded.tokenizer, tiny_section("train_function_calling").model.max_seq_length)
    ds = run.trainer.train_dataset
    assert len(ds) == run.n_train
    for i in range(min(32, len(ds))):
        ids, labels = tuple(ds[i]["input_ids"]), list(ds[i]["labels"])
        assert labels == ref[ids], i


@pytest.mark.skipif(not HAS_UNSLOTH, reason="unsloth not installed")
def test_unsloth_4bit_lora_only_updates(tmp_path):
    import torch

    _, run = _unsloth_setup(tmp_path)
    model = run.trainer.model
    assert run.rt.load_in_4bit and any(type(m).__name__ == "Linear4bit" for m in model.modules())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora = {n for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    run.trainer.train()
    for n, p in model.named_parameters():
        if n in lora:
            if "lora_B" in n:
                assert not torch.equal(p, before[n]), f"{n} did not change"
        else:
            assert torch.equal(p, before[n]), f"base weight {n} changed"


@pytest.mark.skipif(not HAS_UNSLOTH, reason="unsloth not installed")
def test_unsloth_packed_sft_uses_varlen_attention(tmp_path):
    """packing: true on the unsloth backend: 8 examples per step in padding-free rows, the labels of the
    completion mask, and a finite loss. Which attention kernel runs (Unsloth's varlen shim or SDPA over the
    block mask) is reported, not required: correctness is test_unsloth_packed_step_matches_unpacked's."""
    import math

    from unsloth.utils.hf_packed_attention import HF_PACKED_ATTENTION_STATS

    ctx, run = _unsloth_setup(tmp_path, packing=True, packed_tokens_per_batch=1024,
                         optim={"max_steps": 3, "batch_size": 4, "grad_accum": 2})  # fmt: skip
    assert run.stats["packing"] and run.stats["packing_varlen_attention"]
    ref = _reference_labels(run.loaded.tokenizer, tiny_section("train_function_calling").model.max_seq_length)
    item = run.trainer.train_dataset[0]
    batch = run.trainer.data_collator([item])
    assert "attention_mask" not in batch and batch["packed_seq_lengths"].tolist() == item["seq_lengths"]
    start = 0
    for n in item["seq_lengths"]:
        ids = tuple(batch["input_ids"][0, start : start + n].tolist())
        assert batch["labels"][0, start : start + n].tolist() == ref[ids]
        assert batch["position_ids"][0, start : start + n].tolist() == list(range(n))
        start += n
    fast0 = HF_PACKED_ATTENTION_STATS["fast"]
    m = sft.train(ctx, run)
    assert m["steps"] == 3 and math.isfinite(m["train_loss"])
    print("unsloth packed attention calls:", dict(HF_PACKED_ATTENTION_STATS), "before:", fast0)


def _rel_diff(a, b) -> float:
    return float((a - b).norm()) / max(float(b.norm()), 1e-12)


@pytest.mark.skipif(not HAS_UNSLOTH, reason="unsloth not installed")
def test_unsloth_packed_step_matches_unpacked(tmp_path):
    """The CPU equivalence test on the unsloth backend, one optimizer step of the same 8 examples:
      u8    unpacked, one padded micro-batch of 8 (train_on_responses_only labels);
      u4x2  unpacked, two micro-batches of 4 (the reference recipe's shape: weighting across micro-batches);
      p1    packed, one padding-free row;  pN  packed, several rows (a small token cap);
      leaky packed with positions running on across examples (what a leaking attention would see).
    Isolation: p1 == u8 (one micro-batch each: only attention can differ). Weighting: pN == p1 == u4x2,
    which holds only if every micro-batch's loss is divided by the step's label-token count. Everything
    is measured before anything is asserted, and printed as one JSON line."""
    import torch
    from test_training_packing import _data, _one_step

    rt = RuntimeConfig(device="cuda", backend="unsloth")
    data = _data(8)
    big = {"packing": True, "packed_tokens_per_batch": 100_000}
    runs = {
        "u8": _one_step(tmp_path / "u8", data, rt, optim={"batch_size": 8, "grad_accum": 1}),
        "u4x2": _one_step(tmp_path / "u4x2", data, rt),
        "p1": _one_step(tmp_path / "p1", data, rt, **big),
        "pN": _one_step(tmp_path / "pN", data, rt, packing=True, packed_tokens_per_batch=16),
    }
    orig = sft.PackedCollator.__call__

    def leaky(self, items):
        b = orig(self, items)
        b["position_ids"] = torch.arange(b["input_ids"].shape[1]).unsqueeze(0)
        b.pop("packed_seq_lengths", None)
        return b

    sft.PackedCollator.__call__ = leaky
    try:
        runs["leaky"] = _one_step(tmp_path / "leaky", data, rt, **big)
    finally:
        sft.PackedCollator.__call__ = orig
    ref_loss, ref_grads, _ = runs["u8"]
    report = {}
    for name, (loss, grads, st) in runs.items():
        report[name] = {
            "loss": loss,
            "num_items_in_batch": st["num_items_in_batch"],
            "micro_batches": st.get("packed_micro_batches_per_step"),
            "max_grad_rel_diff_vs_u8": max(_rel_diff(grads[k], ref_grads[k]) for k in ref_grads)
            if set(grads) == set(ref_grads)
            else "different parameter sets",
        }
    print("PACKED_VS_UNPACKED " + json.dumps(report))
    assert runs["p1"][2]["packed_micro_batches_per_step"] == 1
    assert runs["pN"][2]["packed_micro_batches_per_step"] > 2
    # bf16 compute on the GPU: losses to 1%, each gradient by its relative norm to 5%.
    for name in ("p1", "pN", "u4x2"):
        assert runs[name][0] == pytest.approx(ref_loss, rel=1e-2), (name, report)
        assert report[name]["max_grad_rel_diff_vs_u8"] < 5e-2, (name, report)
    gap = abs(runs["p1"][0] - ref_loss)
    assert abs(runs["leaky"][0] - ref_loss) > 5 * gap, report
    assert report["leaky"]["max_grad_rel_diff_vs_u8"] > 5 * report["p1"]["max_grad_rel_diff_vs_u8"], report
