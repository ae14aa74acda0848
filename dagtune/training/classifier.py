"""The solution classifier: a LoRA-tuned decoder (Phi-4-mini; tiny-phi3 on the tiny profile) with a
linear head on the hidden state of the last non-pad token. Node ``train_classifier``.

setup: backbone + LoRA on every linear layer ('all-linear' resolves to Phi-3's fused qkv_proj and
gate_up_proj, o_proj, down_proj), ``nn.Linear(hidden, num_labels)`` head trained in full (fp32).
train: a short explicit loop (torchtune style): weighted cross-entropy, AdamW, warmup + cosine,
gradient accumulation and clipping, validation every ``early_stopping.eval_every`` steps with patience,
atomic checkpoints every ``checkpoint_every`` steps in ``ctx.scratch`` (trainable weights, optimizer,
scheduler, RNG, loop position, early-stopping state) and resume from the newest one. The best
validation weights are restored at the end. save: adapter/, head.safetensors, classifier_config.json,
tokenizer/, merged/ (base + adapter merged, so the artifact alone rebuilds the classifier),
reference_logits.json (logits of a few validation texts from the trained model in memory: the loader
must reproduce them), train_log.jsonl.

Pooling: the index of the last token whose attention mask is 1, and position ids counted from the
mask, so left and right padding give the same logits.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

from dagtune.training import common as C

CONFIG_FILE = "classifier_config.json"
HEAD_FILE = "head.safetensors"
REFERENCE_FILE = "reference_logits.json"
CKPT_FILES = ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "state.json")
LABELS = {0: "correct", 1: "flawed"}
N_REFERENCE = 8


# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------
def last_token_index(attention_mask: Any) -> Any:
    """Index of the last position with mask 1 in each row: right padding -> length-1, left -> L-1."""
    import torch

    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (pos * attention_mask.long()).argmax(dim=-1)


def decoder_of(lm: Any) -> Any:
    """The transformer body (no LM head) of a causal LM, a peft model around one, or Unsloth's."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    if hasattr(base, "get_decoder"):
        dec = base.get_decoder()
        if dec is not None:
            return dec
    return base.model


def _make_module_class() -> type:
    import torch
    from torch import nn

    class LastTokenClassifier(nn.Module):
        """backbone (decoder body, LoRA inside) -> hidden state at the last non-pad token -> Linear."""

        def __init__(self, backbone: nn.Module, hidden_size: int, num_labels: int):
            super().__init__()
            self.backbone = backbone
            self.head = nn.Linear(hidden_size, num_labels, dtype=torch.float32)
            self.tokenizer: Any = None
            self.max_length: int | None = None

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            out = self.backbone(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            idx = last_token_index(attention_mask)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
            return self.head(pooled.to(self.head.weight.dtype))

        @property
        def device(self) -> torch.device:
            return self.head.weight.device

        @torch.no_grad()
        def logits(self, texts: list[str], batch_size: int = 16) -> torch.Tensor:
            """Logits for rendered prompts (the prepare_data ``prompt`` column), in the given order."""
            if self.tokenizer is None:
                raise RuntimeError("no tokenizer attached: build the classifier with load_classifier()")
            was_training = self.training
            self.eval()
            enc = encode(self.tokenizer, list(texts), self.max_length)
            out = []
            for i in range(0, len(enc), batch_size):
                batch = collate(enc[i : i + batch_size], self.tokenizer, self.device)
                out.append(self(batch["input_ids"], batch["attention_mask"]).float().cpu())
            self.train(was_training)
            return torch.cat(out) if out else torch.empty(0, self.head.out_features)

        def predict_proba(self, texts: list[str], batch_size: int = 16) -> Any:
            """Class probabilities, shape (len(texts), num_labels); column 1 = P(flawed)."""
            return self.logits(texts, batch_size).softmax(-1).numpy()

    return LastTokenClassifier


_CLS: type | None = None


def LastTokenClassifier(backbone: Any, hidden_size: int, num_labels: int) -> Any:  # noqa: N802
    """Build the classifier module (the class is created on first use: torch is imported lazily)."""
    global _CLS
    if _CLS is None:
        _CLS = _make_module_class()
    return _CLS(backbone, hidden_size, num_labels)


def encode(tokenizer: Any, texts: list[str], max_length: int | None) -> list[list[int]]:
    """Token ids of rendered prompts, no special tokens added (the template already has them). Longer
    than ``max_length``: the end is kept, so the pooled token is still the prompt's last one."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    ids = tok(list(texts), add_special_tokens=False)["input_ids"]
    return [x[-max_length:] if max_length and len(x) > max_length else x for x in ids]


def collate(rows: list[list[int]], tokenizer: Any, device: Any = "cpu") -> dict[str, Any]:
    """Pad to the longest row, on the tokenizer's padding side."""
    import torch

    tok = getattr(tokenizer, "tokenizer", tokenizer)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if tok.padding_side == "left":
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
        else:
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


# ----------------------------------------------------------------------------------------------
# training helpers
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
    n = len(labels)
    acc = sum(int(a == b) for a, b in zip(labels, preds, strict=True)) / n if n else 0.0
    f1s = []
    for k in range(num_labels):
        tp = sum(1 for a, b in zip(labels, preds, strict=True) if a == k and b == k)
        fp = sum(1 for a, b in zip(labels, preds, strict=True) if a != k and b == k)
        fn = sum(1 for a, b in zip(labels, preds, strict=True) if a == k and b != k)
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": acc, "macro_f1": sum(f1s) / num_labels}


def _improved(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if metric == "loss" else value > best


def _trainable_state(model: Any) -> dict[str, Any]:
    return {
        n: p.detach().to("cpu").clone().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


def _load_trainable(model: Any, state: dict[str, Any]) -> None:
    missing_trainable = {n for n, p in model.named_parameters() if p.requires_grad} - set(state)
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys or missing_trainable:
        raise RuntimeError(
            f"checkpoint does not match the model: unexpected {result.unexpected_keys[:5]}, "
            f"missing {sorted(missing_trainable)[:5]}"
        )


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(
    ckpt_dir: Path, step: int, model: Any, opt: Any, sched: Any, state: dict[str, Any]
) -> Path:
    """Write checkpoint-<step> atomically (temp dir + rename) and keep the newest two."""
    import torch
    from safetensors.torch import save_file

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"{C.CHECKPOINT_PREFIX}{step}"
    tmp = ckpt_dir / f".tmp-{C.CHECKPOINT_PREFIX}{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    torch.save(sched.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    old = sorted((p for p in ckpt_dir.iterdir() if C.checkpoint_step(p) >= 0), key=C.checkpoint_step)
    for p in old[:-2]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: Any, opt: Any, sched: Any) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    _load_trainable(model, load_file(str(path / "trainable.safetensors")))
    opt.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    sched.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if (path / "rng.pt").is_file():
        _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "state.json").read_text())


def make_optimizer(params: list[Any], optim: Any, device: str) -> Any:
    import torch

    name = C.resolve_optimizer(optim.optimizer, device)
    if name == "adamw_torch":
        # fused on CUDA: one kernel for all the LoRA tensors (same update as the per-tensor loop)
        return torch.optim.AdamW(
            params, lr=optim.learning_rate, weight_decay=optim.weight_decay, fused=device == "cuda"
        )
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=optim.learning_rate, weight_decay=optim.weight_decay)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's shuffled micro-batches: a function of (seed, epoch) only, so a resumed run sees the
    same order and skips what was consumed."""
    import torch

    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


# ----------------------------------------------------------------------------------------------
# the node
# ----------------------------------------------------------------------------------------------
def build_classifier(ctx: Any) -> dict[str, Any]:
    device = C.resolve_device(ctx.runtime)
    C.check_device(device)
    with C.cpu_threads(ctx.section.cpu_threads, device):
        return _train_classifier(ctx, device)


def key_inputs(cfg: Any) -> dict[str, Any]:
    return C.key_inputs_for(cfg.train_classifier, cfg.runtime, cfg.artifact_root)


def _evaluate(
    model: Any,
    enc: list[list[int]],
    labels: list[int],
    tok: Any,
    bs: int,
    weight: Any,
    device: str,
    autocast: Any,
) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    model.eval()
    losses, preds = [], []
    with torch.no_grad(), autocast():
        for i in range(0, len(enc), bs):
            batch = collate(enc[i : i + bs], tok, device)
            logits = model(batch["input_ids"], batch["attention_mask"]).float()
            y = torch.tensor(labels[i : i + bs], device=logits.device)
            losses.append(F.cross_entropy(logits, y, reduction="sum").item())
            preds.extend(logits.argmax(-1).tolist())
    model.train()
    return {
        "loss": sum(losses) / max(1, len(enc)),
        **classification_metrics(labels, preds, model.head.out_features),
    }


def _train_classifier(ctx: Any, device: str, bench: dict[str, Any] | None = None) -> dict[str, Any]:
    """The node. ``bench`` (benchmark_train_steps only): token ids and labels instead of the parquet
    files, a ``C.StepTimer`` told when training begins and each optimizer step ends, and a return right
    after the training loop (no final evaluation, no artifact)."""
    import contextlib

    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    cfg = ctx.section
    backend = C.resolve_backend(ctx.runtime, device)
    if backend == "unsloth":
        import unsloth  # noqa: F401
    C.reset_peak_memory(device)
    t0 = time.time()

    # -- setup ----------------------------------------------------------------------------------
    if bench is None:
        data_dir = ctx.upstream["prepare_data"].dir
        train_df = C.read_split(data_dir, "classifier", "train")
        val_df = C.read_split(data_dir, "classifier", "validation")
    loaded = C.load_lora_model(
        cfg, backend, device, ctx.store, unsloth_loader="FastLanguageModel", task_type=None
    )
    peft_model, tok = loaded.model, loaded.tokenizer
    C.ensure_pad_token(getattr(tok, "tokenizer", tok))
    hidden = peft_model.get_base_model().config.get_text_config().hidden_size
    C.seed_everything(cfg.seed)  # the head's initial weights
    model = LastTokenClassifier(decoder_of(peft_model), hidden, cfg.num_labels)
    if loaded.quantized or backend == "unsloth":
        model.head.to(device)  # the backbone was placed on the GPU by its loader
    else:
        model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable, total_params = C.count_parameters(model)

    max_len = cfg.model.max_seq_length
    if bench is None:
        full_lens = [len(x) for x in encode(tok, list(train_df["prompt"]), None)]
        train_enc = encode(tok, list(train_df["prompt"]), max_len)
        val_enc = encode(tok, list(val_df["prompt"]), max_len)
        y_train = [int(v) for v in train_df["label"]]
        y_val = [int(v) for v in val_df["label"]]
    else:
        train_enc, y_train, val_enc, y_val = bench["train_enc"], bench["labels"], [], []
        full_lens = [len(x) for x in train_enc]
    weights = class_weights(cfg.class_weights, y_train, cfg.num_labels)
    weight_t = torch.tensor(weights, dtype=torch.float32, device=device) if weights else None

    o, es = cfg.optim, cfg.early_stopping
    per_epoch, total = C.plan_steps(len(train_enc), o)
    warmup = C.warmup_steps(o, total)
    opt = make_optimizer(params, o, device)
    sched = get_scheduler(o.scheduler, opt, num_warmup_steps=warmup, num_training_steps=total)
    cuda_16bit = device == "cuda" and loaded.dtype != torch.float32

    def autocast() -> Any:
        if cuda_16bit:
            return torch.autocast("cuda", dtype=loaded.dtype)
        return contextlib.nullcontext()

    if cfg.gradient_checkpointing and backend == "hf" and not loaded.quantized:
        peft_model.get_base_model().gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )

    # -- resume ---------------------------------------------------------------------------------
    ckpt_dir = ctx.scratch / "checkpoints"
    if ckpt_dir.is_dir():
        for p in ckpt_dir.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
    train_log = C.TrainLog(ctx.scratch / C.TRAIN_LOG)
    best_path = ctx.scratch / "best.safetensors"
    st: dict[str, Any] = {
        "step": 0,
        "epoch": 0,
        "micro": 0,
        "tokens": 0,
        "best_metric": None,
        "best_step": None,
        "bad_evals": 0,
        "stopped_early": False,
        "evals": [],
    }
    resume = C.last_checkpoint(ckpt_dir, CKPT_FILES, remove_incomplete=True)
    resumed_from = 0
    if resume:
        st = load_checkpoint(resume, model, opt, sched)
        resumed_from = st["step"]
    train_log.rewind(st["step"])
    if resumed_from:
        train_log.write({"event": "resume", "step": resumed_from, "time": time.time()})
    ctx.log.info(
        "%s: %d examples, %d steps (%d/epoch, warmup %d), backend %s on %s%s",
        ctx.name,
        len(train_enc),
        total,
        per_epoch,
        warmup,
        backend,
        device,
        f", resuming from step {resumed_from}" if resume else "",
    )

    # -- train ----------------------------------------------------------------------------------
    batches = epoch_batches(len(train_enc), o.batch_size, cfg.seed, st["epoch"])
    meter = C.Throughput(st["tokens"])
    window: list[float] = []
    bar = tqdm(total=total, initial=st["step"], desc=ctx.name, dynamic_ncols=True)
    timer = bench["timer"] if bench is not None else None
    if timer is not None:
        timer.on_train_begin()
    train_start, cpu0 = time.time(), time.process_time()
    while st["step"] < total and not st["stopped_early"]:
        if st["micro"] >= len(batches):
            st["epoch"], st["micro"] = st["epoch"] + 1, 0
            batches = epoch_batches(len(train_enc), o.batch_size, cfg.seed, st["epoch"])
        step_batches = batches[st["micro"] : st["micro"] + o.grad_accum]  # a step never spans epochs
        step_labels = [y_train[i] for b in step_batches for i in b]
        denom = sum(weights[y] for y in step_labels) if weights else len(step_labels)
        step_loss = 0.0
        for b in step_batches:
            batch = collate([train_enc[i] for i in b], tok, device)
            y = torch.tensor([y_train[i] for i in b], device=device)
            with autocast():
                logits = model(batch["input_ids"], batch["attention_mask"]).float()
            loss = F.cross_entropy(logits, y, weight=weight_t, reduction="sum") / max(denom, 1e-12)
            loss.backward()
            step_loss += loss.item()
            st["tokens"] += int(batch["attention_mask"].sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm).item()
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        st["micro"] += len(step_batches)
        st["step"] += 1
        step = st["step"]
        window.append(step_loss)
        bar.update(1)

        if step == 1 or step % cfg.log_every == 0 or step == total:
            tps, dn, dt = meter.tick(st["tokens"])
            train_log.session_tokens += dn
            train_log.session_seconds += dt
            rec = {
                "step": step,
                "epoch": round(st["epoch"] + st["micro"] / len(batches), 4),
                "loss": sum(window) / len(window),
                "learning_rate": lr,
                "grad_norm": grad_norm,
                "tokens_per_second": round(tps, 2),
                "num_tokens": st["tokens"],
                "time": time.time(),
            }
            window = []
            train_log.write(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")

        if val_enc and (step % es.eval_every == 0 or step == total):
            ev = _evaluate(model, val_enc, y_val, tok, o.batch_size * 2, weight_t, device, autocast)
            value = ev[es.metric]
            if _improved(es.metric, value, st["best_metric"]):
                st["best_metric"], st["best_step"], st["bad_evals"] = value, step, 0
                save_file(_trainable_state(model), str(best_path))
            else:
                st["bad_evals"] += 1
                if st["bad_evals"] >= es.patience:
                    st["stopped_early"] = True
            st["evals"].append({"step": step, **ev})
            train_log.write({"step": step, **{f"eval_{k}": v for k, v in ev.items()}, "time": time.time()})
            meter = C.Throughput(st["tokens"])  # evaluation time is not training throughput

        if step % cfg.checkpoint_every == 0 and step < total and not st["stopped_early"]:
            save_checkpoint(ckpt_dir, step, model, opt, sched, st)
        if timer is not None:
            timer.on_step_end()
    bar.close()
    train_seconds, train_cpu = time.time() - train_start, time.process_time() - cpu0
    if timer is not None:
        timer.on_train_end()
        return {
            "steps": st["step"],
            "tokens": st["tokens"],
            "train_seconds": train_seconds,
            "loss_first": train_log.first_loss,
            "loss_last": train_log.last_loss,
            "backend": backend,
            "target_modules": loaded.target_modules,
        }

    # -- best weights, final validation ---------------------------------------------------------
    if st["best_step"] is not None and best_path.is_file():
        from safetensors.torch import load_file

        _load_trainable(model, load_file(str(best_path)))
    final = (
        _evaluate(model, val_enc, y_val, tok, o.batch_size * 2, weight_t, device, autocast) if val_enc else {}
    )
    model.eval()
    model.tokenizer, model.max_length = tok, max_len
    ref_texts = (
        list(val_df["prompt"][:N_REFERENCE]) if len(val_df) else list(train_df["prompt"][:N_REFERENCE])
    )
    ref_ids = list(val_df["id"][:N_REFERENCE]) if len(val_df) else list(train_df["id"][:N_REFERENCE])
    ref_logits = model.logits(ref_texts).tolist()

    # -- save -----------------------------------------------------------------------------------
    out = ctx.out
    peft_model.save_pretrained(str(out / "adapter"))
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}, str(out / HEAD_FILE)
    )
    tok.save_pretrained(str(out / "tokenizer"))
    merged_dtype = C.resolve_merged_dtype(cfg, loaded.dtype)
    conf = {
        "format": 1,
        "architecture": "LastTokenClassifier",
        "pooling": "last_non_pad_token",
        "base_model": cfg.model.name,
        "base_model_path": loaded.model_path,
        "hidden_size": hidden,
        "num_labels": cfg.num_labels,
        "labels": {str(k): v for k, v in LABELS.items()} if cfg.num_labels == 2 else None,
        "max_length": max_len,
        "truncation": "keep_end",
        "merged": cfg.save_merged,
        "merged_dtype": C.dtype_name(merged_dtype),
        "adapter": "adapter",
        "head": HEAD_FILE,
        "tokenizer": "tokenizer",
    }
    (out / CONFIG_FILE).write_text(json.dumps(conf, indent=2))
    (out / REFERENCE_FILE).write_text(json.dumps({"ids": ref_ids, "texts": ref_texts, "logits": ref_logits}))
    train_log.copy_to(out / C.TRAIN_LOG)
    if cfg.save_merged and backend == "unsloth":
        # Unsloth may have added a pad token (and grown the embeddings): only its own merge matches.
        C.save_merged_unsloth(peft_model, tok, out / "merged")
    del model, peft_model, opt
    C.free_memory()
    if cfg.save_merged and backend == "hf":
        C.save_merged_hf(loaded.model_path, out / "adapter", out / "merged", merged_dtype, tok, device=device)

    losses = [r["loss"] for r in train_log.records if "loss" in r]
    return {
        **C.library_backend_info(backend),
        "device": device,
        "dtype": C.dtype_name(loaded.dtype),
        "merged_dtype": conf["merged_dtype"] if cfg.save_merged else None,
        "load_in_4bit": loaded.quantized,
        "base_model": cfg.model.name,
        "base_model_path": loaded.model_path,
        "target_modules": loaded.target_modules,
        "trainable_params": trainable,
        "total_params": total_params,
        "train_examples": len(train_enc),
        "val_examples": len(val_enc),
        "train_truncated": sum(n > max_len for n in full_lens),
        "class_weights": weights,
        "steps": st["step"],
        "planned_steps": total,
        "steps_per_epoch": per_epoch,
        "warmup_steps": warmup,
        "resumed_from_step": resumed_from,
        "steps_this_run": st["step"] - resumed_from,
        "stopped_early": st["stopped_early"],
        "best_step": st["best_step"],
        "early_stopping_metric": es.metric,
        "best_metric": st["best_metric"],
        "train_loss": sum(losses) / len(losses) if losses else None,
        "train_loss_first": train_log.first_loss,
        "train_loss_last": train_log.last_loss,
        "val_loss": final.get("loss"),
        "val_accuracy": final.get("accuracy"),
        "val_macro_f1": final.get("macro_f1"),
        "tokens_per_second": train_log.tokens_per_second,
        "train_seconds": round(train_seconds, 3),
        "train_cpu_seconds": round(train_cpu, 3),
        "node_seconds": round(time.time() - t0, 3),
        **C.peak_memory(device),
    }


# ----------------------------------------------------------------------------------------------
# loading from the artifact
# ----------------------------------------------------------------------------------------------
def load_classifier(
    artifact_dir: str | os.PathLike[str], device: str = "cpu", dtype: Any = None
) -> tuple[Any, Any]:
    """Rebuild the trained classifier from its artifact directory alone: (model, tokenizer), in eval
    mode, with ``model.predict_proba(texts)``. Uses merged/ when present; otherwise the recorded base
    model path (or hub id) plus adapter/."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = Path(artifact_dir)
    conf = json.loads((d / CONFIG_FILE).read_text())
    dtype = dtype or getattr(torch, conf.get("merged_dtype") or "float32")
    tok = AutoTokenizer.from_pretrained(str(d / conf.get("tokenizer", "tokenizer")))
    C.ensure_pad_token(tok)
    if (d / "merged").is_dir():
        lm = AutoModelForCausalLM.from_pretrained(str(d / "merged"), dtype=dtype)
    else:
        from peft import PeftModel

        base_ref = conf["base_model_path"]
        if not Path(base_ref).is_dir():
            from dagtune.models import is_tiny

            if is_tiny(conf["base_model"]):
                raise FileNotFoundError(
                    f"{d}: no merged/ and the tiny base model directory {base_ref} is gone; train with "
                    "save_merged: true or rebuild the tiny model"
                )
            base_ref = conf["base_model"]  # a hub id (or a path that moved back)
        base = AutoModelForCausalLM.from_pretrained(base_ref, dtype=dtype)
        if len(tok) > base.get_input_embeddings().weight.shape[0]:  # Unsloth added a pad token
            base.resize_token_embeddings(len(tok))
        lm = PeftModel.from_pretrained(base, str(d / conf.get("adapter", "adapter"))).merge_and_unload()
    model = LastTokenClassifier(decoder_of(lm), conf["hidden_size"], conf["num_labels"])
    model.head.load_state_dict(load_file(str(d / conf.get("head", HEAD_FILE))))
    model.tokenizer, model.max_length = tok, conf["max_length"]
    model.to(device)
    model.eval()
    return model, tok


def predict_proba(artifact_or_model: Any, texts: list[str], batch_size: int = 16) -> Any:
    """P(label) for rendered prompts, from a loaded classifier or an artifact directory."""
    model = artifact_or_model
    if isinstance(model, (str, os.PathLike)):
        model, _ = load_classifier(model)
    return model.predict_proba(texts, batch_size)


# ----------------------------------------------------------------------------------------------
# benchmark hook (benchmarks/train_throughput.py)
# ----------------------------------------------------------------------------------------------
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
    """benchmarks/train_throughput.py's node hook (contract: its NODE_HOOK_DOC): the node's own loop
    (``_train_classifier``: loading, head, collation, weighted cross-entropy, clipping, scheduler,
    logging) on ``batch_size`` rows of exactly ``seq_len`` random ordinary tokens per step, no
    accumulation, no validation, for ``warmup_steps + timed_steps`` optimizer steps."""
    import tempfile

    if backend == "unsloth":
        import unsloth  # noqa: F401  (before transformers: it patches it)
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from dagtune.config import RuntimeConfig, TrainClassifierConfig
    from dagtune.store import ArtifactStore

    device = "cuda" if C.cuda_available() else "cpu"
    work = Path(workdir or tempfile.mkdtemp(prefix="dagtune-bench-cls-"))
    for d in ("out", "scratch"):
        (work / d).mkdir(parents=True, exist_ok=True)
    steps = warmup_steps + timed_steps
    sec = TrainClassifierConfig.model_validate(
        {
            "model": {"name": str(model_dir), "load_in_4bit": load_in_4bit, "max_seq_length": seq_len},
            "lora": {"r": lora_r, "alpha": lora_alpha, "dropout": lora_dropout, "target_modules": target_modules},
            "optim": {"learning_rate": 1e-4, "warmup_steps": 0, "max_steps": steps, "batch_size": batch_size,
                      "grad_accum": 1},
            "gradient_checkpointing": gradient_checkpointing,
            "log_every": 10,
            "checkpoint_every": 10**9,
            "save_merged": False,
        }
    )  # fmt: skip
    rng = random.Random(1)
    body = C.body_token_ids(AutoTokenizer.from_pretrained(model_dir))
    n = batch_size * steps
    enc = [rng.choices(body, k=seq_len) for _ in range(n)]
    labels = [rng.randrange(sec.num_labels) for _ in range(n)]
    timer = C.StepTimer(device)
    import logging

    ctx = SimpleNamespace(
        name="train_classifier",
        section=sec,
        runtime=RuntimeConfig(device=device, backend=backend),
        store=ArtifactStore(work / "store"),
        scratch=work / "scratch",
        out=work / "out",
        log=logging.getLogger("dagtune.bench"),
        upstream={},
    )
    r = _train_classifier(ctx, device, bench={"train_enc": enc, "labels": labels, "timer": timer})
    times = timer.step_times()[warmup_steps:]
    out = {
        "step_times_s": times,
        "gc_s_per_step": timer.step_gc_seconds()[warmup_steps:],
        "tokens": batch_size * seq_len * len(times),
        "notes": (
            f"node: classifier loop ({r['backend']}), last-token head + weighted CE, fused AdamW, clipping, "
            f"log every 10 steps; loss {r['loss_first']} -> {r['loss_last']}"
        ),
    }
    if timer.peak_allocated_bytes is not None:
        out["peak_allocated_bytes"] = timer.peak_allocated_bytes
        out["peak_reserved_bytes"] = timer.peak_reserved_bytes
    return out


__all__ = [
    "LastTokenClassifier",
    "build_classifier",
    "key_inputs",
    "last_token_index",
    "load_classifier",
    "predict_proba",
]
