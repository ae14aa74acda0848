"""One factory for every node task: the Prefect side of ``dagtune.runner.run_task``.

Prefect's task cache uses the node's content key. The cache record is written under
``<state_dir>/prefect-results/<node>/<key>/prefect-result`` (outside the artifact root) and is offered
to Prefect only while the artifact verifies, so a deleted or damaged artifact is rebuilt, and a cached
task shows as "Cached" in the Prefect UI.

GPU slots: a model-loading node's task carries the tag ``dagtune-gpu``; the Prefect concurrency limit
``tag:dagtune-gpu`` (``deploy.gpu_slots``, created by ``dagtune deploy`` / ``dagtune run``) holds the task
in Pending until a slot frees, so the wait is visible and not in the node's seconds. On the worker the
node then takes its devices' host-local slots (``dagtune.slots``), which pick the GPUs its process sees,
so two CLI runs or workers on one machine still share the GPUs.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.context import TaskRunContext

from dagtune.deployment import GPU_TAG
from dagtune.pipeline import NODES
from dagtune.runner import cache_record_key, run_task


def prefect_server_configured() -> bool:
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def node_task(name: str):
    def cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
        return cache_record_key(
            name, parameters["cfg"], parameters["upstream"], parameters["force"], parameters["only"]
        )

    @task(
        name=name,
        task_run_name=name,
        cache_key_fn=cache_key,
        persist_result=True,
        result_serializer="json",
        tags=[GPU_TAG] if NODES[name].loads_models else [],
    )
    def run(cfg, upstream: dict[str, dict], only: list[str], force: list[str]) -> dict:
        from prefect.runtime import flow_run

        return run_task(
            name,
            cfg,
            upstream,
            only=only,
            force=force,
            flow_run_id=str(flow_run.id),
            flow_run_url=flow_run.ui_url,
        )

    return run
