"""`dagtune deploy`: create or update the work pool, the GPU concurrency limit and the nightly
deployment on the Prefect server (PREFECT_API_URL). The spec is dagtune.deployment's."""

from __future__ import annotations

from typing import Any


def ensure_work_pool(client: Any, name: str, pool_type: str) -> str:
    """Create the pool with its type's default job template unless it exists; returns what happened."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    try:
        client.read_work_pool(name)
        return "exists"
    except ObjectNotFound:
        pass
    template = ProcessWorker.get_default_base_job_template() if pool_type == "process" else None
    create = WorkPoolCreate(
        name=name, type=pool_type, **({"base_job_template": template} if template else {})
    )
    client.create_work_pool(create)
    return "created"


def ensure_gpu_limit(client: Any, slots: int) -> str:
    """The global concurrency limit the GPU-tagged tasks take: one slot per GPU of the worker."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    from dagtune.deployment import GPU_LIMIT

    try:
        current = client.read_global_concurrency_limit_by_name(GPU_LIMIT)
    except ObjectNotFound:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=slots))
        return "created"
    if current.limit != slots or not current.active:
        client.update_global_concurrency_limit(
            GPU_LIMIT, GlobalConcurrencyLimitUpdate(limit=slots, active=True)
        )
        return "updated"
    return "exists"


def ensure_gpu_limit_on_server(slots: int) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return ensure_gpu_limit(client, slots)


def deploy(spec: dict[str, Any]) -> dict[str, Any]:
    """Apply the spec: pool, GPU limit, deployment (created, or updated in place). Returns ids."""
    from prefect.client.orchestration import get_client
    from prefect.schedules import Cron

    from flows.pipeline import dagtune_pipeline

    with get_client(sync_client=True) as client:
        pool = ensure_work_pool(client, spec["work_pool"], spec["work_pool_type"])
        limit = ensure_gpu_limit(client, spec["gpu_slots"])
    deployment = dagtune_pipeline.to_deployment(
        name=spec["name"],
        schedules=[Cron(spec["cron"], timezone=spec["timezone"])],
        parameters=spec["parameters"],
        job_variables=spec["job_variables"],
        work_pool_name=spec["work_pool"],
    )
    deployment.entrypoint = spec["entrypoint"]  # relative to the run's working directory
    deployment_id = deployment.apply()
    return {**spec, "deployment_id": str(deployment_id), "work_pool_status": pool, "gpu_limit_status": limit}
