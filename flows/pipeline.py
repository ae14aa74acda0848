"""The dagtune pipeline flow: wiring only.

Nodes (each an idempotent, content-addressed task in ``tasks/``; logic in ``dagtune/``):

1. ``prepare_data``: the three datasets, validated, split, rendered in each model's chat template.
2. ``train_function_calling``, ``train_extractor``, ``train_classifier``: LoRA fine-tunes (Unsloth on
   GPU, transformers + peft + TRL on CPU); independent, they run concurrently where training slots allow.
"""

from __future__ import annotations

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from dagtune.config import load_config
from tasks.prepare_data import prepare_data
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
    return [f.result() for f in (data, fc, ex, cl)]
