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

Packing (``packing: true``). Each optimizer step takes the same ``batch_size * grad_accum`` examples as the
unpacked recipe (consecutive groups of one seeded shuffle per epoch, see ``pack_plan``); the group's
examples are laid end to end, padding-free, into one row per micro-batch, split over as few micro-batches
as keep each under ``packed_tokens_per_batch`` tokens (balanced by tokens; that count is the gradient
accumulation of the run). ``position_ids`` restart at 0 for every example, so attention never crosses an
example: transformers builds a block-diagonal causal mask from the position ids (SDPA/eager, also on CPU).
On the unsloth backend the batch also carries ``packed_seq_lengths`` for Unsloth's packed-attention shim
(torch's varlen flash kernel), which wraps transformers' "sdpa" entry; Unsloth's rewritten Gemma-3
attention calls SDPA directly and never reaches it (its counters stayed 0 in the H200 epoch runs), so
there the block mask is what isolates examples -- checked by tests/test_training_gpu.py's
packed == unpacked test. Labels come from the completion mask on both backends (the first
token of every example is never a label, so no example is learned from its predecessor's last token).
Loss weighting: HF ``Trainer`` counts the label tokens of all micro-batches of a step
(``num_items_in_batch``) and TRL's loss divides each micro-batch's summed token loss by that count, so
the step's loss is the mean over the step's completion tokens whatever the micro-batch split is: packing
changes neither which examples share a step nor how much each weighs (a token-weighted mean, as
unpacked). tests/test_training_sft.py checks one step's loss and gradients packed vs unpacked.
"""

from __future__ import annotations

import math
import random
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


# ----------------------------------------------------------------------------------------------
# packing
# ----------------------------------------------------------------------------------------------
def step_groups(n: int, examples_per_step: int, seed: int, total_steps: int) -> list[list[int]]:
    """The examples of each optimizer step: consecutive groups of ``examples_per_step`` of one seeded
    shuffle per epoch (a step never spans epochs; an epoch's last step may be smaller), as many steps as
    the run has. A function of (n, seed) only, so a resumed run sees the same groups."""
    groups: list[list[int]] = []
    epoch = 0
    while len(groups) < total_steps:
        perm = list(range(n))
        random.Random(seed * 1000 + epoch).shuffle(perm)
        groups.extend(perm[i : i + examples_per_step] for i in range(0, n, examples_per_step))
        epoch += 1
    return groups[:total_steps]


def split_by_tokens(group: list[int], lengths: list[int], k: int) -> list[list[int]]:
    """``group`` over ``k`` micro-batches, longest example first into the emptiest one (LPT); each
    micro-batch keeps the group's order. Fewer examples than ``k`` leaves empty micro-batches."""
    bins: list[list[int]] = [[] for _ in range(k)]
    load = [0] * k
    order = {ix: j for j, ix in enumerate(group)}
    for ix in sorted(group, key=lambda i: (-lengths[i], order[i])):
        b = min(range(k), key=lambda j: (load[j], j))
        bins[b].append(ix)
        load[b] += lengths[ix]
    return [sorted(b, key=order.__getitem__) for b in bins]


def pack_plan(
    lengths: list[int], examples_per_step: int, token_cap: int, seed: int, total_steps: int
) -> tuple[list[list[int]], int]:
    """(micro-batches in training order, micro-batches per step). Every step has the same count (the
    Trainer's gradient accumulation): the smallest that keeps every micro-batch of every step within
    ``token_cap`` tokens (raised to the longest example if that is longer)."""
    cap = max(token_cap, max(lengths))
    groups = step_groups(len(lengths), examples_per_step, seed, total_steps)

    def fits(g: list[int], k: int) -> bool:
        return max(sum(lengths[i] for i in b) for b in split_by_tokens(g, lengths, k)) <= cap

    accum = 1
    for g in groups:
        k = max(accum, math.ceil(sum(lengths[i] for i in g) / cap))
        while k < len(g) and not fits(g, k):
            k += 1
        accum = max(accum, k)
    micro = [b for g in groups for b in split_by_tokens(g, lengths, accum)]
    return micro, accum


def with_labels(row: dict[str, list[int]]) -> dict[str, list[int]]:
    """input_ids + labels (-100 off the completion)."""
    ids = row["input_ids"]
    return {
        "input_ids": ids,
        "labels": [t if m else -100 for t, m in zip(ids, row["completion_mask"], strict=True)],
    }


def packed_row(rows: list[dict[str, list[int]]], idxs: list[int], pad_id: int) -> dict[str, list[int]]:
    """One padding-free micro-batch: the examples end to end, ``seq_lengths`` for the position ids. The
    first token of each example is never a label (it would be predicted from the previous example). An
    empty micro-batch (a last step with fewer examples than micro-batches) is one pad token, no label."""
    if not idxs:
        return {"input_ids": [pad_id], "labels": [-100], "seq_lengths": [1]}
    ids: list[int] = []
    labels: list[int] = []
    lens: list[int] = []
    for i in idxs:
        r = rows[i]
        ids += r["input_ids"]
        labels += [-100] + r["labels"][1:]
        lens.append(len(r["input_ids"]))
    return {"input_ids": ids, "labels": labels, "seq_lengths": lens}


class PackedCollator:
    """Training items (``seq_lengths`` present) become one padding-free row: input_ids, labels and
    position_ids of shape (1, T), no attention mask (+ ``packed_seq_lengths`` for Unsloth's varlen
    attention). Evaluation items (plain examples) are padded on the right to the longest, as unpacked."""

    def __init__(self, pad_id: int, packed_seq_lengths: bool):
        self.pad_id = pad_id
        self.packed_seq_lengths = packed_seq_lengths

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        if "seq_lengths" in items[0]:
            ids = [t for it in items for t in it["input_ids"]]
            labels = [t for it in items for t in it["labels"]]
            lens = [n for it in items for n in it["seq_lengths"]]
            batch = {
                "input_ids": torch.tensor([ids], dtype=torch.long),
                "labels": torch.tensor([labels], dtype=torch.long),
                "position_ids": torch.tensor([[p for n in lens for p in range(n)]], dtype=torch.long),
            }
            if self.packed_seq_lengths:
                batch["packed_seq_lengths"] = torch.tensor(lens, dtype=torch.int32)
            return batch
        width = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            ids[i, :n] = torch.tensor(it["input_ids"])
            labels[i, :n] = torch.tensor(it["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def enable_unsloth_packing(model: Any) -> dict[str, bool]:
    """Unsloth's packed-attention shim (SDPA on a block-causal mask + packed_seq_lengths -> torch's varlen
    flash kernel) and its allowance for rows longer than max_seq_length; both are what Unsloth itself
    switches on for TRL packing, called here because the node brings its own collator."""
    done = {"varlen_attention": False, "allow_overlength": False}
    try:
        from unsloth.utils.hf_packed_attention import enable_hf_packed_attention

        enable_hf_packed_attention()
        done["varlen_attention"] = True
    except Exception as e:  # pragma: no cover - GPU only
        C.log.warning("unsloth packed attention not enabled (%s): SDPA runs on the dense block mask", e)
    try:
        from unsloth.utils.packing import mark_allow_overlength

        mark_allow_overlength(model)
        done["allow_overlength"] = True
    except Exception as e:  # pragma: no cover - GPU only
        C.log.warning("unsloth mark_allow_overlength failed (%s)", e)
    return done


def _sft_config(
    cfg: Any,
    *,
    backend: str,
    device: str,
    dtype: Any,
    total: int,
    warmup: int,
    out: str,
    packed_accum: int | None = None,
) -> Any:
    import torch
    from trl import SFTConfig

    o = cfg.optim
    cuda = device == "cuda"
    packed = packed_accum is not None
    extra: dict[str, Any] = {}
    if packed:
        # One pre-packed row per micro-batch, read in plan order; TRL must not re-tokenize/truncate it.
        extra = {
            "train_sampling_strategy": "sequential",
            "dataset_kwargs": {"skip_prepare_dataset": True},
            "remove_unused_columns": False,
        }
    return SFTConfig(
        output_dir=out,
        per_device_train_batch_size=1 if packed else o.batch_size,
        per_device_eval_batch_size=o.batch_size,
        gradient_accumulation_steps=packed_accum if packed else o.grad_accum,
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
        completion_only_loss=backend == "hf" and not packed,
        packing=False,  # TRL's own packing changes the examples per step: the node packs itself
        padding_free=False,  # unpacked = padded to the longest (the reference recipe)
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        disable_tqdm=False,
        **extra,
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
    stats: dict[str, Any]
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


@dataclass
class Built:
    trainer: Any
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    stats: dict[str, Any]


def build_trainer(
    cfg: Any,
    spec: SFTSpec,
    backend: str,
    device: str,
    loaded: C.Loaded,
    train_rows: list[dict[str, list[int]]],
    val_rows: list[dict[str, list[int]]],
    ckpt_dir: Path,
    callbacks: list[Any],
) -> Built:
    """The node's SFTTrainer over tokenized rows (``input_ids`` + ``completion_mask``), packed or not:
    shared by ``setup`` and the benchmark hooks, so a benchmark times exactly the node's trainer."""
    from datasets import Dataset
    from trl import SFTTrainer

    model, tokenizer = loaded.model, loaded.tokenizer
    per_epoch, total = C.plan_steps(len(train_rows), cfg.optim)
    warmup = C.warmup_steps(cfg.optim, total)
    stats: dict[str, Any] = {}
    collator = None
    packed_accum = None
    if cfg.packing:
        o = cfg.optim
        tok = getattr(tokenizer, "tokenizer", tokenizer)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        lengths = [len(r["input_ids"]) for r in train_rows]
        micro, packed_accum = pack_plan(
            lengths, o.batch_size * o.grad_accum, cfg.packed_tokens_per_batch, cfg.seed, total
        )
        labelled = [with_labels(r) for r in train_rows]
        train_ds = Dataset.from_list([packed_row(labelled, m, pad_id) for m in micro])
        val_ds = Dataset.from_list([with_labels(r) for r in val_rows]) if val_rows else None
        collator = PackedCollator(pad_id, packed_seq_lengths=backend == "unsloth")
        if backend == "unsloth":
            stats.update({f"packing_{k}": v for k, v in enable_unsloth_packing(model).items()})
        tokens = [sum(lengths[i] for i in m) for m in micro if m]
        stats.update(
            {
                "packing": True,
                "packed_micro_batches_per_step": packed_accum,
                "packed_tokens_per_micro_batch_mean": round(sum(tokens) / len(tokens), 1),
                "packed_tokens_per_micro_batch_max": max(tokens),
            }
        )
    else:
        if backend == "unsloth":  # train_on_responses_only builds the labels from the turn markers
            train_ds = Dataset.from_list([{"input_ids": r["input_ids"]} for r in train_rows])
            val_ds = (
                Dataset.from_list([{"input_ids": r["input_ids"]} for r in val_rows]) if val_rows else None
            )
        else:
            train_ds = Dataset.from_list(train_rows)
            val_ds = Dataset.from_list(val_rows) if val_rows else None
        stats["packing"] = False
    args = _sft_config(
        cfg,
        backend=backend,
        device=device,
        dtype=loaded.dtype,
        total=total,
        warmup=warmup,
        out=str(ckpt_dir),
        packed_accum=packed_accum,
    )
    kwargs: dict[str, Any] = {"data_collator": collator} if collator is not None else {}
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=tokenizer,
        callbacks=callbacks,
        **kwargs,
    )
    if backend == "unsloth" and not cfg.packing:
        from unsloth.chat_templates import train_on_responses_only

        trainer = train_on_responses_only(
            trainer, instruction_part=spec.instruction_part, response_part=spec.response_part
        )
    return Built(trainer, per_epoch, total, warmup, stats)


def setup(ctx: Any, spec: SFTSpec, device: str) -> SFTRun:
    """Backend, base model + LoRA, tokenized data with the completion mask, the SFTTrainer."""
    cfg = ctx.section
    backend = C.resolve_backend(ctx.runtime, device)
    if backend == "unsloth":
        import unsloth  # noqa: F401  (before trl/transformers are used: it patches them)

    C.reset_peak_memory(device)
    data_dir = ctx.upstream["prepare_data"].dir
    train_df = C.read_split(data_dir, spec.task, "train")
    val_df = C.read_split(data_dir, spec.task, "validation")
    loaded = C.load_lora_model(cfg, backend, device, ctx.store, unsloth_loader=spec.unsloth_loader)
    tokenizer = loaded.tokenizer
    C.ensure_pad_token(getattr(tokenizer, "tokenizer", tokenizer))
    trainable, total_params = C.count_parameters(loaded.model)

    max_len = cfg.model.max_seq_length
    train_rows, train_stats = tokenize_prompt_completion(
        tokenizer, train_df["prompt"], train_df["completion"], max_len
    )
    val_rows, val_stats = tokenize_prompt_completion(
        tokenizer, val_df["prompt"], val_df["completion"], max_len
    )
    ckpt_dir = ctx.scratch / "checkpoints"
    train_log = C.TrainLog(ctx.scratch / C.TRAIN_LOG)
    built = build_trainer(
        cfg, spec, backend, device, loaded, train_rows, val_rows, ckpt_dir, [C.log_callback(train_log)]
    )
    stats = {
        "train_truncated": train_stats["truncated"],
        "train_dropped": train_stats["dropped"],
        "val_truncated": val_stats["truncated"],
        **built.stats,
    }
    return SFTRun(
        built.trainer,
        loaded,
        backend,
        device,
        train_log,
        ckpt_dir,
        len(train_rows),
        len(val_rows),
        stats,
        built.steps_per_epoch,
        built.total_steps,
        built.warmup_steps,
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


# ----------------------------------------------------------------------------------------------
# benchmark hooks (benchmarks/train_throughput.py, benchmarks/epoch_real_lengths.py): the node's own
# loading (C.load_lora_model), trainer (build_trainer: SFTTrainer/Unsloth's, the collation of the
# configured path, train_on_responses_only on unpacked unsloth) and logging (C.log_callback), on rows
# given as token ids instead of the prepare_data parquet files.
# ----------------------------------------------------------------------------------------------
def bench_section(
    model_dir: str,
    *,
    batch_size: int,
    grad_accum: int,
    max_seq_length: int,
    gradient_checkpointing: bool,
    load_in_4bit: bool,
    lora_r: int,
    lora_alpha: int,
    lora_dropout: float,
    target_modules: list[str],
    packing: bool = False,
    packed_tokens_per_batch: int = 16384,
    max_steps: int | None = None,
    seed: int = 3407,
    node: str = "train_function_calling",
) -> Any:
    """A training section like pipeline_config.yaml's, for a local model directory. No checkpoint is
    written during a benchmark (checkpoint_every past the run); logging as usual (every 10 steps)."""
    from dagtune import config as K

    cls = K.TrainFunctionCallingConfig if node == "train_function_calling" else K.TrainExtractorConfig
    return cls.model_validate(
        {
            "model": {"name": str(model_dir), "load_in_4bit": load_in_4bit, "max_seq_length": max_seq_length},
            "lora": {
                "r": lora_r,
                "alpha": lora_alpha,
                "dropout": lora_dropout,
                "target_modules": target_modules,
            },
            "optim": {
                "learning_rate": 1e-4,
                "scheduler": "cosine",
                "warmup_steps": 0,
                "epochs": 1,
                "max_steps": max_steps,
                "batch_size": batch_size,
                "grad_accum": grad_accum,
            },
            "gradient_checkpointing": gradient_checkpointing,
            "packing": packing,
            "packed_tokens_per_batch": packed_tokens_per_batch,
            "log_every": 10,
            "checkpoint_every": 10**9,
            "seed": seed,
            "save_merged": False,
        }
    )


def marker_rows(
    tokenizer: Any, shapes: list[tuple[int, int]], seed: int = 0, spec: SFTSpec = FUNCTION_CALLING
) -> list[dict[str, list[int]]]:
    """Rows of the node's shape with given (prompt, completion) token counts: ``<bos>`` + the user turn
    marker + filler + end of turn + the model turn marker, then filler ending with ``<end_of_turn>``, so
    both the completion mask and Unsloth's marker search find the same completion."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    head = [tok.bos_token_id, *enc(spec.instruction_part)]
    tail = enc("<end_of_turn>\n") + enc(spec.response_part)
    end = enc(spec.stop_tokens[0])
    body = C.body_token_ids(tokenizer)
    rng = random.Random(seed)
    rows = []
    for p, c in shapes:
        p = max(p, len(head) + len(tail) + 1)
        c = max(c, len(end) + 1)
        prompt = head + rng.choices(body, k=p - len(head) - len(tail)) + tail
        completion = rng.choices(body, k=c - len(end)) + end
        rows.append({"input_ids": prompt + completion, "completion_mask": [0] * p + [1] * c})
    return rows


def run_rows(
    section: Any,
    rows: list[dict[str, list[int]]],
    *,
    backend: str,
    workdir: Path,
    spec: SFTSpec = FUNCTION_CALLING,
    warm_section: Any = None,
    loaded: C.Loaded | None = None,
) -> dict[str, Any]:
    """Train ``section`` on ``rows`` with the node's trainer; optionally a short warm-up run first (its
    own trainer over the same loaded model: compilation and autotuning are not timed)."""
    device = "cuda" if C.cuda_available() else "cpu"
    if backend == "unsloth":
        import unsloth  # noqa: F401
    from dagtune.store import ArtifactStore

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t_load = time.perf_counter()
    if loaded is None:
        loaded = C.load_lora_model(
            section, backend, device, ArtifactStore(workdir / "store"), unsloth_loader=spec.unsloth_loader
        )
        C.ensure_pad_token(getattr(loaded.tokenizer, "tokenizer", loaded.tokenizer))
    load_s = time.perf_counter() - t_load
    warm_s = None
    if warm_section is not None:
        t = time.perf_counter()
        w = build_trainer(warm_section, spec, backend, device, loaded, rows, [], workdir / "warm", [])
        w.trainer.train()
        del w
        C.free_memory()
        warm_s = time.perf_counter() - t
    train_log = C.TrainLog(workdir / "run" / C.TRAIN_LOG)
    timer = C.StepTimer(device)
    built = build_trainer(
        section,
        spec,
        backend,
        device,
        loaded,
        rows,
        [],
        workdir / "run" / "checkpoints",
        [C.log_callback(train_log), timer.as_callback()],
    )
    t = time.perf_counter()
    result = built.trainer.train()
    train_wall = time.perf_counter() - t
    out = {
        "device": device,
        "backend": backend,
        "load_s": round(load_s, 2),
        "warm_s": round(warm_s, 2) if warm_s is not None else None,
        "train_wall_s": round(train_wall, 3),
        "train_runtime_s": float(result.metrics.get("train_runtime", train_wall)),
        "steps": int(result.global_step),
        "step_times_s": timer.step_times(),
        "gc_s_per_step": timer.step_gc_seconds(),
        "train_loss": float(result.training_loss),
        "loss_first": train_log.first_loss,
        "loss_last": train_log.last_loss,
        "num_input_tokens_seen": int(built.trainer.state.num_input_tokens_seen),
        **built.stats,
    }
    if timer.peak_allocated_bytes is not None:
        out["peak_allocated_bytes"] = timer.peak_allocated_bytes
        out["peak_reserved_bytes"] = timer.peak_reserved_bytes
    if backend == "unsloth" and section.packing:
        try:
            from unsloth.utils.hf_packed_attention import HF_PACKED_ATTENTION_STATS

            out["unsloth_packed_attention_calls"] = dict(HF_PACKED_ATTENTION_STATS)
        except Exception:  # pragma: no cover
            pass
    out["loaded"] = loaded  # the caller may reuse it (popped before JSON)
    del built
    C.free_memory()
    return out


def benchmark_train_steps(
    model_dir: str,
    *,
    batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool,
    load_in_4bit: bool,
    lora_r: int,
    lora_alpha: int,
    lora_dropout: float,
    target_modules: list[str],
    warmup_steps: int,
    timed_steps: int,
    backend: str = "unsloth",
    workdir: str | None = None,
) -> dict[str, Any]:
    """benchmarks/train_throughput.py's node hook (contract: its NODE_HOOK_DOC): fixed-length rows of
    ``seq_len`` tokens (a short prompt with the turn markers, the rest completion), the node's unpacked
    path, ``batch_size`` per step, no accumulation, ``warmup_steps + timed_steps`` optimizer steps."""
    import tempfile

    if backend == "unsloth":
        import unsloth  # noqa: F401  (before transformers: it patches it)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    n = batch_size * (warmup_steps + timed_steps)
    rows = marker_rows(tok, [(16, seq_len - 16)] * n, seed=1)
    sec = bench_section(
        model_dir,
        batch_size=batch_size,
        grad_accum=1,
        max_seq_length=seq_len,
        gradient_checkpointing=gradient_checkpointing,
        load_in_4bit=load_in_4bit,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        max_steps=warmup_steps + timed_steps,
    )
    r = run_rows(
        sec, rows, backend=backend, workdir=Path(workdir or tempfile.mkdtemp(prefix="dagtune-bench-"))
    )
    r.pop("loaded")
    times = r["step_times_s"][warmup_steps:]
    out = {
        "step_times_s": times,
        "gc_s_per_step": r["gc_s_per_step"][warmup_steps:],
        "tokens": batch_size * seq_len * len(times),
        "notes": (
            f"node: SFTTrainer ({backend}), unpacked path (train_on_responses_only on unsloth), "
            f"log_callback every 10 steps; step times from on_step_end (cuda synchronized); "
            f"loss {r['loss_first']} -> {r['loss_last']}"
        ),
    }
    if "peak_allocated_bytes" in r:
        out["peak_allocated_bytes"] = r["peak_allocated_bytes"]
        out["peak_reserved_bytes"] = r["peak_reserved_bytes"]
    return out
