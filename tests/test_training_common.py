"""Training helpers (dagtune/training/common.py) and the fixtures the other test_training_* files share:
a store with the tiny models built once per session, tiny prepare_data-shaped parquet files rendered
with the tiny tokenizers' real chat templates, and a hand-made NodeContext."""

from __future__ import annotations

import functools
import json
import logging
import random
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from dagtune import runtime as R
from dagtune.config import OptimConfig, RuntimeConfig, load_config
from dagtune.pipeline import NodeContext
from dagtune.store import Artifact, ArtifactStore
from dagtune.training import common as C

# ----------------------------------------------------------------------------------------------
# shared fixtures (imported by test_training_sft.py / test_training_classifier.py)
# ----------------------------------------------------------------------------------------------
CITIES = ("Cairo", "Dubai", "Amman", "Riyadh", "Tunis", "Beirut", "Doha", "Rabat")
PEOPLE = ("Ahmed", "Sara", "Omar", "Layla", "Yousef", "Mariam")
TIMES = ("7am", "9pm", "noon", "5pm", "6am")
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": desc,
            "parameters": {
                "type": "object",
                "properties": {arg: {"type": "string", "description": arg}},
                "required": [arg],
            },
        },
    }
    for name, desc, arg in (
        ("get_weather", "Weather of a city", "city"),
        ("call_contact", "Phone call to a contact", "name"),
        ("set_alarm", "Set an alarm", "time"),
    )
]
DEVELOPER = "You are a model that can do function calling with the following functions"
NO_CALL = "No tool is needed for this request."


@functools.lru_cache(maxsize=1)
def shared_store() -> ArtifactStore:
    """The tiny base models, built once per test session (a few seconds each)."""
    return ArtifactStore(tempfile.mkdtemp(prefix="dagtune-train-store-"))


def tokenizer(name: str):
    from dagtune.models import load_tokenizer

    return load_tokenizer(name, shared_store())


def _split(rows: list[dict], n_val: int, n_test: int) -> dict[str, list[dict]]:
    return {"validation": rows[:n_val], "test": rows[n_val : n_val + n_test], "train": rows[n_val + n_test :]}


def _fc_rows(n: int, seed: int) -> list[dict]:
    tok = tokenizer("tiny-functiongemma")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = rng.choice(("get_weather", "call_contact", "set_alarm", "none"))
        if kind == "get_weather":
            v = rng.choice(CITIES)
            user, args = (
                rng.choice(("weather in {} please", "what is the weather in {}?")).format(v),
                {"city": v},
            )
        elif kind == "call_contact":
            v = rng.choice(PEOPLE)
            user, args = rng.choice(("call {} now", "please phone {}")).format(v), {"name": v}
        elif kind == "set_alarm":
            v = rng.choice(TIMES)
            user, args = rng.choice(("wake me at {}", "set an alarm for {}")).format(v), {"time": v}
        else:
            user, args = rng.choice(("hello, how are you?", "thanks a lot", "who are you?")), None
        msgs = [{"role": "developer", "content": DEVELOPER}, {"role": "user", "content": user}]
        prompt = tok.apply_chat_template(msgs, tools=TOOLS, tokenize=False, add_generation_prompt=True)
        if args is None:
            reply = {"role": "assistant", "content": NO_CALL}
        else:
            reply = {
                "role": "assistant",
                "tool_calls": [{"type": "function", "function": {"name": kind, "arguments": args}}],
            }
        full = tok.apply_chat_template(msgs + [reply], tools=TOOLS, tokenize=False)
        assert full.startswith(prompt)
        rows.append({"id": f"fc-{i}", "prompt": prompt, "completion": full[len(prompt) :]})
    return rows


def _chat_rows(model: str, n: int, seed: int, make) -> list[dict]:
    tok = tokenizer(model)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        user, answer, extra = make(rng)
        msgs = [{"role": "user", "content": user}]
        prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": answer}], tokenize=False)
        assert full.startswith(prompt)
        rows.append({"id": f"{model}-{i}", "prompt": prompt, "completion": full[len(prompt) :], **extra})
    return rows


def _extract(rng: random.Random):
    a, b = rng.randint(2, 30), rng.randint(2, 9)
    op, sym = rng.choice((("bought {} boxes of {} pens", "*"), ("had {} apples and got {} more", "+")))
    c = a * b if sym == "*" else a + b
    return f"Extract the equation: Omar {op.format(a, b)}, so {c} in total.", f"{a}{sym}{b}={c}", {}


def _classify(rng: random.Random):
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    label = rng.random() < 0.4
    shown = a + b + (rng.choice((-1, 1)) * rng.randint(1, 5) if label else 0)
    user = f"Problem: Omar has {a} pens and buys {b} more. How many pens?\nSolution: {a} + {b} = {shown}. Answer: {shown}"
    return user, "", {"label": int(label)}


def write_task(root: Path, task: str, rows: list[dict], n_val: int, n_test: int) -> None:
    tok_counts = {
        "function_calling": "tiny-functiongemma",
        "extractor": "tiny-gemma3",
        "classifier": "tiny-phi3",
    }
    tok = tokenizer(tok_counts[task])
    for split, part in _split(rows, n_val, n_test).items():
        df = pd.DataFrame(part)
        df["text"] = df["prompt"] + df["completion"]
        df["n_tokens"] = [len(tok(t, add_special_tokens=False).input_ids) for t in df["text"]]
        df["truncated"] = False
        (root / task).mkdir(parents=True, exist_ok=True)
        df.to_parquet(root / task / f"{split}.parquet")


@functools.lru_cache(maxsize=4)
def prepared_data(n_fc: int = 240, n_ex: int = 200, n_cls: int = 200) -> Artifact:
    """A directory shaped like the prepare_data artifact: <task>/{train,validation,test}.parquet."""
    root = Path(tempfile.mkdtemp(prefix="dagtune-train-data-"))
    write_task(root, "function_calling", _fc_rows(n_fc, 1), 24, 16)
    write_task(root, "extractor", _chat_rows("tiny-gemma3", n_ex, 2, _extract), 20, 10)
    # The classifier prompt is the tutor prompt rendered with Phi's template (ends with <|assistant|>).
    cls = [dict(r, completion="") for r in _chat_rows("tiny-phi3", n_cls, 3, _classify)]
    write_task(root, "classifier", cls, 40, 10)
    (root / "manifest.json").write_text(json.dumps({"node": "prepare_data"}))
    return Artifact("prepare_data", "test", str(root))


def tiny_section(node: str, **updates):
    """The node's section from the tiny profile of pipeline_config.yaml, with nested updates."""
    cfg = load_config(profile="tiny")
    sec = getattr(cfg, node)
    data = sec.model_dump()
    for k, v in updates.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k].update(v)
        else:
            data[k] = v
    return type(sec).model_validate(data)


def make_ctx(tmp: Path, node: str, section, data: Artifact | None = None, runtime=None) -> NodeContext:
    out, scratch = tmp / "out", tmp / "scratch"
    out.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    return NodeContext(
        name=node,
        out=out,
        scratch=scratch,
        section=section,
        runtime=runtime or RuntimeConfig(device="cpu", backend="hf"),
        upstream={"prepare_data": data or prepared_data()},
        store=shared_store(),
        settings=None,  # type: ignore[arg-type]
    )


def tiny_ctx(tmp: Path, node: str, **updates) -> NodeContext:
    """make_ctx for ``node`` with its tiny-profile section, updated by ``updates`` (see tiny_section)."""
    return make_ctx(tmp, node, tiny_section(node, **updates))


PROGRESS_LINE = re.compile(
    r"node (?P<node>\S+): step (?P<i>\d+)/(?P<n>\d+) \((?P<pct>\d+)%\), loss \S+, \S+ steps/s, "
    r"ETA (\d+h\d\dm|\d+m\d\ds|\d+s)(?P<note>.*)$"
)


@contextmanager
def progress_lines() -> Iterator[list[str]]:
    """The messages of the ``dagtune.training`` logger while the block runs, at INFO (as the CLI and a
    worker set dagtune's level)."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("dagtune.training")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def progress_steps(lines: list[str], node: str) -> list[tuple[int, int, str]]:
    """(step, planned steps, note) of each progress line of ``node``; every such line has loss, rate, ETA."""
    mine = [line for line in lines if line.startswith(f"node {node}: step ")]
    matches = [PROGRESS_LINE.match(line) for line in mine]
    assert mine and all(matches), mine
    return [(int(m["i"]), int(m["n"]), m["note"]) for m in matches if m]


# ----------------------------------------------------------------------------------------------
# unit tests of common.py
# ----------------------------------------------------------------------------------------------
def test_plan_steps_matches_trainer_arithmetic():
    o = OptimConfig(batch_size=8, grad_accum=4, epochs=1)
    assert C.plan_steps(320, o) == (10, 10)  # 40 micro-batches / 4
    assert C.plan_steps(321, o) == (11, 11)  # 41 micro-batches -> a last partial step
    assert C.plan_steps(320, OptimConfig(batch_size=8, grad_accum=4, epochs=2.5)) == (10, 25)
    assert C.plan_steps(320, OptimConfig(batch_size=8, grad_accum=1, max_steps=7)) == (40, 7)
    with pytest.raises(ValueError):
        C.plan_steps(0, o)


def test_warmup_is_capped_for_small_datasets():
    # The FunctionGemma recipe: 200 warmup steps, capped to 10% of a small run.
    assert C.warmup_steps(OptimConfig(warmup_steps=200, max_warmup_fraction=0.1), 40) == 4
    assert C.warmup_steps(OptimConfig(warmup_steps=200, max_warmup_fraction=0.1), 5000) == 200
    assert C.warmup_steps(OptimConfig(warmup_ratio=0.1, max_warmup_fraction=0.1), 40) == 4
    assert C.warmup_steps(OptimConfig(warmup_ratio=0.05, max_warmup_fraction=0.1), 100) == 5
    assert C.warmup_steps(OptimConfig(), 100) == 0


def test_resolve_backend(monkeypatch):
    cpu_auto = RuntimeConfig(device="cpu", backend="auto")
    assert R.resolve_backend(cpu_auto) == "hf"
    assert R.resolve_backend(RuntimeConfig(device="cpu", backend="hf")) == "hf"
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        R.resolve_backend(RuntimeConfig(device="cpu", backend="unsloth"))
    monkeypatch.setattr(R, "unsloth_installed", lambda: False)
    with pytest.raises(RuntimeError, match="not installed"):
        R.resolve_backend(RuntimeConfig(device="cuda", backend="unsloth"))
    assert R.resolve_backend(RuntimeConfig(device="cuda", backend="auto")) == "hf"
    monkeypatch.setattr(R, "unsloth_installed", lambda: True)
    assert R.resolve_backend(RuntimeConfig(device="cuda", backend="auto")) == "unsloth"
    assert R.resolve_backend(RuntimeConfig(device="cuda", backend="unsloth")) == "unsloth"
    monkeypatch.setattr(R, "cuda_available", lambda: False)
    assert R.resolve_device("auto") == "cpu"
    assert R.resolve_backend(RuntimeConfig(device="auto", backend="auto")) == "hf"


def test_last_checkpoint_skips_and_removes_incomplete(tmp_path):
    def ckpt(step: int, files: dict[str, str]):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        for f, text in files.items():
            (d / f).write_text(text)
        return d

    full = {f: "{}" if f.endswith(".json") else "x" for f in C.HF_CHECKPOINT_FILES}
    assert C.last_checkpoint(tmp_path / "missing") is None
    ckpt(20, full)
    ckpt(40, full)
    ckpt(60, {**full, "trainer_state.json": '{"global_st'})  # killed while writing the state
    ckpt(80, {"adapter_model.safetensors": "x"})  # killed right after the weights
    (tmp_path / "checkpoint-x").mkdir()
    assert C.last_checkpoint(tmp_path) == tmp_path / "checkpoint-40"
    assert (tmp_path / "checkpoint-60").exists()  # only looked at
    assert C.last_checkpoint(tmp_path, remove_incomplete=True) == tmp_path / "checkpoint-40"
    assert not (tmp_path / "checkpoint-60").exists() and not (tmp_path / "checkpoint-80").exists()
    assert (tmp_path / "checkpoint-20").exists()


def test_train_log_rewinds_after_a_kill(tmp_path):
    p = tmp_path / "train_log.jsonl"
    log = C.TrainLog(p)
    for s in (1, 5, 10, 15):
        log.write({"step": s, "loss": 10.0 - s})
    with open(p, "a") as f:
        f.write('{"step": 20, "lo')  # cut by SIGKILL
    log2 = C.TrainLog(p)
    assert [r["step"] for r in log2.records] == [1, 5, 10, 15]
    log2.rewind(10)
    assert [json.loads(x)["step"] for x in p.read_text().splitlines()] == [1, 5, 10]
    assert (log2.first_loss, log2.last_loss) == (9.0, 0.0)
    log2.write({"step": 15, "loss": float("nan"), "grad_norm": None})
    assert json.loads(p.read_text().splitlines()[-1])["loss"] is None


def test_train_log_first_last_skips_records_without_the_value(tmp_path):
    log = C.TrainLog(tmp_path / "train_log.jsonl")
    assert log.first_last("mean_token_accuracy") == (None, None) and log.first_loss is None
    for record in (
        {"step": 1, "loss": 3.0},
        {"step": 2, "loss": 2.0, "mean_token_accuracy": 0.4},
        {"event": "resume", "step": 2},
        {"step": 3, "loss": 1.0, "mean_token_accuracy": 0.6},
        {"step": 4, "mean_token_accuracy": None},
    ):
        log.write(record)
    assert log.first_last("mean_token_accuracy") == (0.4, 0.6)
    assert (log.first_loss, log.last_loss) == (3.0, 1.0)


def test_key_inputs_record_backend_device_and_model(tmp_path, monkeypatch):
    from dagtune.training import classifier, sft

    monkeypatch.setenv("DAGTUNE_ARTIFACT_ROOT", str(tmp_path))
    cfg = load_config(profile="tiny")
    fc = sft.key_inputs_function_calling(cfg)
    assert fc["backend"] == "hf" and fc["device"] == "cpu"
    assert fc["model"]["tiny"] == "tiny-functiongemma"
    assert sft.key_inputs_extractor(cfg)["model"]["tiny"] == "tiny-gemma3"
    assert classifier.key_inputs(cfg)["model"]["tiny"] == "tiny-phi3"
    gpu = cfg.model_copy(update={"runtime": RuntimeConfig(device="cuda", backend="hf")})
    assert sft.key_inputs_function_calling(gpu)["device"] == "cuda"


def test_linear_module_names_all_linear():
    from transformers import AutoModelForCausalLM

    from dagtune.models import resolve_model

    phi = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-phi3", shared_store()))
    assert R.resolve_target_modules(phi, ["all-linear"]) == [
        "down_proj",
        "gate_up_proj",
        "o_proj",
        "qkv_proj",
    ]
    gem = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-gemma3", shared_store()))
    assert R.resolve_target_modules(gem, ["all-linear"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    with pytest.raises(ValueError, match="not found"):
        R.resolve_target_modules(phi, ["q_proj"])
    trainable, total = R.count_parameters(gem)
    assert trainable == total == sum(p.numel() for p in gem.parameters())


def test_count_parameters_counts_4bit_unpacked():
    class Parameter:
        def __init__(self, n, grad):
            self.n, self.requires_grad = n, grad

        def numel(self):
            return self.n

    class Params4bit(Parameter):
        pass

    m = SimpleNamespace(parameters=lambda: [Parameter(10, True), Params4bit(100, False)])
    # A packed 4-bit tensor of 100 uint8 holds 200 weights.
    assert R.count_parameters(m) == (10, 210)


def test_project_seed_is_the_training_seed_unless_a_section_sets_one(tmp_path):
    import yaml

    from dagtune.config import DEFAULT_CONFIG

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["project"]["seed"] = 11
    raw["train_extractor"]["seed"] = 5
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    cfg = load_config(p, profile="tiny")
    assert cfg.train_function_calling.seed == cfg.train_classifier.seed == 11
    assert cfg.train_extractor.seed == 5
    assert "packing" not in type(cfg.train_classifier).model_fields, "the classifier does not pack"


def test_format_duration():
    durations = [C.format_duration(s) for s in (0, 45.4, 72, 3599, 7500)]
    assert durations == ["0s", "45s", "1m12s", "59m59s", "2h05m"]


def test_progress_every_tenth_or_30_seconds_and_at_the_last_step():
    """The cadence and the line, on a fake clock: 0.2 s a step, one slow step of 31 s at step 60."""
    now = [0.0]
    progress = C.Progress("train_x", clock=lambda: now[0])
    progress.begin(0, 250)
    with progress_lines() as lines:
        for step in range(1, 251):
            now[0] += 31.0 if step == 60 else 0.2
            progress.loss = 2.0 - step / 250
            if progress.due(step):
                progress.emit(step)
        progress.end(250)
    assert [s for s, _, _ in progress_steps(lines, "train_x")] == [25, 50, 60, *range(85, 250, 25), 250]
    assert lines[0] == "node train_x: step 25/250 (10%), loss 1.9, 5 steps/s, ETA 45s"
    assert lines[-1].startswith("node train_x: step 250/250 (100%), loss 1, ")
    assert lines[-1].endswith("ETA 0s")


def test_progress_after_resume_and_early_stop():
    """A resumed session's rate counts its own steps; a run ending below N says it stopped early."""
    now = [0.0]
    progress = C.Progress("train_classifier", clock=lambda: now[0])
    progress.begin(100, 250)
    now[0], progress.loss = 10.0, 0.5
    assert progress.due(125) and progress.line(125, now[0]).endswith("2.5 steps/s, ETA 50s")
    with progress_lines() as lines:
        progress.emit(125)
        now[0] = 12.0
        progress.end(130)
    stopped = ", stopped early after 12s"
    assert progress_steps(lines, "train_classifier") == [(125, 250, ""), (130, 250, stopped)]
