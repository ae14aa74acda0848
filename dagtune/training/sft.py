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
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagtune.training import common as C


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


def _sft_config(cfg: Any, *, backend: str, device: str, dtype: Any, total: int, warmup: int, out: str) -> Any:
    import torch
    from trl import SFTConfig

    o = cfg.optim
    cuda = device == "cuda"
    return SFTConfig(
        output_dir=out,
        per_device_train_batch_size=o.batch_size,
        per_device_eval_batch_size=o.batch_size,
        gradient_accumulation_steps=o.grad_accum,
        learning_rate=o.learning_rate,
        lr_scheduler_type=o.scheduler,
        warmup_steps=warmup,
        max_steps=total,
        weight_decay=o.weight_decay,
        max_grad_norm=o.max_grad_norm,
        optim=C.resolve_optimizer(o.optimizer, device),
        logging_steps=cfg.log_every,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.checkpoint_every,
        save_total_limit=2,
        eval_strategy="no",
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cuda and dtype == torch.bfloat16,
        fp16=cuda and dtype == torch.float16,
        use_cpu=not cuda,
        # Unsloth does its own ("unsloth") checkpointing, set up in get_peft_model.
        gradient_checkpointing=cfg.gradient_checkpointing and backend == "hf",
        report_to="none",
        max_length=cfg.model.max_seq_length,
        completion_only_loss=backend == "hf",
        packing=cfg.packing,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


@dataclass
class SFTRun:
    """Everything ``setup`` prepared: the trainer is ready to ``train()``."""

    trainer: Any
    loaded: C.Loaded
    backend: str
    device: str
    train_log: C.TrainLog
    ckpt_dir: Path
    n_train: int
    n_val: int
    stats: dict[str, int]
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    trainable_params: int
    total_params: int


def train_sft(ctx: Any, spec: SFTSpec) -> dict[str, Any]:
    device = C.resolve_device(ctx.runtime)
    C.check_device(device)
    with C.cpu_threads(ctx.section.cpu_threads, device):
        t0 = time.time()
        run = setup(ctx, spec, device)
        metrics = train(ctx, run)
        metrics.update(save(ctx, spec, run))
        metrics["node_seconds"] = round(time.time() - t0, 3)
        metrics.update(C.peak_memory(device))
        return metrics


def setup(ctx: Any, spec: SFTSpec, device: str) -> SFTRun:
    """Backend, base model + LoRA, tokenized data with the completion mask, the SFTTrainer."""
    cfg = ctx.section
    backend = C.resolve_backend(ctx.runtime, device)
    if backend == "unsloth":
        import unsloth  # noqa: F401  (before trl/transformers are used: it patches them)
    from datasets import Dataset
    from trl import SFTTrainer

    C.reset_peak_memory(device)
    data_dir = ctx.upstream["prepare_data"].dir
    train_df = C.read_split(data_dir, spec.task, "train")
    val_df = C.read_split(data_dir, spec.task, "validation")
    loaded = C.load_lora_model(cfg, backend, device, ctx.store, unsloth_loader=spec.unsloth_loader)
    model, tokenizer = loaded.model, loaded.tokenizer
    C.ensure_pad_token(getattr(tokenizer, "tokenizer", tokenizer))
    trainable, total_params = C.count_parameters(model)

    max_len = cfg.model.max_seq_length
    train_rows, train_stats = tokenize_prompt_completion(
        tokenizer, train_df["prompt"], train_df["completion"], max_len
    )
    val_rows, val_stats = tokenize_prompt_completion(
        tokenizer, val_df["prompt"], val_df["completion"], max_len
    )
    if backend == "unsloth":  # train_on_responses_only builds the labels from the turn markers
        train_rows = [{"input_ids": r["input_ids"]} for r in train_rows]
        val_rows = [{"input_ids": r["input_ids"]} for r in val_rows]
    per_epoch, total = C.plan_steps(len(train_rows), cfg.optim)
    warmup = C.warmup_steps(cfg.optim, total)
    ckpt_dir = ctx.scratch / "checkpoints"
    train_log = C.TrainLog(ctx.scratch / C.TRAIN_LOG)
    args = _sft_config(
        cfg, backend=backend, device=device, dtype=loaded.dtype, total=total, warmup=warmup, out=str(ckpt_dir)
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(val_rows) if val_rows else None,
        processing_class=tokenizer,
        callbacks=[C.log_callback(train_log)],
    )
    if backend == "unsloth":
        from unsloth.chat_templates import train_on_responses_only

        trainer = train_on_responses_only(
            trainer, instruction_part=spec.instruction_part, response_part=spec.response_part
        )
    stats = {
        "train_truncated": train_stats["truncated"],
        "train_dropped": train_stats["dropped"],
        "val_truncated": val_stats["truncated"],
    }
    return SFTRun(
        trainer,
        loaded,
        backend,
        device,
        train_log,
        ckpt_dir,
        len(train_rows),
        len(val_rows),
        stats,
        per_epoch,
        total,
        warmup,
        trainable,
        total_params,
    )


def train(ctx: Any, run: SFTRun) -> dict[str, Any]:
    """Train, resuming from the newest complete checkpoint in ctx.scratch; then the validation loss."""
    resume = C.last_checkpoint(run.ckpt_dir, remove_incomplete=True)
    resumed_from = C.checkpoint_step(resume) if resume else 0
    ctx.log.info(
        "%s: %d examples, %d steps (%d/epoch, warmup %d), backend %s on %s%s",
        ctx.name,
        run.n_train,
        run.total_steps,
        run.steps_per_epoch,
        run.warmup_steps,
        run.backend,
        run.device,
        f", resuming from step {resumed_from}" if resume else "",
    )
    cpu0 = time.process_time()
    result = run.trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    train_cpu = time.process_time() - cpu0
    val_loss = run.trainer.evaluate()["eval_loss"] if run.n_val else None
    steps = int(result.global_step)
    log = run.train_log
    acc = [r["mean_token_accuracy"] for r in log.records if r.get("mean_token_accuracy") is not None]
    return {
        **C.library_backend_info(run.backend),
        "device": run.device,
        "dtype": C.dtype_name(run.loaded.dtype),
        "load_in_4bit": run.loaded.quantized,
        "base_model": ctx.section.model.name,
        "base_model_path": run.loaded.model_path,
        "target_modules": run.loaded.target_modules,
        "trainable_params": run.trainable_params,
        "total_params": run.total_params,
        "train_examples": run.n_train,
        "val_examples": run.n_val,
        **run.stats,
        "steps": steps,
        "steps_per_epoch": run.steps_per_epoch,
        "warmup_steps": run.warmup_steps,
        "resumed_from_step": resumed_from,
        "steps_this_run": steps - resumed_from,
        "train_loss": float(result.training_loss),
        "train_loss_first": log.first_loss,
        "train_loss_last": log.last_loss,
        "val_loss": float(val_loss) if val_loss is not None else None,
        # Next-token accuracy on the completion tokens (TRL's mean_token_accuracy), first/last log.
        "train_token_accuracy_first": acc[0] if acc else None,
        "train_token_accuracy_last": acc[-1] if acc else None,
        "tokens_per_second": log.tokens_per_second,
        "train_seconds": round(float(result.metrics.get("train_runtime", 0.0)), 3),
        "train_cpu_seconds": round(train_cpu, 3),
    }


def save(ctx: Any, spec: SFTSpec, run: SFTRun) -> dict[str, Any]:
    """adapter/, tokenizer/, merged/ (16-bit for GGUF; fp32 on CPU), train_log.jsonl."""
    cfg, out, tokenizer = ctx.section, ctx.out, run.loaded.tokenizer
    adapter_dir = out / "adapter"
    run.trainer.model.save_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(str(out / "tokenizer"))
    run.train_log.copy_to(out / C.TRAIN_LOG)
    stop_ids = C.stop_token_ids(getattr(tokenizer, "tokenizer", tokenizer), spec.stop_tokens)
    merged_dtype = C.resolve_merged_dtype(cfg, run.loaded.dtype)
    if cfg.save_merged:
        if run.backend == "unsloth":
            C.save_merged_unsloth(run.trainer.model, tokenizer, out / "merged", stop_ids)
        else:
            run.trainer = run.loaded.model = None  # drop the training copy before loading the base again
            C.free_memory()
            C.save_merged_hf(
                run.loaded.model_path,
                adapter_dir,
                out / "merged",
                merged_dtype,
                tokenizer,
                stop_ids,
                run.device,
            )
    return {
        "merged_dtype": C.dtype_name(merged_dtype) if cfg.save_merged else None,
        "stop_token_ids": stop_ids,
    }


# ----------------------------------------------------------------------------------------------
# node entry points
# ----------------------------------------------------------------------------------------------
def build_function_calling(ctx: Any) -> dict[str, Any]:
    return train_sft(ctx, FUNCTION_CALLING)


def build_extractor(ctx: Any) -> dict[str, Any]:
    return train_sft(ctx, EXTRACTOR)


def key_inputs_function_calling(cfg: Any) -> dict[str, Any]:
    return C.key_inputs_for(cfg.train_function_calling, cfg.runtime, cfg.artifact_root)


def key_inputs_extractor(cfg: Any) -> dict[str, Any]:
    return C.key_inputs_for(cfg.train_extractor, cfg.runtime, cfg.artifact_root)
