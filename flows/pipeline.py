"""The dagtune pipeline flow: wiring only.

Nodes, in DAG order (each an idempotent, content-addressed task in ``tasks/``):

1. ``prepare_data``: the three datasets, validated, split, rendered in each model's chat template.
"""

from __future__ import annotations

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from dagtune.config import load_config
from tasks.prepare_data import prepare_data


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
    return [data.result()]
