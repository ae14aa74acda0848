"""train_function_calling / train_extractor on the tiny models (CPU): completion-only loss masking token
by token, LoRA-only updates, determinism, the artifact (adapter, tokenizer, merged model, train log),
resume after SIGKILL, and the unsloth code path against a stand-in module."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_training_common import (
    prepared_data,
    progress_lines,
    progress_steps,
    shared_store,
    tiny_ctx,
    tokenizer,
)

from dagtune.training import common as C
from dagtune.training import sft

TESTS = Path(__file__).resolve().parent
SHORT = {"optim": {"max_steps": 4}, "log_every": 1, "checkpoint_every": 100}


def _setup(tmp_path: Path, node: str, spec: sft.SFTSpec, **updates) -> C.NodeRun:
    return sft.setup(tiny_ctx(tmp_path, node, **{**SHORT, **updates}), spec)


def _collated(run: C.NodeRun, n: int) -> tuple[list[dict], dict]:
    rows = [run.trainer.train_dataset[i] for i in range(n)]
    return rows, run.trainer.data_collator(rows)


def _marker_end(ids: list[int], tok) -> int:
    """Index just after the last '<start_of_turn>model\\n' in ids."""
    marker = tok("<start_of_turn>model\n", add_special_tokens=False)["input_ids"]
    for j in range(len(ids) - len(marker), -1, -1):
        if ids[j : j + len(marker)] == marker:
            return j + len(marker)
    raise AssertionError("no model turn marker")


@pytest.mark.parametrize(
    ("node", "spec", "ends"),
    [
        # A tool call ends with <start_function_response> (FunctionGemma's template), a plain reply with
        # <end_of_turn>: both must be learned so generation stops.
        ("train_function_calling", sft.FUNCTION_CALLING, {"<start_function_response>", "<end_of_turn>"}),
        ("train_extractor", sft.EXTRACTOR, {"<end_of_turn>"}),
    ],
)
def test_completion_only_labels_token_by_token(tmp_path, node, spec, ends):
    run = _setup(tmp_path, node, spec)
    tok = run.loaded.tokenizer
    df = pd.read_parquet(prepared_data().dir / spec.task / "train.parquet")
    rows, batch = _collated(run, 32)
    seen_ends = set()
    for i, row in enumerate(rows):
        ids, labels, mask = (
            batch["input_ids"][i].tolist(),
            batch["labels"][i].tolist(),
            batch["attention_mask"][i],
        )
        n = int(mask.sum())
        assert ids[:n] == row["input_ids"]
        # One BOS only: the rendered prompt carries it and nothing is added on top.
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
        start = _marker_end(ids[:n], tok)
        assert all(x == -100 for x in labels[:start]), "prompt tokens (and the model marker) are masked"
        assert labels[start] == ids[start] != -100, "the first model-turn token is the first label"
        assert labels[start:n] == ids[start:n], "every completion token is a label"
        assert all(x == -100 for x in labels[n:]), "padding is masked"
        # The labelled tokens are exactly the completion text of the row.
        assert tok.decode(labels[start:n]) == df["completion"].iloc[i]
        # The turn's closing token is labelled (followed at most by the template's newline).
        tail = [t for t in tok.convert_ids_to_tokens(labels[start:n])[-2:] if t in ends]
        assert tail, tok.convert_ids_to_tokens(labels[start:n])[-3:]
        seen_ends.update(tail)
    assert seen_ends == ends


def test_tokenize_prompt_completion_truncates_and_drops():
    t = tokenizer("tiny-gemma3")
    prompts = ["<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"] * 2
    comps = ["hello there<end_of_turn>\n", "x" * 10 + "<end_of_turn>\n"]
    p_len = len(t(prompts[0], add_special_tokens=False)["input_ids"])
    rows, stats = sft.tokenize_prompt_completion(t, prompts, comps, max_length=p_len + 2)
    assert stats == {"truncated": 2, "dropped": 0}
    assert all(len(r["input_ids"]) == p_len + 2 and sum(r["completion_mask"]) == 2 for r in rows)
    rows, stats = sft.tokenize_prompt_completion(t, prompts, comps, max_length=p_len)
    assert rows == [] and stats == {"truncated": 2, "dropped": 2}


def test_lora_weights_change_and_base_weights_do_not(tmp_path):
    run = _setup(tmp_path, "train_function_calling", sft.FUNCTION_CALLING)
    model = run.trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora = {n for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    assert run.trainable_params == sum(before[n].numel() for n in lora)
    with progress_lines() as lines:
        run.trainer.train()
    assert progress_steps(lines, "train_function_calling") == [(i, 4, "") for i in range(1, 5)]
    for n, p in model.named_parameters():
        if n in lora:
            if "lora_B" in n:  # B starts at zero; A may stay close to its random init
                assert not torch.equal(p, before[n]), f"{n} did not change"
        else:
            assert torch.equal(p, before[n]), f"base weight {n} changed"


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_node_artifact_and_determinism(tmp_path):
    """Two runs with the same seed give identical adapters; the artifact holds what GGUF/eval need."""
    upd = {**SHORT, "optim": {"max_steps": 6}, "log_every": 2}
    m1 = sft.build_extractor(tiny_ctx(tmp_path / "a", "train_extractor", **upd))
    m2 = sft.build_extractor(tiny_ctx(tmp_path / "b", "train_extractor", **upd))
    a1, a2 = _adapter(tmp_path / "a" / "out"), _adapter(tmp_path / "b" / "out")
    assert a1.keys() == a2.keys() and all(torch.equal(a1[k], a2[k]) for k in a1)
    assert any(k.endswith("lora_B.weight") and a1[k].abs().sum() > 0 for k in a1)
    assert m1["val_loss"] == m2["val_loss"]

    out = tmp_path / "a" / "out"
    for k in (
        "backend", "device", "trainable_params", "total_params", "peak_memory_bytes", "tokens_per_second",
        "steps", "train_loss", "val_loss",
    ):  # fmt: skip
        assert m1[k] is not None, k
    assert m1["backend"] == "hf" and m1["device"] == "cpu" and m1["steps"] == 6
    assert 0 < m1["trainable_params"] < m1["total_params"]
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 4, 6]
    acc = [r["mean_token_accuracy"] for r in steps]  # TRL's completion-token accuracy, first and last
    assert all(0 <= a <= 1 for a in acc)
    assert (m1["train_token_accuracy_first"], m1["train_token_accuracy_last"]) == (acc[0], acc[-1])
    assert all(
        r["tokens_per_second"] > 0 and r["grad_norm"] is not None and "learning_rate" in r for r in steps
    )

    # merged/: safetensors + tokenizer + chat template, loadable by AutoModelForCausalLM, equal to base+adapter.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    merged_files = {p.name for p in (out / "merged").iterdir()}
    assert "model.safetensors" in merged_files and "tokenizer.json" in merged_files
    assert (
        "chat_template.jinja" in merged_files
        or "<start_of_turn>" in (out / "merged" / "tokenizer_config.json").read_text()
    )
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert (
        tok.chat_template and AutoTokenizer.from_pretrained(out / "merged").chat_template == tok.chat_template
    )
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    eos = GenerationConfig.from_pretrained(out / "merged").eos_token_id
    assert eot in (eos if isinstance(eos, list) else [eos])
    base = AutoModelForCausalLM.from_pretrained(m1["base_model_path"])
    peft = PeftModel.from_pretrained(base, out / "adapter")
    x = tok(
        ["<bos><start_of_turn>user\nExtract the equation: 3 and 4<end_of_turn>\n"],
        add_special_tokens=False,
        return_tensors="pt",
    )
    with torch.no_grad():
        torch.testing.assert_close(merged(**x).logits, peft(**x).logits, atol=1e-4, rtol=1e-4)


CHILD = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from dagtune.store import Artifact, ArtifactStore
    import test_training_common as H
    from dagtune.training import common as C, sft
    real = C.log_callback

    def slow_log_callback(train_log):  # >= 0.15 s a step, so the parent sees a checkpoint mid-run
        cb = real(train_log)
        end = cb.on_step_end
        cb.on_step_end = lambda *a, **k: (time.sleep(0.15), end(*a, **k))[1]
        return cb

    C.log_callback = slow_log_callback
    sec = H.tiny_section("train_extractor", **json.loads({updates!r}))
    ctx = H.make_ctx(Path({tmp!r}), "train_extractor", sec, Artifact("prepare_data", "t", {data!r}))
    ctx.store = ArtifactStore({store!r})
    m = sft.build_extractor(ctx)
    Path({tmp!r}, "metrics.json").write_text(json.dumps(m))
    """
)


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path):
    """SIGKILL the node after a checkpoint appears; the rerun continues from that step, not from zero."""
    updates = {"optim": {"max_steps": 24}, "log_every": 1, "checkpoint_every": 4}
    script = tmp_path / "child.py"
    store = shared_store()
    from dagtune.models import resolve_model

    resolve_model("tiny-gemma3", store)  # built once, before the child needs it
    script.write_text(
        CHILD.format(
            tests=str(TESTS),
            updates=json.dumps(updates),
            tmp=str(tmp_path / "run"),
            data=str(prepared_data().dir),
            store=str(store.root),
        )
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen(
        [sys.executable, str(script)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    ckpts = tmp_path / "run" / "scratch" / "checkpoints"
    deadline = time.time() + 300
    killed_after = None
    while time.time() < deadline and child.poll() is None:
        last = C.last_checkpoint(ckpts) if ckpts.is_dir() else None
        if last is not None:
            killed_after = C.checkpoint_step(last)
            child.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    child.wait(timeout=60)
    assert killed_after is not None, child.stderr.read().decode()[-3000:]
    assert child.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "metrics.json").exists()

    # The rerun (same scratch) resumes.
    m = sft.build_extractor(tiny_ctx(tmp_path / "run", "train_extractor", **updates))
    assert m["resumed_from_step"] >= killed_after >= 4
    assert m["steps"] == 24 and m["steps_this_run"] == 24 - m["resumed_from_step"] < 24
    log = [json.loads(x) for x in (tmp_path / "run" / "out" / "train_log.jsonl").read_text().splitlines()]
    resume = [r for r in log if r.get("event") == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == m["resumed_from_step"]
    at = log.index(resume[0])
    assert all(r["step"] <= m["resumed_from_step"] for r in log[:at])
    assert [r["step"] for r in log[at + 1 :] if "loss" in r][0] == m["resumed_from_step"] + 1
    # Every step logged exactly once across the two attempts.
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 25))


# ----------------------------------------------------------------------------------------------
# the unsloth path, against a stand-in module (the real one runs on the GPU machine)
# ----------------------------------------------------------------------------------------------
def _fake_unsloth(calls: dict) -> types.ModuleType:
    """Mimics the Unsloth API surface the node uses, on the plain HF/peft stack."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    class FastModel:
        @staticmethod
        def from_pretrained(model_name, max_seq_length, dtype, load_in_4bit, full_finetuning):
            calls["from_pretrained"] = dict(
                model_name=model_name,
                max_seq_length=max_seq_length,
                load_in_4bit=load_in_4bit,
                full_finetuning=full_finetuning,
            )
            return AutoModelForCausalLM.from_pretrained(model_name), AutoTokenizer.from_pretrained(model_name)

        @staticmethod
        def get_peft_model(
            model, r, target_modules, lora_alpha, lora_dropout, bias, use_gradient_checkpointing, random_state
        ):
            calls["get_peft_model"] = dict(r=r, target_modules=target_modules, lora_alpha=lora_alpha,
                                           use_gradient_checkpointing=use_gradient_checkpointing, random_state=random_state)  # fmt: skip
            torch.manual_seed(random_state)
            cfg = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules, bias=bias, task_type="CAUSAL_LM")  # fmt: skip
            model = get_peft_model(model, cfg)

            def save_pretrained_merged(save_directory, tokenizer, save_method):
                calls["save_pretrained_merged"] = save_method
                model.merge_and_unload().save_pretrained(save_directory)
                tokenizer.save_pretrained(save_directory)

            model.save_pretrained_merged = save_pretrained_merged
            return model

    def train_on_responses_only(trainer, instruction_part, response_part):
        """Unsloth's semantics: labels from after the response part to the next instruction part."""
        calls["train_on_responses_only"] = (instruction_part, response_part)
        tok = trainer.processing_class
        resp = tok(response_part, add_special_tokens=False)["input_ids"]

        def label(ex):
            ids = ex["input_ids"]
            starts = [j + len(resp) for j in range(len(ids)) if ids[j : j + len(resp)] == resp]
            k = starts[-1]
            return {"labels": [-100] * k + ids[k:]}

        trainer.train_dataset = trainer.train_dataset.map(label)
        if trainer.eval_dataset is not None:
            trainer.eval_dataset = trainer.eval_dataset.map(label)
        return trainer

    mod = types.ModuleType("unsloth")
    mod.FastModel = FastModel
    chat = types.ModuleType("unsloth.chat_templates")
    chat.train_on_responses_only = train_on_responses_only
    mod.chat_templates = chat
    return mod


@pytest.mark.slow
def test_unsloth_path_with_stand_in(tmp_path, monkeypatch):
    calls: dict = {}
    fake = _fake_unsloth(calls)
    monkeypatch.setitem(sys.modules, "unsloth", fake)
    monkeypatch.setitem(sys.modules, "unsloth.chat_templates", fake.chat_templates)
    from dagtune import runtime as R

    monkeypatch.setattr(R, "resolve_backend", lambda runtime, device=None, gpus=1: "unsloth")
    m = sft.build_function_calling(
        tiny_ctx(tmp_path, "train_function_calling", **{**SHORT, "optim": {"max_steps": 2}})
    )
    assert m["backend"] == "unsloth" and m["steps"] == 2
    assert calls["from_pretrained"]["full_finetuning"] is False
    assert calls["get_peft_model"]["r"] == 32 and calls["get_peft_model"]["lora_alpha"] == 64
    assert calls["get_peft_model"]["use_gradient_checkpointing"] is False  # the tiny profile turns it off
    assert calls["train_on_responses_only"] == ("<start_of_turn>user\n", "<start_of_turn>model\n")
    assert calls["save_pretrained_merged"] == "merged_16bit"
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "merged" / "model.safetensors").is_file()
