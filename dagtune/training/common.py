"""One training engine for the three training nodes.

All three run on ``transformers.Trainer``: the SFT nodes on TRL's ``SFTTrainer`` (a Trainer), the
classifier on ``ClassifierTrainer`` (a Trainer subclass with its own ``compute_loss``). Why Trainer and
not a recipe class of our own: what the next work changes -- ``torch_compile`` and its cache, packing
collators, optimizer choice, CUDA graphs through accelerate, Unsloth's patched trainer -- are switches
of ``TrainingArguments``/``Trainer`` that then apply to all three nodes at once, and the Trainer already
owns checkpointing, RNG state, resume (``weights_only`` loading: no pickle runs), gradient
accumulation with token-count loss normalisation, early stopping and logging. A loop of our own would
have to re-implement each of these a second time (the classifier's old loop did, in 285 lines).

This module holds what the nodes share: the step arithmetic, ``training_args`` (one setup of the
Trainer for every node), the ``train_log.jsonl`` writer and its callback, the progress line (``step i/N,
ETA`` on the ``dagtune`` logger), the ``StepTimer`` hook (the public way benchmarks and the manifest's
``timings`` see the run), checkpoint discovery, and ``run_training`` / ``save_adapter``: resume, train,
the shared metrics, the adapter/merged save. The hardware decisions live in ``dagtune/runtime.py``.

Nothing here imports torch/transformers at module level: ``key_inputs`` runs while planning the DAG.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dagtune.jsonl import read_records
from dagtune.node_process import startup_seconds
from dagtune.runtime import Loaded, Runtime, dtype_name
from dagtune.training import ddp

log = logging.getLogger("dagtune.training")

CHECKPOINT_PREFIX = "checkpoint-"
TRAIN_LOG = "train_log.jsonl"
HF_CHECKPOINT_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")


# ----------------------------------------------------------------------------------------------
# steps and warmup
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


def training_args(
    section: Any, rt: Runtime, out: Path, total: int, warmup: int, cls: Any = None, **extra: Any
) -> Any:
    """The TrainingArguments every node shares (``cls``: TRL's SFTConfig for the SFT nodes)."""
    if cls is None:
        from transformers import TrainingArguments as cls
    o = section.optim
    world_size = ddp.world().world_size
    # batch_size * grad_accum examples per optimizer step whatever the number of ranks (ddp.py)
    micro, accum = ddp.per_device_batch(o.batch_size * o.grad_accum, o.batch_size, world_size)
    base: dict[str, Any] = {
        "output_dir": str(out),
        "per_device_train_batch_size": micro,
        "per_device_eval_batch_size": o.batch_size,
        "gradient_accumulation_steps": accum,
        "learning_rate": o.learning_rate,
        "lr_scheduler_type": o.scheduler,
        "warmup_steps": warmup,
        "max_steps": total,
        "weight_decay": o.weight_decay,
        "max_grad_norm": o.max_grad_norm,
        "optim": rt.optimizer(o.optimizer),
        "logging_steps": section.log_every,
        "logging_first_step": True,
        "save_strategy": "steps",
        "save_steps": section.checkpoint_every,
        "save_total_limit": 2,
        "eval_strategy": "no",
        "seed": section.seed,
        "data_seed": section.seed,
        "report_to": "none",
        "include_num_input_tokens_seen": "non_padding",
        "dataloader_num_workers": 0,
        "disable_tqdm": False,
        "restore_callback_states_from_checkpoint": True,
        # the step's loss is the token-weighted mean over every rank's micro-batches (ddp.py)
        "average_tokens_across_devices": True,
        **rt.precision_args(),
    }
    if world_size > 1:  # every LoRA weight (and the classifier head) takes part in every forward
        base["ddp_find_unused_parameters"] = False
    return cls(**{**base, **extra})


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
def checkpoint_step(p: Path) -> int:
    tail = p.name[len(CHECKPOINT_PREFIX) :]
    return int(tail) if p.name.startswith(CHECKPOINT_PREFIX) and tail.isdigit() else -1


def checkpoint_complete(p: Path, required: tuple[str, ...]) -> bool:
    if not all((p / f).is_file() and (p / f).stat().st_size > 0 for f in required):
        return False
    try:
        for f in required:
            if f.endswith(".json"):
                json.loads((p / f).read_text())
    except (OSError, ValueError):
        return False
    return True


def last_checkpoint(
    directory: Path, required: tuple[str, ...] = HF_CHECKPOINT_FILES, remove_incomplete: bool = False
) -> Path | None:
    """The newest complete ``checkpoint-N`` under ``directory``. HF Trainer writes a checkpoint's files one
    after another (trainer_state.json last), so a kill mid-save leaves an incomplete directory: it is
    skipped (and removed with ``remove_incomplete``, which only the process about to train may ask for:
    the node holds the key's lock, nobody else writes there) and the previous one is used."""
    if not directory.is_dir():
        return None
    cands = [p for p in directory.iterdir() if p.is_dir() and checkpoint_step(p) >= 0]
    for p in sorted(cands, key=checkpoint_step, reverse=True):
        if checkpoint_complete(p, required):
            return p
        if remove_incomplete:
            log.warning("removing incomplete checkpoint %s (killed while saving)", p)
            shutil.rmtree(p, ignore_errors=True)
    return None


# ----------------------------------------------------------------------------------------------
# train_log.jsonl
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainLog:
    """Append-only JSONL of training records, kept in ``ctx.scratch`` so a resumed run continues it and
    copied into the artifact at the end (MLflow logs the curves from it)."""

    path: Path
    session_tokens: int = 0
    session_seconds: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records = read_records(self.path)

    def first_last(self, key: str) -> tuple[Any, Any]:
        """The first and the last logged value of ``key`` (None, None when none was logged)."""
        values = [r[key] for r in self.records if r.get(key) is not None]
        return (values[0], values[-1]) if values else (None, None)

    @property
    def first_loss(self) -> float | None:
        return self.first_last("loss")[0]

    @property
    def last_loss(self) -> float | None:
        return self.first_last("loss")[1]

    def rewind(self, step: int) -> None:
        """Drop records past ``step`` (the killed attempt went on after its last checkpoint)."""
        self.records = [r for r in self.records if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        record = {k: _plain(v) for k, v in record.items()}
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    @property
    def tokens_per_second(self) -> float | None:
        return round(self.session_tokens / self.session_seconds, 2) if self.session_seconds > 0 else None


def _plain(v: Any) -> Any:
    v = v.item() if hasattr(v, "item") else v
    return None if isinstance(v, float) and not math.isfinite(v) else v


def log_callback(train_log: TrainLog) -> Any:
    """A TrainerCallback writing loss, learning rate, grad norm and non-pad tokens/s to train_log.jsonl
    every ``logging_steps``, and the evaluations made during training (the final one after training is
    the manifest's, not a curve point)."""
    from transformers import TrainerCallback

    class _LogCallback(TrainerCallback):
        training = False

        def on_train_begin(self, args, state, control, **kw):
            if not state.is_world_process_zero:  # under torchrun only rank 0 writes the log
                return
            train_log.rewind(state.global_step)
            if state.global_step > 0:
                train_log.write({"event": "resume", "step": state.global_step, "time": time.time()})
            self.training, self.t, self.tokens = True, time.perf_counter(), state.num_input_tokens_seen

        def on_train_end(self, args, state, control, **kw):
            self.training = False

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if not state.is_world_process_zero:
                return
            if "loss" in logs:
                now, tokens = time.perf_counter(), state.num_input_tokens_seen
                dt, dn = now - self.t, tokens - self.tokens
                self.t, self.tokens = now, tokens
                train_log.session_tokens += dn
                train_log.session_seconds += dt
                keep = ("epoch", "loss", "learning_rate", "grad_norm", "mean_token_accuracy")
                train_log.write({"step": state.global_step, **{k: logs.get(k) for k in keep},
                                 "tokens_per_second": round(dn / dt, 2) if dt > 0 else 0.0,
                                 "num_tokens": tokens, "time": time.time()})  # fmt: skip
            elif self.training and any(k.startswith("eval_") for k in logs):
                evals = {k: v for k, v in logs.items() if k.startswith("eval_") and "runtime" not in k
                         and "per_second" not in k}  # fmt: skip
                train_log.write({"step": state.global_step, **evals, "time": time.time()})
                self.t = time.perf_counter()  # evaluation time is not training throughput

    return _LogCallback()


# ----------------------------------------------------------------------------------------------
# the progress line
# ----------------------------------------------------------------------------------------------
PROGRESS_EVERY_FRACTION = 0.1  # a line every tenth of the planned steps ...
PROGRESS_EVERY_SECONDS = 30.0  # ... or every 30 s, whichever comes first, and one at the last step


def format_duration(seconds: float) -> str:
    """``45s``, ``1m12s``, ``2h05m``: short enough for a progress line."""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


@dataclass
class Progress:
    """When a training node says how far it is, and what: ``node X: step i/N (p%), loss L, r steps/s,
    ETA t`` on the ``dagtune.training`` logger, so it reaches the CLI and Prefect's flow-run logs (the
    Trainer's own tqdm bar goes to the node's log file). ``N`` is the planned maximum: a classifier that
    stops early ends below it, and says so. The rate counts this session's steps only (a resumed run
    does not claim the steps of the killed attempt)."""

    node: str
    every_fraction: float = PROGRESS_EVERY_FRACTION
    every_seconds: float = PROGRESS_EVERY_SECONDS
    clock: Callable[[], float] = time.monotonic
    logger: logging.Logger = log
    total: int = 0
    start_step: int = 0
    t0: float = 0.0
    last_step: int = 0
    last_t: float = 0.0
    loss: float | None = None

    def begin(self, step: int, total: int) -> None:
        self.total, self.start_step, self.last_step = total, step, step
        self.t0 = self.last_t = self.clock()

    def due(self, step: int) -> bool:
        stride = max(1, math.ceil(self.every_fraction * self.total))
        return (
            step >= self.total
            or step - self.last_step >= stride
            or self.clock() - self.last_t >= self.every_seconds
        )

    def line(self, step: int, now: float) -> str:
        done, elapsed = step - self.start_step, now - self.t0
        rate = done / elapsed if done > 0 and elapsed > 0 else None
        pct = 100 * step // self.total if self.total else 100
        parts = [f"node {self.node}: step {step}/{self.total} ({pct}%)"]
        parts += [f"loss {self.loss:.4g}"] if self.loss is not None else []
        parts += [f"{rate:.3g} steps/s", f"ETA {format_duration((self.total - step) / rate)}"] if rate else []
        return ", ".join(parts)

    def emit(self, step: int, note: str = "") -> None:
        now = self.clock()
        self.logger.info("%s%s", self.line(step, now), note)
        self.last_step, self.last_t = step, now

    def end(self, step: int) -> None:
        """The last step gets a line; a run that ended before its planned steps says it stopped early."""
        if step < self.total:
            self.emit(step, f", stopped early after {format_duration(self.clock() - self.t0)}")
        elif step != self.last_step:
            self.emit(step)


def progress_callback(node: str, **kw: Any) -> Any:
    """A TrainerCallback driving ``Progress``. A line due at a step where the Trainer also logs waits for
    that log, so it carries the step's own loss (DefaultFlowCallback, which decides ``should_log``, runs
    before the node's callbacks)."""
    from transformers import TrainerCallback

    progress = Progress(node, **kw)

    class _ProgressCallback(TrainerCallback):
        pending: int | None = None

        def on_train_begin(self, args, state, control, **kw):
            progress.begin(state.global_step, state.max_steps)
            self.pending = None

        def on_step_end(self, args, state, control, **kw):
            if progress.due(state.global_step):
                if control.should_log:
                    self.pending = state.global_step
                else:
                    progress.emit(state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and logs.get("loss") is not None:
                progress.loss = float(logs["loss"])
                if self.pending == state.global_step:
                    self.pending = None
                    progress.emit(state.global_step)

        def on_train_end(self, args, state, control, **kw):
            progress.end(state.global_step)

    return _ProgressCallback()


def node_callbacks(node: str, train_log: TrainLog, timer: StepTimer) -> list[Any]:
    """The callbacks every training node gives its Trainer: train_log.jsonl, the timer, the progress line."""
    return [log_callback(train_log), timer.callback(), progress_callback(node)]


# ----------------------------------------------------------------------------------------------
# the timing hook
# ----------------------------------------------------------------------------------------------
class StepTimer:
    """A training node's timing hook (its ``callback()`` goes into the Trainer): the first optimizer step
    (compile, autotune; ends synchronized), the steady steps, their non-pad tokens, peak GPU memory; the
    ``phase``s: start-up (its process's start to here, just before the load), load, prepare (tokenize,
    build the trainer), validate, merge, save, and checkpoint writes (also in the steady time).
    ``sync_every_step`` (benchmarks) synchronizes after every step so each one's time is its own."""

    def __init__(self, device: str, sync_every_step: bool = False):
        self.device = device
        self.sync_every_step = sync_every_step
        phases = ("load_s", "prepare_s", "checkpoint_s", "validate_s", "merge_s", "save_s")
        self.phases: dict[str, float | None] = {"startup_s": startup_seconds(), **dict.fromkeys(phases)}
        self.t0: float | None = None
        self.t_end: float | None = None
        self.ends, self.tokens = [], []  # step end times, tokens seen at each
        self.peak_allocated_bytes: int | None = None
        self.peak_reserved_bytes: int | None = None

    def _sync(self) -> float:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def train_begin(self, tokens: int = 0) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        self.t0, self.ends, self.tokens = self._sync(), [], [tokens]

    def step_end(self, tokens: int = 0) -> None:
        self.ends.append(self._sync() if self.sync_every_step or not self.ends else time.perf_counter())
        self.tokens.append(tokens)

    def add(self, phase: str, since: float) -> None:
        self.phases[phase] = (self.phases[phase] or 0.0) + time.perf_counter() - since

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.add(name, t)

    def train_end(self) -> None:
        self.t_end = self._sync()
        if self.device == "cuda":
            import torch

            self.peak_allocated_bytes = int(torch.cuda.max_memory_allocated())
            self.peak_reserved_bytes = int(torch.cuda.max_memory_reserved())

    def step_times(self) -> list[float]:
        marks = [self.t0 or 0.0, *self.ends]
        return [b - a for a, b in zip(marks, marks[1:], strict=False)]

    def timings(self) -> dict[str, Any]:
        first = self.ends[0] - self.t0 if self.ends and self.t0 is not None else None
        steady = (self.t_end - self.ends[0]) if len(self.ends) > 1 and self.t_end else None
        steady_tokens = self.tokens[-1] - self.tokens[1] if len(self.tokens) > 2 else 0
        gib = self.peak_allocated_bytes / 2**30 if self.peak_allocated_bytes is not None else None
        rnd = lambda x: round(x, 3) if x is not None else None  # noqa: E731
        return {
            **{k: rnd(v) for k, v in self.phases.items()},
            "first_step_s": rnd(first),
            "steady_s": rnd(steady),
            "steady_tokens_per_s": round(steady_tokens / steady, 1) if steady else None,
            "peak_mem_gib": rnd(gib),
        }

    def callback(self) -> Any:
        from transformers import TrainerCallback

        timer = self

        class _Cb(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                timer.train_begin(state.num_input_tokens_seen)

            def on_step_end(self, args, state, control, **kw):
                timer.step_end(state.num_input_tokens_seen)

            def on_save(self, args, state, control, **kw):
                timer.add("checkpoint_s", timer.ends[-1])

            def on_train_end(self, args, state, control, **kw):
                timer.train_end()

        return _Cb()


# ----------------------------------------------------------------------------------------------
# one node run: setup -> run_training -> finish
# ----------------------------------------------------------------------------------------------
@dataclass
class NodeRun:
    """Everything a node's setup prepared: the trainer is ready to ``train()``."""

    rt: Runtime
    loaded: Loaded
    trainer: Any
    train_log: TrainLog
    timer: StepTimer
    ckpt_dir: Path
    n_train: int
    n_val: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    stats: dict[str, Any] = field(default_factory=dict)
    trainable_params: int = 0
    total_params: int = 0


def decide_runtime(ctx: Any) -> Runtime:
    """The node's Runtime; under torchrun this process also joins the group on its own GPU."""
    state_dir = getattr(ctx.settings, "state_dir", None) if ctx.settings is not None else None
    rt = Runtime.decide(ctx.runtime, ctx.section.model, state_dir, gpus=ctx.section.gpus)
    ddp.process_group(rt.device)
    return rt


def load(ctx: Any, rt: Runtime, timer: StepTimer, **kw: Any) -> tuple[Loaded, TrainLog]:
    """Base + LoRA through the runtime (timed), and the node's train log in its scratch directory."""
    from dagtune.models import resolve_model

    model = ctx.section.model  # under torchrun rank 0 builds or downloads the base model, then the others
    with timer.phase("load_s"):
        ddp.main_first(lambda: resolve_model(model.name, ctx.store, model.revision))
        loaded = rt.load_lora(ctx.section, ctx.store, **kw)
    return loaded, TrainLog(ctx.scratch / TRAIN_LOG)


def run_training(ctx: Any, run: NodeRun, required: tuple[str, ...] = HF_CHECKPOINT_FILES) -> dict[str, Any]:
    """Train, resuming from the newest complete checkpoint in ctx.scratch; the metrics both kinds share."""
    if ddp.is_main():  # one process removes incomplete checkpoints, then every rank picks the same one
        last_checkpoint(run.ckpt_dir, required, remove_incomplete=True)
    ddp.barrier()
    resume = last_checkpoint(run.ckpt_dir, required)
    resumed_from = checkpoint_step(resume) if resume else 0
    ctx.log.info("%s: %d examples, %d steps (%d/epoch, warmup %d), backend %s on %s%s", ctx.name, run.n_train,
                 run.total_steps, run.steps_per_epoch, run.warmup_steps, run.rt.backend, run.rt.device,
                 f", resuming from step {resumed_from}" if resume else "")  # fmt: skip
    cpu0 = time.process_time()
    result = run.trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    steps = int(result.global_step)
    return {
        **run.rt.manifest(),
        "base_model": ctx.section.model.name,
        "base_model_path": run.loaded.model_path,
        "target_modules": run.loaded.target_modules,
        "trainable_params": run.trainable_params,
        "total_params": run.total_params,
        "train_examples": run.n_train,
        "val_examples": run.n_val,
        **run.stats,
        "steps": steps,
        "planned_steps": run.total_steps,
        "steps_per_epoch": run.steps_per_epoch,
        "warmup_steps": run.warmup_steps,
        "resumed_from_step": resumed_from,
        "steps_this_run": steps - resumed_from,
        "train_loss": float(result.training_loss),
        "train_loss_first": run.train_log.first_loss,
        "train_loss_last": run.train_log.last_loss,
        "tokens_per_second": run.train_log.tokens_per_second,
        "train_seconds": round(float(result.metrics.get("train_runtime", 0.0)), 3),
        "train_cpu_seconds": round(time.process_time() - cpu0, 3),
        "world_size": run.trainer.args.world_size,
        "per_device_train_batch_size": run.trainer.args.per_device_train_batch_size,
        "per_device_grad_accum": run.trainer.args.gradient_accumulation_steps,
    }


def save_adapter(ctx: Any, run: NodeRun, stop_ids: list[int] | None = None) -> dict[str, Any]:
    """adapter/, tokenizer/, train_log.jsonl, and merged/ (16-bit for GGUF; fp32 on CPU) through the
    runtime; the training copy of the model is dropped before the hf merge reloads the base."""
    out, section = ctx.out, ctx.section
    with run.timer.phase("save_s"):
        run.loaded.model.save_pretrained(str(out / "adapter"))
        run.loaded.tokenizer.save_pretrained(str(out / "tokenizer"))
        shutil.copyfile(run.train_log.path, out / TRAIN_LOG)
    merged_dtype = run.rt.merged_dtype(section)
    if section.save_merged:
        run.trainer = None
        with run.timer.phase("merge_s"):
            run.rt.save_merged(run.loaded, out / "adapter", out / "merged", merged_dtype, stop_ids)
    return {"merged_dtype": dtype_name(merged_dtype) if section.save_merged else None}


def node_metrics(run: NodeRun, t0: float) -> dict[str, Any]:
    """The tail of every training node's metrics: wall time, peak memory, the per-phase timings."""
    return {
        "node_seconds": round(time.time() - t0, 3),
        **run.rt.peak_memory(),
        "timings": run.timer.timings(),
    }
