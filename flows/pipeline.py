"""The dagtune pipeline flow: wiring only.

Nodes (each an idempotent, content-addressed task in ``tasks/``; logic in ``dagtune/``):

1. ``prepare_data``: the three datasets, validated, split, rendered in each model's chat template.
2. ``train_function_calling``, ``train_extractor``, ``train_classifier``: LoRA fine-tunes (Unsloth on
   GPU, transformers + peft + TRL on CPU); independent, they run concurrently where training slots allow.
3. ``evaluate``: every model against its base on the test split, and the two-stage math verdict.
4. ``convert_gguf``: the generative models to GGUF (Q8_0), parity-checked against HF in llama.cpp.
5. ``register``: MLflow runs, registered versions with lineage tags, aliases and the promotion gate.
"""

from __future__ import annotations

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from dagtune.config import load_config
from tasks.convert_gguf import convert_gguf
from tasks.evaluate import evaluate
from tasks.prepare_data import prepare_data
from tasks.register import register
from tasks.train_classifier import train_classifier
from tasks.train_extractor import train_extractor
from tasks.train_function_calling import train_function_calling


@flow(name="dagtune", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=True)
def dagtune_pipeline(
    config_path: str | None = None,
    profile: str | None = None,
    only: list[str] | None = None,
    force: list[str] | None = None,
) -> list[dict]:
    cfg = load_config(config_path, profile)
    only, force = only or [], force or []
    data = prepare_data.submit(cfg, {}, only, force)
    up = {"prepare_data": data}
    fc = train_function_calling.submit(cfg, up, only, force)
    ex = train_extractor.submit(cfg, up, only, force)
    cl = train_classifier.submit(cfg, up, only, force)
    trained = {**up, "train_function_calling": fc, "train_extractor": ex, "train_classifier": cl}
    ev = evaluate.submit(cfg, trained, only, force)
    gg = convert_gguf.submit(cfg, {**up, "train_function_calling": fc, "train_extractor": ex}, only, force)
    reg = register.submit(cfg, {**trained, "evaluate": ev, "convert_gguf": gg}, only, force)
    return [f.result() for f in (data, fc, ex, cl, ev, gg, reg)]
