"""The training nodes driven by the benchmarks (train_throughput.py, epoch_real_lengths.py,
classifier_node_alone.py) through the nodes' public pieces: ``Runtime.load_lora``, the SFT
``build_trainer`` / the classifier's ``build_trainer`` (the node's collation, loss, logging), and the
``StepTimer`` hook with a device synchronize after every step. Nothing here is in a production loop;
what the benchmark adds (rows of given token counts, the garbage collector's seconds per step) lives here.

Contract of ``sft_train_steps`` / ``classifier_train_steps``: train_throughput.py's ``NODE_HOOK_DOC``.
"""

from __future__ import annotations

import gc
import logging
import random
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dagtune import runtime as R
from dagtune.training import common as C


class GcStepTimer(C.StepTimer):
    """The node's StepTimer, synchronized every step, plus the cyclic garbage collector's seconds inside
    each step (a profile of CPU jitter)."""

    def __init__(self, device: str):
        super().__init__(device, sync_every_step=True)
        self.gc_seconds, self.gc_marks, self._gc_start = 0.0, [], None

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        elif self._gc_start is not None:
            self.gc_seconds += time.perf_counter() - self._gc_start
            self._gc_start = None

    def train_begin(self, tokens: int = 0) -> None:
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)
        super().train_begin(tokens)

    def step_end(self, tokens: int = 0) -> None:
        super().step_end(tokens)
        self.gc_marks.append(self.gc_seconds)

    def train_end(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        super().train_end()

    def step_gc_seconds(self) -> list[float]:
        marks = [0.0, *self.gc_marks]
        return [round(b - a, 4) for a, b in zip(marks, marks[1:], strict=False)]

    def peaks(self) -> dict[str, int]:
        if self.peak_allocated_bytes is None:
            return {}
        return {
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "peak_reserved_bytes": self.peak_reserved_bytes,
        }


def body_token_ids(tokenizer: Any) -> list[int]:
    """Ordinary (non-special, non-added) token ids: filler that never holds a turn marker by accident."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    skip = set(tok.all_special_ids) | set(tok.get_added_vocab().values())
    return [i for i in range(len(tok)) if i not in skip]


def _runtime(backend: str, section: Any) -> R.Runtime:
    from dagtune.config import RuntimeConfig

    device = "cuda" if R.cuda_available() else "cpu"
    return R.Runtime.decide(RuntimeConfig(device=device, backend=backend), section.model)


# ----------------------------------------------------------------------------------------------
# SFT nodes
# ----------------------------------------------------------------------------------------------
def bench_section(model_dir: str, *, batch_size: int, grad_accum: int, max_seq_length: int,
                  gradient_checkpointing: bool, load_in_4bit: bool, lora_r: int, lora_alpha: int,
                  lora_dropout: float, target_modules: list[str], packing: bool = False,
                  packed_tokens_per_batch: int = 16384, max_steps: int | None = None, seed: int = 3407,
                  node: str = "train_function_calling") -> Any:  # fmt: skip
    """A training section like pipeline_config.yaml's, for a local model directory. No checkpoint is
    written during a benchmark (checkpoint_every past the run); logging as usual (every 10 steps)."""
    from dagtune import config as K

    cls = K.TrainFunctionCallingConfig if node == "train_function_calling" else K.TrainExtractorConfig
    return cls.model_validate({
        "model": {"name": str(model_dir), "load_in_4bit": load_in_4bit, "max_seq_length": max_seq_length},
        "lora": {"r": lora_r, "alpha": lora_alpha, "dropout": lora_dropout, "target_modules": target_modules},
        "optim": {"learning_rate": 1e-4, "scheduler": "cosine", "warmup_steps": 0, "epochs": 1,
                  "max_steps": max_steps, "batch_size": batch_size, "grad_accum": grad_accum},
        "gradient_checkpointing": gradient_checkpointing, "packing": packing,
        "packed_tokens_per_batch": packed_tokens_per_batch, "log_every": 10, "checkpoint_every": 10**9,
        "seed": seed, "save_merged": False,
    })  # fmt: skip


def marker_rows(tokenizer: Any, shapes: list[tuple[int, int]], seed: int = 0, spec: Any = None) -> list[dict]:
    """Rows of the node's shape with given (prompt, completion) token counts: ``<bos>`` + the user turn
    marker + filler + end of turn + the model turn marker, then filler ending with ``<end_of_turn>``, so
    both the completion mask and Unsloth's marker search find the same completion."""
    from dagtune.training import sft

    spec = spec or sft.FUNCTION_CALLING
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    head, end = [tok.bos_token_id, *enc(spec.instruction_part)], enc(spec.stop_tokens[0])
    tail = enc("<end_of_turn>\n") + enc(spec.response_part)
    body, rng, rows = body_token_ids(tokenizer), random.Random(seed), []
    for p, c in shapes:
        p, c = max(p, len(head) + len(tail) + 1), max(c, len(end) + 1)
        prompt = head + rng.choices(body, k=p - len(head) - len(tail)) + tail
        rows.append({"input_ids": prompt + rng.choices(body, k=c - len(end)) + end,
                     "completion_mask": [0] * p + [1] * c})  # fmt: skip
    return rows


def run_rows(section: Any, rows: list[dict], *, backend: str, workdir: Path, spec: Any = None,
             warm_section: Any = None, loaded: R.Loaded | None = None) -> dict[str, Any]:  # fmt: skip
    """Train ``section`` on ``rows`` with the node's trainer; optionally a short warm-up run first (its
    own trainer over the same loaded model: compilation and autotuning are not timed)."""
    from dagtune.store import ArtifactStore
    from dagtune.training import sft

    spec, workdir = spec or sft.FUNCTION_CALLING, Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rt = _runtime(backend, section)
    t_load = time.perf_counter()
    loaded = loaded or rt.load_lora(section, ArtifactStore(workdir / "store"), loader=spec.unsloth_loader)
    load_s, warm_s = time.perf_counter() - t_load, None
    if warm_section is not None:
        t = time.perf_counter()
        sft.build_trainer(warm_section, spec, rt, loaded, rows, [], workdir / "warm", []).trainer.train()
        R.free_memory()
        warm_s = time.perf_counter() - t
    train_log, timer = C.TrainLog(workdir / "run" / C.TRAIN_LOG), GcStepTimer(rt.device)
    built = sft.build_trainer(section, spec, rt, loaded, rows, [], workdir / "run" / "checkpoints",
                              [C.log_callback(train_log), timer.callback()])  # fmt: skip
    t = time.perf_counter()
    result = built.trainer.train()
    out = {
        "device": rt.device, "backend": backend, "load_s": round(load_s, 2),
        "warm_s": round(warm_s, 2) if warm_s is not None else None,
        "train_wall_s": round(time.perf_counter() - t, 3),
        "train_runtime_s": float(result.metrics.get("train_runtime", 0.0)), "steps": int(result.global_step),
        "step_times_s": timer.step_times(), "gc_s_per_step": timer.step_gc_seconds(),
        "train_loss": float(result.training_loss), "loss_first": train_log.first_loss,
        "loss_last": train_log.last_loss, "num_input_tokens_seen": int(built.trainer.state.num_input_tokens_seen),
        **built.stats, **timer.peaks(), "timings": timer.timings(),
    }  # fmt: skip
    if backend == "unsloth" and section.packing:
        stats = R.unsloth_module("utils.hf_packed_attention").HF_PACKED_ATTENTION_STATS
        out["unsloth_packed_attention_calls"] = dict(stats)
    out["loaded"] = loaded  # the caller may reuse it (popped before JSON)
    del built
    R.free_memory()
    return out


def sft_train_steps(model_dir: str, *, batch_size: int, seq_len: int, warmup_steps: int, timed_steps: int,
                    backend: str = "unsloth", workdir: str | None = None, **model_kw: Any) -> dict[str, Any]:  # fmt: skip
    """NODE_HOOK_DOC for the SFT nodes: fixed-length rows of ``seq_len`` tokens (a short prompt with the
    turn markers, the rest completion), the node's unpacked path, ``batch_size`` per step, no accumulation."""
    if backend == "unsloth":
        R.unsloth_module()  # before transformers
    from transformers import AutoTokenizer

    n = batch_size * (warmup_steps + timed_steps)
    rows = marker_rows(AutoTokenizer.from_pretrained(model_dir), [(16, seq_len - 16)] * n, seed=1)
    sec = bench_section(model_dir, batch_size=batch_size, grad_accum=1, max_seq_length=seq_len,
                        max_steps=warmup_steps + timed_steps, **model_kw)  # fmt: skip
    work = Path(workdir or tempfile.mkdtemp(prefix="dagtune-bench-"))
    r = run_rows(sec, rows, backend=backend, workdir=work)
    r.pop("loaded")
    notes = (f"node: SFTTrainer ({backend}), unpacked path (train_on_responses_only on unsloth), log every 10 "
             f"steps; step times from on_step_end (cuda synchronized); loss {r['loss_first']} -> {r['loss_last']}")  # fmt: skip
    return _hook_result(r["step_times_s"], r["gc_s_per_step"], warmup_steps, batch_size * seq_len, notes, r)


def _hook_result(times: list, gc_s: list, warmup: int, tokens_per_step: int, notes: str, peaks: dict) -> dict:
    out = {"step_times_s": times[warmup:], "gc_s_per_step": gc_s[warmup:],
           "tokens": tokens_per_step * len(times[warmup:]), "notes": notes}  # fmt: skip
    out.update({k: peaks[k] for k in ("peak_allocated_bytes", "peak_reserved_bytes") if k in peaks})
    return out


# ----------------------------------------------------------------------------------------------
# the classifier node
# ----------------------------------------------------------------------------------------------
def classifier_train_steps(model_dir: str, *, batch_size: int, seq_len: int, gradient_checkpointing: bool,
                           load_in_4bit: bool, lora_r: int, lora_alpha: int, lora_dropout: float,
                           target_modules: list[str], warmup_steps: int, timed_steps: int,
                           backend: str = "unsloth", workdir: str | None = None) -> dict[str, Any]:  # fmt: skip
    """NODE_HOOK_DOC for the classifier: the node's ClassifierTrainer (head, collation, weighted
    cross-entropy, clipping, scheduler, logging) on ``batch_size`` rows of exactly ``seq_len`` random
    ordinary tokens per step, no accumulation, no validation."""
    if backend == "unsloth":
        R.unsloth_module()  # before transformers
    from transformers import AutoTokenizer

    from dagtune.config import TrainClassifierConfig
    from dagtune.store import ArtifactStore
    from dagtune.training import classifier as K

    steps = warmup_steps + timed_steps
    sec = TrainClassifierConfig.model_validate({
        "model": {"name": str(model_dir), "load_in_4bit": load_in_4bit, "max_seq_length": seq_len},
        "lora": {"r": lora_r, "alpha": lora_alpha, "dropout": lora_dropout, "target_modules": target_modules},
        "optim": {"learning_rate": 1e-4, "warmup_steps": 0, "max_steps": steps, "batch_size": batch_size,
                  "grad_accum": 1},
        "gradient_checkpointing": gradient_checkpointing, "log_every": 10, "checkpoint_every": 10**9,
        "seed": 3407, "save_merged": False,
    })  # fmt: skip
    work = Path(workdir or tempfile.mkdtemp(prefix="dagtune-bench-cls-"))
    ctx = SimpleNamespace(name="train_classifier", section=sec, scratch=work / "scratch", out=work / "out",
                          store=ArtifactStore(work / "store"), log=logging.getLogger("dagtune.bench"))  # fmt: skip
    rt = _runtime(backend, sec)
    timer = GcStepTimer(rt.device)
    loaded, train_log = C.load(ctx, rt, timer, loader="FastLanguageModel", task_type=None)
    rng = random.Random(1)
    body, n = body_token_ids(AutoTokenizer.from_pretrained(model_dir)), batch_size * steps
    train = K.Encoded([rng.choices(body, k=seq_len) for _ in range(n)], [rng.randrange(2) for _ in range(n)])
    run = K.build_trainer(ctx, rt, loaded, train, K.Encoded([], []), timer, train_log)
    run.trainer.train()
    notes = (f"node: ClassifierTrainer ({rt.backend}), last-token head + weighted CE, clipping, log every 10 "
             f"steps; loss {train_log.first_loss} -> {train_log.last_loss}")  # fmt: skip
    return _hook_result(timer.step_times(), timer.step_gc_seconds(), warmup_steps, batch_size * seq_len, notes,
                        timer.peaks())  # fmt: skip
