"""The solution classifier: a LoRA-tuned decoder (Phi-4-mini; tiny-phi3 on the tiny profile) with a
linear head on the hidden state of the last non-pad token. Node ``train_classifier``.

setup: backbone + LoRA through the node's ``Runtime`` ('all-linear' resolves to Phi-3's fused qkv_proj
and gate_up_proj, o_proj, down_proj), ``nn.Linear(hidden, num_labels)`` head trained in full (fp32).
train: ``ClassifierTrainer``, a ``transformers.Trainer`` subclass set up by the same
``common.training_args`` as the SFT nodes (common.py says why one Trainer engine serves all three):
``compute_loss`` is the class-weighted cross-entropy of the pooled logits divided by the step's summed
class weight (``num_items_in_batch``), so gradient accumulation gives the weighted mean over the whole
step; validation every ``early_stopping.eval_every`` steps, ``EarlyStoppingCallback`` for the patience,
the best evaluation's trainable weights kept by ``_determine_best_metric`` and restored at the end;
checkpoints (trainable weights as safetensors, optimizer, scheduler, RNG and trainer state, all loaded
with ``weights_only``) and resume are the Trainer's own. save: adapter/, head.safetensors,
classifier_config.json, tokenizer/, merged/ (base + adapter merged, so the artifact alone rebuilds the
classifier), reference_logits.json (logits of a few validation texts from the trained model in memory:
the loader must reproduce them), train_log.jsonl. The model itself and its loader:
``dagtune.models.classifier``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from dagtune.data.split import read_split
from dagtune.models.classifier import (  # noqa: F401  (the artifact's model and loader, re-exported)
    CONFIG_FILE,
    HEAD_FILE,
    LABELS,
    REFERENCE_FILE,
    LastTokenClassifier,
    collate,
    decoder_of,
    encode,
    last_token_index,
    load_classifier,
    predict_proba,
)
from dagtune.runtime import Runtime, count_parameters, dtype_name, key_inputs_for
from dagtune.training import common as C
from dagtune.training import ddp

TRAINABLE_FILE = "trainable.safetensors"
CHECKPOINT_FILES = (TRAINABLE_FILE, "optimizer.pt", "scheduler.pt", "trainer_state.json")
N_REFERENCE = 8


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def class_weights(setting: Any, labels: list[int], num_labels: int) -> list[float] | None:
    """None, an explicit list, or 'balanced' = n / (num_labels * count) (sklearn's definition)."""
    if setting is None:
        return None
    if setting == "balanced":
        counts = [labels.count(k) for k in range(num_labels)]
        return [len(labels) / (num_labels * c) if c else 0.0 for c in counts]
    if len(setting) != num_labels:
        raise ValueError(f"class_weights has {len(setting)} entries, num_labels is {num_labels}")
    return [float(w) for w in setting]


def classification_metrics(labels: list[int], preds: list[int], num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 over all ``num_labels`` classes (a class never predicted nor present
    scores 0, like sklearn's ``zero_division=0``)."""
    from sklearn.metrics import accuracy_score, f1_score

    f1 = f1_score(labels, preds, labels=list(range(num_labels)), average="macro", zero_division=0)
    return {"accuracy": float(accuracy_score(labels, preds)) if labels else 0.0, "macro_f1": float(f1)}


def trainable_state(model: Any) -> dict[str, Any]:
    return {
        n: p.detach().to("cpu").clone().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


def load_trainable(model: Any, path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path))
    missing = {n for n, p in model.named_parameters() if p.requires_grad} - set(state)
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys or missing:
        raise RuntimeError(f"{path} does not match the model: unexpected {result.unexpected_keys[:5]}, "
                           f"missing {sorted(missing)[:5]}")  # fmt: skip


class Encoded:
    """Tokenized rows as a map-style dataset of {input_ids, label} (what the Trainer's sampler reads)."""

    def __init__(self, ids: list[list[int]], labels: list[int]):
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "label": self.labels[i]}


def _trainer_class() -> type:
    import torch
    import torch.nn.functional as F
    from transformers import Trainer

    class ClassifierTrainer(Trainer):
        """Trainer whose loss is the classifier's; checkpoints hold the trainable weights only."""

        def __init__(self, *a: Any, class_weights: list[float] | None = None, best_path: Path, **kw: Any):
            super().__init__(*a, **kw)
            self.best_path = best_path
            self.weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
            self.model_accepts_loss_kwargs = True  # the step's normaliser comes from _get_num_items_in_batch

        def _get_num_items_in_batch(self, batch_samples: list, device: Any) -> Any:
            """The step's summed class weight (its example count unweighted) over every rank: each
            micro-batch's summed loss is divided by it, so the step's loss is the weighted mean over all
            its examples (what Trainer does for label tokens with average_tokens_across_devices)."""
            labels = torch.cat([b["labels"] for b in batch_samples])
            w = (
                self.weights.to(labels.device)[labels]
                if self.weights is not None
                else torch.ones(len(labels))
            )
            total = w.sum().to(device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                total = self.accelerator.gather(total).sum()
            return total

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
            labels = inputs.pop("labels")
            logits = model(**inputs).float()
            if num_items_in_batch is None:  # evaluation: the plain mean cross-entropy
                loss = F.cross_entropy(logits, labels)
            else:
                w = self.weights.to(logits.device) if self.weights is not None else None
                denom = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=logits.device)
                loss = F.cross_entropy(logits, labels, weight=w, reduction="sum") / denom.clamp_min(1e-12)
                if self.args.average_tokens_across_devices:  # DDP averages gradients over the ranks: undo it
                    loss = loss * self.accelerator.num_processes
            return (loss, {"logits": logits}) if return_outputs else loss

        def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
            """The loss is the mean cross-entropy of the gathered logits: under DDP accelerate tops the
            last batch up with repeated rows, which a per-batch mean loss would count (the logits it drops)."""
            out = super().evaluation_loop(*args, **kwargs)
            prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
            if out.predictions is not None and out.label_ids is not None and len(out.label_ids):
                logits, labels = torch.as_tensor(out.predictions).float(), torch.as_tensor(out.label_ids)
                out.metrics[f"{prefix}_loss"] = float(F.cross_entropy(logits, labels.long()))
            return out

        def _determine_best_metric(self, metrics: dict, trial: Any) -> bool:
            """Also keep the best evaluation's trainable weights (restored after training)."""
            from safetensors.torch import save_file

            best = super()._determine_best_metric(metrics, trial)
            if best and self.args.should_save:  # every rank holds the same weights: rank 0 writes them
                save_file(trainable_state(self.model), str(self.best_path))
            return best

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            from safetensors.torch import save_file

            Path(output_dir).mkdir(parents=True, exist_ok=True)
            save_file(trainable_state(self.model), str(Path(output_dir) / TRAINABLE_FILE))

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            load_trainable(model or self.model, Path(resume_from_checkpoint) / TRAINABLE_FILE)

    return ClassifierTrainer


def collator(tokenizer: Any) -> Any:
    def collate_rows(items: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = collate([it["input_ids"] for it in items], tokenizer)
        return {**batch, "labels": torch.tensor([it["label"] for it in items], dtype=torch.long)}

    return collate_rows


def _compute_metrics(num_labels: int) -> Any:
    def compute(pred: Any) -> dict[str, float]:
        return classification_metrics(
            pred.label_ids.tolist(), pred.predictions.argmax(-1).tolist(), num_labels
        )

    return compute


# ----------------------------------------------------------------------------------------------
# the node
# ----------------------------------------------------------------------------------------------
def _classifier_model(cfg: Any, rt: Runtime, peft_model: Any) -> Any:
    """The LoRA backbone under a fresh fp32 head (its initial weights from the node's seed)."""
    from transformers import set_seed

    hidden = peft_model.get_base_model().config.get_text_config().hidden_size
    set_seed(cfg.seed)
    model = LastTokenClassifier(decoder_of(peft_model), hidden, cfg.num_labels)
    if rt.load_in_4bit or rt.backend == "unsloth":
        model.head.to(rt.device)  # the backbone was placed on the GPU by its loader
        if rt.load_in_4bit:  # the Trainer must not .to() a bitsandbytes model
            from transformers.utils.quantization_config import QuantizationMethod

            model.quantization_method = QuantizationMethod.BITS_AND_BYTES
    else:
        model.to(rt.device)
    if cfg.gradient_checkpointing and rt.backend == "hf" and not rt.load_in_4bit:
        peft_model.get_base_model().gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    return model.train()


def build_trainer(ctx: Any, rt: Runtime, loaded: Any, train: Encoded, val: Encoded, timer: C.StepTimer,
                  train_log: C.TrainLog) -> C.NodeRun:  # fmt: skip
    """The ClassifierTrainer over encoded rows (the node's, or a benchmark's), ready to ``train()``."""
    from transformers import EarlyStoppingCallback

    cfg, es = ctx.section, ctx.section.early_stopping
    model = _classifier_model(cfg, rt, loaded.model)
    model.tokenizer, model.max_length = loaded.tokenizer, cfg.model.max_seq_length
    weights = class_weights(cfg.class_weights, train.labels, cfg.num_labels)
    per_epoch, total = C.plan_steps(len(train), cfg.optim)
    warmup = C.warmup_steps(cfg.optim, total)
    evals = {"eval_strategy": "steps", "eval_steps": es.eval_every, "metric_for_best_model": es.metric,
             "greater_is_better": es.metric != "loss"} if len(val) else {}  # fmt: skip
    args = C.training_args(cfg, rt, ctx.scratch / "checkpoints", total, warmup, label_names=["labels"],
                           per_device_eval_batch_size=cfg.optim.batch_size * 2, remove_unused_columns=False,
                           **evals)  # fmt: skip
    callbacks = C.node_callbacks(ctx.name, train_log, timer)
    callbacks += [EarlyStoppingCallback(early_stopping_patience=es.patience)] if len(val) else []
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=train, eval_dataset=val if len(val) else None,
        data_collator=collator(loaded.tokenizer), compute_metrics=_compute_metrics(cfg.num_labels),
        callbacks=callbacks, class_weights=weights, best_path=ctx.scratch / "best.safetensors",
    )  # fmt: skip
    trainable, total_params = count_parameters(model)
    return C.NodeRun(rt, loaded, trainer, train_log, timer, ctx.scratch / "checkpoints", len(train), len(val),
                     per_epoch, total, warmup, {"class_weights": weights}, trainable, total_params)  # fmt: skip


def setup(ctx: Any, rt: Runtime, train_df: Any, val_df: Any) -> C.NodeRun:
    """Backbone + LoRA, the encoded splits (prompts cut to max_seq_length, keeping the end), the trainer."""
    timer = C.StepTimer(rt.device)
    loaded, train_log = C.load(ctx, rt, timer, loader="FastLanguageModel", task_type=None)
    tok, max_len = loaded.tokenizer, ctx.section.model.max_seq_length
    with timer.phase("prepare_s"):
        full = encode(tok, list(train_df["prompt"]), None)
        train = Encoded([x[-max_len:] for x in full], [int(v) for v in train_df["label"]])
        val = Encoded(encode(tok, list(val_df["prompt"]), max_len), [int(v) for v in val_df["label"]])
        run = build_trainer(ctx, rt, loaded, train, val, timer, train_log)
    run.stats["train_truncated"] = sum(len(x) > max_len for x in full)
    return run


def _final_evaluation(ctx: Any, run: C.NodeRun) -> dict[str, Any]:
    """Restore the best evaluation's weights, evaluate them: the manifest's validation numbers."""
    es, state, model = ctx.section.early_stopping, run.trainer.state, run.trainer.model
    best_path = ctx.scratch / "best.safetensors"
    ddp.barrier()  # rank 0 wrote the best weights; every rank evaluates them (the evaluation is collective)
    if state.best_global_step is not None and best_path.is_file():
        load_trainable(model, best_path)
    final = run.trainer.evaluate() if run.n_val else {}
    return {
        "stopped_early": state.global_step < run.total_steps,
        "best_step": state.best_global_step,
        "early_stopping_metric": es.metric,
        "best_metric": state.best_metric,
        **{f"val_{k}": final.get(f"eval_{k}") for k in ("loss", "accuracy", "macro_f1")},
    }


def _save(ctx: Any, run: C.NodeRun, ref_df: Any) -> dict[str, Any]:
    """head.safetensors, classifier_config.json, reference_logits.json; then the shared adapter save."""
    from safetensors.torch import save_file

    cfg, out, model = ctx.section, ctx.out, run.trainer.model
    model.eval()
    texts, ids = list(ref_df["prompt"][:N_REFERENCE]), list(ref_df["id"][:N_REFERENCE])
    ref = {"ids": ids, "texts": texts, "logits": model.logits(texts).tolist()}
    head = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
    save_file(head, str(out / HEAD_FILE))
    conf = {
        "format": 1, "architecture": "LastTokenClassifier", "pooling": "last_non_pad_token",
        "base_model": cfg.model.name, "base_model_path": run.loaded.model_path,
        "hidden_size": model.head.in_features, "num_labels": cfg.num_labels,
        "labels": {str(k): v for k, v in LABELS.items()} if cfg.num_labels == 2 else None,
        "max_length": cfg.model.max_seq_length, "truncation": "keep_end", "merged": cfg.save_merged,
        "merged_dtype": dtype_name(run.rt.merged_dtype(cfg)), "adapter": "adapter", "head": HEAD_FILE,
        "tokenizer": "tokenizer",
    }  # fmt: skip
    (out / CONFIG_FILE).write_text(json.dumps(conf, indent=2))
    (out / REFERENCE_FILE).write_text(json.dumps(ref))
    del model
    return C.save_adapter(ctx, run)


def build_classifier(ctx: Any) -> dict[str, Any]:
    t0 = time.time()
    rt = C.decide_runtime(ctx)
    with rt.threads(ctx.section.cpu_threads):
        rt.reset_peak_memory()
        data_dir = ctx.upstream["prepare_data"].dir
        train_df, val_df = (read_split(data_dir, "classifier", s) for s in ("train", "validation"))
        run = setup(ctx, rt, train_df, val_df)
        metrics = C.run_training(ctx, run, CHECKPOINT_FILES)
        with run.timer.phase("validate_s"):
            metrics.update(_final_evaluation(ctx, run))
        if ddp.is_main():  # under torchrun the other ranks only trained and evaluated
            metrics.update(_save(ctx, run, val_df if len(val_df) else train_df))
        ddp.wait_for_main()
        return {**metrics, **C.node_metrics(run, t0)}


def key_inputs(cfg: Any) -> dict[str, Any]:
    return key_inputs_for(cfg.train_classifier, cfg.runtime, cfg.artifact_root)


__all__ = [
    "LastTokenClassifier",
    "build_classifier",
    "key_inputs",
    "last_token_index",
    "load_classifier",
    "predict_proba",
]
