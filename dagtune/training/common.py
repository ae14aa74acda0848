"""Helpers shared by the training nodes: backend/device/dtype choice, step and warmup arithmetic,
checkpoint discovery, the train_log.jsonl writer (and its TrainerCallback), parameter counting, peak
memory, seeding, model loading for both backends and the merged 16-bit export.

Nothing here imports torch/transformers at module level: ``key_inputs`` runs while planning the DAG.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("dagtune.training")

BACKENDS = ("unsloth", "hf")
CHECKPOINT_PREFIX = "checkpoint-"
TRAIN_LOG = "train_log.jsonl"


# ----------------------------------------------------------------------------------------------
# backend / device / dtype
# ----------------------------------------------------------------------------------------------
def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def unsloth_installed() -> bool:
    """Whether the unsloth package is importable (checked without importing it: that patches torch)."""
    return importlib.util.find_spec("unsloth") is not None


def resolve_device(runtime: Any) -> str:
    """``cpu`` or ``cuda``. ``auto`` asks torch (imported only then, so a CPU profile plans without it)."""
    if runtime.device == "cpu":
        return "cpu"
    if runtime.device == "cuda":
        return "cuda"
    return "cuda" if cuda_available() else "cpu"


def resolve_backend(runtime: Any, device: str | None = None) -> str:
    """``unsloth`` or ``hf``. auto: unsloth iff the device is CUDA and the package is installed."""
    device = device or resolve_device(runtime)
    if runtime.backend == "hf":
        return "hf"
    if runtime.backend == "unsloth":
        if device != "cuda":
            raise RuntimeError(
                "runtime.backend=unsloth needs a CUDA device (runtime.device resolved to 'cpu'); "
                "use backend 'hf' or 'auto' on CPU"
            )
        if not unsloth_installed():
            raise RuntimeError(
                "runtime.backend=unsloth but the unsloth package is not installed; install the 'gpu' extra "
                "(pip install -e '.[gpu]') or set runtime.backend to 'auto' or 'hf'"
            )
        return "unsloth"
    return "unsloth" if device == "cuda" and unsloth_installed() else "hf"


def check_device(device: str) -> None:
    if device == "cuda" and not cuda_available():
        raise RuntimeError("runtime.device=cuda but torch sees no CUDA device")


def resolve_dtype(model_cfg: Any, device: str) -> Any:
    """Compute dtype: CPU always trains in fp32 (no bf16 autocast on CPU); CUDA: bf16 where supported."""
    import torch

    if device == "cpu":
        if model_cfg.dtype not in ("auto", "float32"):
            log.warning("model.dtype=%s ignored on CPU: training in float32", model_cfg.dtype)
        return torch.float32
    if model_cfg.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, model_cfg.dtype)


def resolve_merged_dtype(section: Any, compute_dtype: Any) -> Any:
    import torch

    name = getattr(section, "merged_dtype", "auto")
    return compute_dtype if name == "auto" else getattr(torch, name)


def dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def use_4bit(model_cfg: Any, device: str) -> bool:
    if model_cfg.load_in_4bit and device != "cuda":
        warnings.warn("model.load_in_4bit ignored on CPU (bitsandbytes NF4 needs CUDA)", stacklevel=2)
        return False
    return bool(model_cfg.load_in_4bit)


def resolve_optimizer(name: str, device: str) -> str:
    if name != "adamw_torch" and device != "cuda":
        log.warning("optim.optimizer=%s needs bitsandbytes on CUDA: using adamw_torch on CPU", name)
        return "adamw_torch"
    return name


def bnb_config(compute_dtype: Any) -> Any:
    """NF4 with double quantization, computing in the training dtype (bf16 on recent GPUs)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def key_inputs_for(section: Any, runtime: Any, store_root: Path) -> dict[str, Any]:
    """Extra key inputs of a training node: a CPU artifact is never reused on a GPU worker (or with the
    other backend), and a changed local/tiny base model retrains."""
    from dagtune.models import model_fingerprint
    from dagtune.store import ArtifactStore

    device = resolve_device(runtime)
    return {
        "device": device,
        "backend": resolve_backend(runtime, device),
        "model": model_fingerprint(
            section.model.name, ArtifactStore(store_root), section.model.revision, "model.revision"
        ),
    }


# ----------------------------------------------------------------------------------------------
# steps, warmup, seeding
# ----------------------------------------------------------------------------------------------
def plan_steps(n_examples: int, optim: Any) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps), the same arithmetic as HF Trainer."""
    if n_examples <= 0:
        raise ValueError("no training examples")
    micro_batches = math.ceil(n_examples / optim.batch_size)
    per_epoch = max(1, math.ceil(micro_batches / optim.grad_accum))
    total = optim.max_steps or max(1, math.ceil(optim.epochs * per_epoch))
    return per_epoch, total


def warmup_steps(optim: Any, total_steps: int) -> int:
    """warmup_steps (or warmup_ratio * total), capped to max_warmup_fraction of the total steps so a
    small dataset is not spent entirely in warmup (200 warmup steps of 40 would never reach the peak)."""
    w = optim.warmup_steps if optim.warmup_steps is not None else math.ceil(optim.warmup_ratio * total_steps)
    cap = math.floor(optim.max_warmup_fraction * total_steps)
    return max(0, min(int(w), cap))


@contextmanager
def cpu_threads(n: int | None, device: str) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads on CPU (restored afterwards: tests train in-process)."""
    if device != "cpu" or not n:
        yield
        return
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
def checkpoint_step(p: Path) -> int:
    tail = p.name[len(CHECKPOINT_PREFIX) :]
    return int(tail) if p.name.startswith(CHECKPOINT_PREFIX) and tail.isdigit() else -1


def checkpoint_complete(p: Path, required: tuple[str, ...]) -> bool:
    if not all((p / f).is_file() and (p / f).stat().st_size > 0 for f in required):
        return False
    for f in required:
        if f.endswith(".json"):
            try:
                json.loads((p / f).read_text())
            except (OSError, ValueError):
                return False
    return True


HF_CHECKPOINT_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")


def last_checkpoint(
    directory: Path, required: tuple[str, ...] = HF_CHECKPOINT_FILES, remove_incomplete: bool = False
) -> Path | None:
    """The newest complete ``checkpoint-N`` under ``directory``. HF Trainer writes a checkpoint's files one
    after another (trainer_state.json last), so a kill mid-save leaves an incomplete directory: it is
    skipped (and removed with ``remove_incomplete``, which only the process about to train may ask for:
    the node holds the key's lock, nobody else writes there) and the previous one is used."""
    if not directory.is_dir():
        return None
    cands = sorted(
        (p for p in directory.iterdir() if p.is_dir() and checkpoint_step(p) >= 0),
        key=checkpoint_step,
        reverse=True,
    )
    for p in cands:
        if checkpoint_complete(p, required):
            return p
        if remove_incomplete:
            log.warning("removing incomplete checkpoint %s (killed while saving)", p)
            shutil.rmtree(p, ignore_errors=True)
    return None


# ----------------------------------------------------------------------------------------------
# train_log.jsonl + progress
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainLog:
    """Append-only JSONL of training records, kept in ``ctx.scratch`` so a resumed run continues it and
    copied into the artifact at the end (MLflow logs the curves from it)."""

    path: Path
    session_tokens: int = 0
    session_seconds: float = 0.0
    first_loss: float | None = None
    last_loss: float | None = None
    records: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records = self._read()
        losses = [r["loss"] for r in self.records if "loss" in r]
        if losses:
            self.first_loss, self.last_loss = losses[0], losses[-1]

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut by a kill
                continue
        return out

    def rewind(self, step: int) -> None:
        """Drop records past ``step`` (the killed attempt went on after its last checkpoint)."""
        self.records = [r for r in self.records if r.get("step", 0) <= step]
        losses = [r["loss"] for r in self.records if "loss" in r]
        self.first_loss = losses[0] if losses else None
        self.last_loss = losses[-1] if losses else None
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        record = {k: _plain(v) for k, v in record.items()}
        self.records.append(record)
        if "loss" in record:
            self.first_loss = record["loss"] if self.first_loss is None else self.first_loss
            self.last_loss = record["loss"]
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def copy_to(self, dest: Path) -> None:
        shutil.copyfile(self.path, dest)

    @property
    def tokens_per_second(self) -> float | None:
        return round(self.session_tokens / self.session_seconds, 2) if self.session_seconds > 0 else None


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    return v


class Throughput:
    """Non-pad tokens per second between two log points."""

    def __init__(self, tokens: int = 0):
        self.t = time.perf_counter()
        self.tokens = tokens

    def tick(self, tokens: int) -> tuple[float, int, float]:
        now = time.perf_counter()
        dt, dn = now - self.t, tokens - self.tokens
        self.t, self.tokens = now, tokens
        return (dn / dt if dt > 0 else 0.0), dn, dt


def log_callback(train_log: TrainLog) -> Any:
    """A TrainerCallback writing loss, learning rate, grad norm and non-pad tokens/s to train_log.jsonl
    every ``logging_steps`` (the Trainer's tqdm bar shows the same numbers in the terminal)."""
    from transformers import TrainerCallback

    class _LogCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            train_log.rewind(state.global_step)
            if state.global_step > 0:
                train_log.write({"event": "resume", "step": state.global_step, "time": time.time()})
            self.meter = Throughput(state.num_input_tokens_seen)

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "loss" in logs:
                tps, dn, dt = self.meter.tick(state.num_input_tokens_seen)
                train_log.session_tokens += dn
                train_log.session_seconds += dt
                train_log.write(
                    {
                        "step": state.global_step,
                        "epoch": logs.get("epoch"),
                        "loss": logs["loss"],
                        "learning_rate": logs.get("learning_rate"),
                        "grad_norm": logs.get("grad_norm"),
                        "tokens_per_second": round(tps, 2),
                        "mean_token_accuracy": logs.get("mean_token_accuracy"),
                        "num_tokens": state.num_input_tokens_seen,
                        "time": time.time(),
                    }
                )
            elif "eval_loss" in logs:
                train_log.write(
                    {"step": state.global_step, "eval_loss": logs["eval_loss"], "time": time.time()}
                )

    return _LogCallback()


# ----------------------------------------------------------------------------------------------
# model helpers
# ----------------------------------------------------------------------------------------------
def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit bnb weights count their unpacked size (like peft)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            itemsize = p.quant_storage.itemsize if hasattr(p, "quant_storage") else 1
            n = n * 2 * itemsize
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> dict[str, Any]:
    """CUDA max allocated bytes on GPU; the process's max resident set size on CPU."""
    if device == "cuda":
        import torch

        return {
            "peak_memory_bytes": int(torch.cuda.max_memory_allocated()),
            "peak_memory_kind": "cuda_max_allocated",
        }
    import resource

    return {
        "peak_memory_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
        "peak_memory_kind": "cpu_max_rss",
    }


def free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of every linear layer except the output head: what 'all-linear' means (Phi-3 fuses
    qkv_proj and gate_up_proj, so this gives qkv_proj, o_proj, gate_up_proj, down_proj there)."""
    import torch

    skip = {"lm_head", "score", "classifier"}
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod is not out_emb:
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in skip:
                names.add(leaf)
    return sorted(names)


def resolve_target_modules(model: Any, targets: list[str]) -> list[str]:
    if targets == ["all-linear"]:
        return linear_module_names(model)
    present = set(linear_module_names(model))
    missing = [t for t in targets if t not in present]
    if missing:
        raise ValueError(
            f"lora.target_modules {missing} not found among the model's linear layers {sorted(present)}"
        )
    return list(targets)


def lora_config(section: Any, targets: list[str], task_type: str | None) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=section.lora.r,
        lora_alpha=section.lora.alpha,
        lora_dropout=section.lora.dropout,
        target_modules=targets,
        bias="none",
        task_type=task_type,
    )


@dataclass
class Loaded:
    model: Any  # a peft model (LoRA injected)
    tokenizer: Any
    model_path: str
    target_modules: list[str]
    dtype: Any
    quantized: bool


def load_lora_model(
    section: Any,
    backend: str,
    device: str,
    store: Any,
    *,
    unsloth_loader: str = "FastModel",
    task_type: str | None = "CAUSAL_LM",
) -> Loaded:
    """Base causal LM + LoRA, on either backend. The seed is set right before the adapter is created
    (LoRA A is random): same seed, same initial adapter."""
    from dagtune.models import load_tokenizer, resolve_model

    model_path = resolve_model(section.model.name, store, section.model.revision)
    dtype = resolve_dtype(section.model, device)
    quant = use_4bit(section.model, device)
    if backend == "unsloth":
        import unsloth  # noqa: F401  (must come before transformers/peft patches take effect)

        loader = getattr(importlib.import_module("unsloth"), unsloth_loader)
        model, tokenizer = loader.from_pretrained(
            model_name=model_path,
            max_seq_length=section.model.max_seq_length,
            dtype=None if section.model.dtype == "auto" else dtype,
            load_in_4bit=quant,
            full_finetuning=False,
        )
        targets = resolve_target_modules(model, section.lora.target_modules)
        model = loader.get_peft_model(
            model,
            r=section.lora.r,
            target_modules=targets,
            lora_alpha=section.lora.alpha,
            lora_dropout=section.lora.dropout,
            bias="none",
            use_gradient_checkpointing="unsloth" if section.gradient_checkpointing else False,
            random_state=section.seed,
        )
        return Loaded(model, tokenizer, model_path, targets, dtype, quant)

    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(section.model.name, store, section.model.revision)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quant:
        kwargs["quantization_config"] = bnb_config(dtype)
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if quant:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=section.gradient_checkpointing
        )
    targets = resolve_target_modules(model, section.lora.target_modules)
    seed_everything(section.seed)
    model = get_peft_model(model, lora_config(section, targets, task_type))
    return Loaded(model, tokenizer, model_path, targets, dtype, quant)


def ensure_pad_token(tokenizer: Any) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def stop_token_ids(tokenizer: Any, tokens: tuple[str, ...]) -> list[int]:
    vocab = tokenizer.get_vocab()
    return [vocab[t] for t in tokens if t in vocab]


def add_eos_ids(gen_config: Any, ids: list[int]) -> None:
    """Make generation stop at the end-of-turn token(s) as well as the tokenizer's EOS."""
    cur = gen_config.eos_token_id
    cur = [] if cur is None else ([cur] if isinstance(cur, int) else list(cur))
    for i in ids:
        if i not in cur:
            cur.append(i)
    gen_config.eos_token_id = cur if len(cur) != 1 else cur[0]


def save_merged_hf(
    model_path: str,
    adapter_dir: Path,
    out_dir: Path,
    dtype: Any,
    tokenizer: Any,
    stop_ids: list[int] | None = None,
    device: str = "cpu",
) -> None:
    """Reload the base unquantized in ``dtype`` (merging into a 4-bit base would be lossy), apply the
    saved adapter, merge it and write safetensors + tokenizer files + chat template."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    if device == "cuda":
        kwargs["device_map"] = {"": 0}
    base = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    if stop_ids:
        add_eos_ids(merged.generation_config, stop_ids)
    merged.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    del base, merged
    free_memory()


def save_merged_unsloth(model: Any, tokenizer: Any, out_dir: Path, stop_ids: list[int] | None = None) -> None:
    """Unsloth's own 16-bit merge (dequantizes a 4-bit base before merging)."""
    model.save_pretrained_merged(str(out_dir), tokenizer, save_method="merged_16bit")
    if stop_ids:
        from transformers import GenerationConfig

        try:
            gc_ = GenerationConfig.from_pretrained(str(out_dir))
        except OSError:
            gc_ = GenerationConfig()
        add_eos_ids(gc_, stop_ids)
        gc_.save_pretrained(str(out_dir))


def read_split(data_dir: Path, task: str, split: str) -> Any:
    import pandas as pd

    p = Path(data_dir) / task / f"{split}.parquet"
    if not p.is_file():
        raise FileNotFoundError(f"prepare_data artifact has no {task}/{split}.parquet ({p})")
    return pd.read_parquet(p)


def library_backend_info(backend: str) -> dict[str, Any]:
    info: dict[str, Any] = {"backend": backend}
    if backend == "unsloth":
        from importlib import metadata

        try:
            info["unsloth_version"] = metadata.version("unsloth")
        except metadata.PackageNotFoundError:  # pragma: no cover
            pass
    return info


# ----------------------------------------------------------------------------------------------
# benchmark support (benchmarks/train_throughput.py, benchmarks/epoch_real_lengths.py)
# ----------------------------------------------------------------------------------------------
class StepTimer:
    """Wall time of every optimizer step, each ended by a device synchronize, and the peak memory from
    the first step on (reset when training begins, after the model is loaded). ``on_train_begin`` and
    ``on_step_end`` are what the SFT trainer's callback and the classifier loop call."""

    def __init__(self, device: str):
        self.device = device
        self.ends: list[float] = []
        self.t0: float | None = None
        self.peak_allocated_bytes: int | None = None
        self.peak_reserved_bytes: int | None = None
        # Python's cyclic garbage collector: seconds it ran inside each step (a profile of CPU jitter).
        self.gc_seconds = 0.0
        self.gc_marks: list[float] = []
        self._gc_start: float | None = None

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        elif self._gc_start is not None:
            self.gc_seconds += time.perf_counter() - self._gc_start
            self._gc_start = None

    def _sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def on_train_begin(self) -> None:
        self._sync()
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)
        self.t0 = time.perf_counter()

    def on_step_end(self) -> None:
        self._sync()
        self.ends.append(time.perf_counter())
        self.gc_marks.append(self.gc_seconds)

    def on_train_end(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if self.device == "cuda":
            import torch

            self.peak_allocated_bytes = int(torch.cuda.max_memory_allocated())
            self.peak_reserved_bytes = int(torch.cuda.max_memory_reserved())

    def step_times(self) -> list[float]:
        marks = [self.t0 if self.t0 is not None else (self.ends[0] if self.ends else 0.0), *self.ends]
        return [b - a for a, b in zip(marks, marks[1:], strict=False)]

    def step_gc_seconds(self) -> list[float]:
        marks = [0.0, *self.gc_marks]
        return [round(b - a, 4) for a, b in zip(marks, marks[1:], strict=False)]

    def as_callback(self) -> Any:
        from transformers import TrainerCallback

        timer = self

        class _Cb(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                timer.on_train_begin()

            def on_step_end(self, args, state, control, **kw):
                timer.on_step_end()

            def on_train_end(self, args, state, control, **kw):
                timer.on_train_end()

        return _Cb()


def body_token_ids(tokenizer: Any) -> list[int]:
    """Ordinary (non-special, non-added) token ids: filler for benchmark rows that must not contain a
    turn marker by accident."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    skip = set(tok.all_special_ids) | set(tok.get_added_vocab().values())
    return [i for i in range(len(tok)) if i not in skip]
