"""Supervised LoRA fine-tuning of the two generative models: FunctionGemma (function calling) and
Gemma-3 (equation extraction). One trainer function, two node entry points; the hyperparameters come
from the node's config section (pipeline_config.yaml holds each model's reference recipe).

setup: resolve backend/device, load base + LoRA, tokenize prompt/completion rows (loss mask on the
completion only). train: TRL ``SFTTrainer`` (Unsloth's patched one on the unsloth backend), resuming
from the newest complete checkpoint in ``ctx.scratch``. save: adapter/, tokenizer/, merged/ (16-bit
for GGUF), train_log.jsonl; the metrics go into the manifest.

Loss masking. The prepare_data rows are ``prompt`` (rendered chat up to and including the generation
prompt ``<start_of_turn>model\\n``, starting with ``<bos>``) and ``completion`` (the model turn up to and
including ``<end_of_turn>``). On the hf backend they are tokenized here exactly like TRL's
prompt-completion path (``add_special_tokens=False``: the rendered text already holds ``<bos>``) into
``input_ids`` + ``completion_mask``; SFTTrainer (``completion_only_loss=True``) turns the mask into
labels: prompt tokens are -100, the completion and its end-of-turn token are learned, so generation
stops. Tokenizing here rather than handing TRL the text keeps TRL from appending the tokenizer's EOS to
every completion (it does for non-conversational text) and fixes the token count before the trainer
exists (total steps and warmup capping). On the unsloth backend the same ``input_ids`` go through
``unsloth.chat_templates.train_on_responses_only`` with Gemma's turn markers, Unsloth's documented way.
Unpacked (``packing: false``, the reference recipe) batches are padded to their longest row
(``padding_free=False`` is set explicitly: Unsloth would otherwise turn padding-free batching on by itself).

Packing (``packing: true``): ``dagtune.data.packing`` lays each step's examples into padding-free rows
(position ids restart per example); the Trainer's ``num_items_in_batch`` keeps the step's loss the mean
over its completion tokens, packed or not (tests/test_training_packing.py checks loss and gradients).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagtune.data.packing import PackedCollator, pack_plan, packed_row, with_labels
from dagtune.data.split import read_split
from dagtune.runtime import Loaded, Runtime, count_parameters, key_inputs_for, stop_token_ids, unsloth_module
from dagtune.training import common as C
from dagtune.training import ddp


@dataclass(frozen=True)
class SFTSpec:
    """What differs between the generative models beyond the config section."""

    task: str  # prepare_data sub-directory
    instruction_part: str = "<start_of_turn>user\n"
    response_part: str = "<start_of_turn>model\n"
    stop_tokens: tuple[str, ...] = ("<end_of_turn>",)
    unsloth_loader: str = "FastModel"  # Gemma 3 goes through FastModel in Unsloth


# FunctionGemma closes a tool call with <start_function_response> (the app answers next), a plain reply
# with <end_of_turn>: generation must stop at either.
FUNCTION_CALLING = SFTSpec(
    task="function_calling", stop_tokens=("<end_of_turn>", "<start_function_response>")
)
EXTRACTOR = SFTSpec(task="extractor")


def tokenize_prompt_completion(
    tokenizer: Any, prompts: list[str], completions: list[str], max_length: int
) -> tuple[list[dict[str, list[int]]], dict[str, int]]:
    """``input_ids`` = prompt ids + completion ids (no special tokens added), ``completion_mask`` 1 on the
    completion. Rows longer than ``max_length`` are cut at the end (``truncation_mode='keep_start'``);
    rows with no completion token left are dropped (they carry no loss)."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    p_ids = tok(list(prompts), add_special_tokens=False)["input_ids"]
    c_ids = tok(list(completions), add_special_tokens=False)["input_ids"]
    rows, truncated, dropped = [], 0, 0
    for p, c in zip(p_ids, c_ids, strict=True):
        ids = (p + c)[:max_length]
        mask = ([0] * len(p) + [1] * len(c))[:max_length]
        if len(p) + len(c) > max_length:
            truncated += 1
        if not any(mask):
            dropped += 1
            continue
        rows.append({"input_ids": ids, "completion_mask": mask})
    return rows, {"truncated": truncated, "dropped": dropped}


def enable_unsloth_packing(model: Any) -> dict[str, bool]:
    """Unsloth's packed-attention shim (SDPA on a block-causal mask + packed_seq_lengths -> torch's varlen
    flash kernel) and its allowance for rows longer than max_seq_length; both are what Unsloth itself
    switches on for TRL packing, called here because the node brings its own collator."""
    done = {}
    for key, sub, fn, args in (("varlen_attention", "utils.hf_packed_attention", "enable_hf_packed_attention", ()),
                               ("allow_overlength", "utils.packing", "mark_allow_overlength", (model,))):  # fmt: skip
        try:
            getattr(unsloth_module(sub), fn)(*args)
            done[key] = True
        except Exception as e:  # pragma: no cover - GPU only
            C.log.warning("unsloth %s not enabled (%s): SDPA runs on the dense block mask", fn, e)
            done[key] = False
    return done


def _datasets(cfg: Any, rt: Runtime, loaded: Loaded, train_rows: list, val_rows: list, total: int) -> tuple:
    """(train, eval datasets, collator or None, micro-batches per step over all ranks (None: the config's),
    stats) of the packed or unpacked path."""
    from datasets import Dataset

    if not cfg.packing:
        # unsloth: train_on_responses_only builds the labels from the turn markers
        keep = (lambda r: {"input_ids": r["input_ids"]}) if rt.backend == "unsloth" else (lambda r: r)
        train, val = ([keep(r) for r in rows] for rows in (train_rows, val_rows))
        val_ds = Dataset.from_list(val) if val else None
        return Dataset.from_list(train), val_ds, None, None, {"packing": False}
    return _packed_datasets(cfg, rt, loaded, train_rows, val_rows, total)


def _packed_datasets(
    cfg: Any, rt: Runtime, loaded: Loaded, train_rows: list, val_rows: list, total: int
) -> tuple:
    from datasets import Dataset

    o, tok = cfg.optim, getattr(loaded.tokenizer, "tokenizer", loaded.tokenizer)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    lengths = [len(r["input_ids"]) for r in train_rows]
    micro, accum = pack_plan(lengths, o.batch_size * o.grad_accum, cfg.packed_tokens_per_batch, cfg.seed,
                             total, multiple_of=ddp.world().world_size)  # fmt: skip
    labelled = [with_labels(r) for r in train_rows]
    train_ds = Dataset.from_list([packed_row(labelled, m, pad_id) for m in micro])
    val_ds = Dataset.from_list([with_labels(r) for r in val_rows]) if val_rows else None
    tokens = [sum(lengths[i] for i in m) for m in micro if m]
    stats: dict[str, Any] = {"packing": True, "packed_micro_batches_per_step": accum,
                             "packed_tokens_per_micro_batch_mean": round(sum(tokens) / len(tokens), 1),
                             "packed_tokens_per_micro_batch_max": max(tokens)}  # fmt: skip
    if rt.backend == "unsloth":
        stats.update({f"packing_{k}": v for k, v in enable_unsloth_packing(loaded.model).items()})
    return train_ds, val_ds, PackedCollator(pad_id, packed_seq_lengths=rt.backend == "unsloth"), accum, stats


@dataclass
class Built:
    trainer: Any
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    stats: dict[str, Any]


def build_trainer(cfg: Any, spec: SFTSpec, rt: Runtime, loaded: Loaded, train_rows: list, val_rows: list,
                  ckpt_dir: Path, callbacks: list[Any]) -> Built:  # fmt: skip
    """The node's SFTTrainer over tokenized rows (``input_ids`` + ``completion_mask``), packed or not:
    shared by ``setup`` and the benchmark hooks, so a benchmark times exactly the node's trainer."""
    from trl import SFTConfig, SFTTrainer

    per_epoch, total = C.plan_steps(len(train_rows), cfg.optim)
    warmup = C.warmup_steps(cfg.optim, total)
    train_ds, val_ds, collator, accum, stats = _datasets(cfg, rt, loaded, train_rows, val_rows, total)
    # Packed: one pre-packed row per micro-batch, read in plan order (accelerate deals them out to the
    # ranks round-robin, an equal share of each step to each); TRL must not re-tokenize it.
    packed = {"train_sampling_strategy": "sequential", "dataset_kwargs": {"skip_prepare_dataset": True},
              "remove_unused_columns": False, "per_device_train_batch_size": 1,
              "gradient_accumulation_steps": accum // ddp.world().world_size} if cfg.packing else {}  # fmt: skip
    args = C.training_args(
        cfg, rt, ckpt_dir, total, warmup, cls=SFTConfig,
        # Unsloth does its own ("unsloth") checkpointing, set up in get_peft_model.
        gradient_checkpointing=cfg.gradient_checkpointing and rt.backend == "hf",
        max_length=cfg.model.max_seq_length, completion_only_loss=rt.backend == "hf" and not cfg.packing,
        packing=False,  # TRL's own packing changes the examples per step: the node packs itself
        padding_free=False,  # unpacked = padded to the longest (the reference recipe)
        **packed,
    )  # fmt: skip
    kwargs: dict[str, Any] = {"data_collator": collator} if collator is not None else {}
    trainer = SFTTrainer(model=loaded.model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                         processing_class=loaded.tokenizer, callbacks=callbacks, **kwargs)  # fmt: skip
    if rt.backend == "unsloth" and not cfg.packing:
        trainer = unsloth_module("chat_templates").train_on_responses_only(
            trainer, instruction_part=spec.instruction_part, response_part=spec.response_part
        )
    return Built(trainer, per_epoch, total, warmup, stats)


def setup(ctx: Any, spec: SFTSpec, rt: Runtime | None = None) -> C.NodeRun:
    """Base model + LoRA, tokenized data with the completion mask, the SFTTrainer."""
    cfg = ctx.section
    rt = rt or C.decide_runtime(ctx)
    rt.reset_peak_memory()
    data_dir = ctx.upstream["prepare_data"].dir
    train_df, val_df = (read_split(data_dir, spec.task, s) for s in ("train", "validation"))
    timer = C.StepTimer(rt.device)
    loaded, train_log = C.load(ctx, rt, timer, loader=spec.unsloth_loader)
    trainable, total_params = count_parameters(loaded.model)
    max_len = cfg.model.max_seq_length
    with timer.phase("prepare_s"):
        (train_rows, train_stats), (val_rows, val_stats) = (
            tokenize_prompt_completion(loaded.tokenizer, df["prompt"], df["completion"], max_len)
            for df in (train_df, val_df)
        )
        ckpt_dir = ctx.scratch / "checkpoints"
        callbacks = C.node_callbacks(ctx.name, train_log, timer)
        built = build_trainer(cfg, spec, rt, loaded, train_rows, val_rows, ckpt_dir, callbacks)
    stats = {"train_truncated": train_stats["truncated"], "train_dropped": train_stats["dropped"],
             "val_truncated": val_stats["truncated"], **built.stats}  # fmt: skip
    return C.NodeRun(rt, loaded, built.trainer, train_log, timer, ckpt_dir, len(train_rows), len(val_rows),
                     built.steps_per_epoch, built.total_steps, built.warmup_steps, stats, trainable, total_params)  # fmt: skip


def train(ctx: Any, run: C.NodeRun) -> dict[str, Any]:
    """Train (resuming), then the validation loss and TRL's completion-token accuracy, first/last log."""
    m = C.run_training(ctx, run)
    with run.timer.phase("validate_s"):
        m["val_loss"] = float(run.trainer.evaluate()["eval_loss"]) if run.n_val else None
    first, last = run.train_log.first_last("mean_token_accuracy")
    m["train_token_accuracy_first"], m["train_token_accuracy_last"] = first, last
    return m


def train_sft(ctx: Any, spec: SFTSpec) -> dict[str, Any]:
    t0 = time.time()
    rt = C.decide_runtime(ctx)
    with rt.threads(ctx.section.cpu_threads):
        run = setup(ctx, spec, rt)
        metrics = train(ctx, run)
        stop_ids = stop_token_ids(run.loaded.tokenizer, spec.stop_tokens)
        if ddp.is_main():  # under torchrun the other ranks only trained
            metrics.update(C.save_adapter(ctx, run, stop_ids), stop_token_ids=stop_ids)
        ddp.wait_for_main()
        return {**metrics, **C.node_metrics(run, t0)}


# ----------------------------------------------------------------------------------------------
# node entry points
# ----------------------------------------------------------------------------------------------
def build_function_calling(ctx: Any) -> dict[str, Any]:
    return train_sft(ctx, FUNCTION_CALLING)


def build_extractor(ctx: Any) -> dict[str, Any]:
    return train_sft(ctx, EXTRACTOR)


def key_inputs_function_calling(cfg: Any) -> dict[str, Any]:
    return key_inputs_for(cfg.train_function_calling, cfg.runtime, cfg.artifact_root)


def key_inputs_extractor(cfg: Any) -> dict[str, Any]:
    return key_inputs_for(cfg.train_extractor, cfg.runtime, cfg.artifact_root)
