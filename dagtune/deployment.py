"""The nightly deployment, described without Prefect: what `dagtune deploy` registers (flows/deploy.py
talks to the Prefect API) and what `dagtune worker` runs.

The deployment lives on the Prefect server, on a work pool; a worker polling the pool runs it. The
schedule is the server's: when every worker stops, scheduled runs wait (Late) until one polls again --
nothing is paused, unlike `flow.serve`, whose schedule dies with the serving process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from dagtune.config import DEFAULT_CONFIG, PipelineConfig

# Model-loading tasks carry this Prefect tag; the concurrency limit "tag:<GPU_TAG>" has one slot per GPU.
GPU_TAG = "dagtune-gpu"
GPU_LIMIT = f"tag:{GPU_TAG}"
FLOW_ENTRYPOINT = "flows/pipeline.py:dagtune_pipeline"
REPO_ROOT = Path(__file__).resolve().parent.parent

# What a flow-run process needs in its environment: dagtune's records in the run's logs.
RUN_ENV = {"PREFECT_LOGGING_EXTRA_LOGGERS": "dagtune", "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore"}


def run_parameters(cfg: PipelineConfig, config_path: str | None) -> dict[str, Any]:
    """The deployment's default form values: the profile and config it was deployed with."""
    path = None if not config_path or Path(config_path).resolve() == DEFAULT_CONFIG else str(config_path)
    return {"run": {"profile": cfg.profile or None, "config_path": path}}


def job_variables(cfg: PipelineConfig) -> dict[str, Any]:
    """Job variables for a process pool (the default): the environment every run gets. Docker and
    Kubernetes pools take the same `env` plus their own keys (image, GPU requests): README, Deployments."""
    env = dict(RUN_ENV)
    for var in ("DAGTUNE_STATE_DIR", "DAGTUNE_ARTIFACT_ROOT", "MLFLOW_TRACKING_URI"):
        if os.environ.get(var):
            env[var] = os.environ[var]
    out: dict[str, Any] = {"env": env}
    if cfg.deploy.work_pool_type == "process":
        out["working_dir"] = str(REPO_ROOT)  # the entrypoint is relative to it (an image: its WORKDIR)
    return out


def deployment_spec(cfg: PipelineConfig, config_path: str | None) -> dict[str, Any]:
    d = cfg.deploy
    return {
        "name": d.name,
        "work_pool": d.work_pool,
        "work_pool_type": d.work_pool_type,
        "cron": d.cron,
        "timezone": d.timezone,
        "gpu_slots": d.gpu_slots,
        "parameters": run_parameters(cfg, config_path),
        "job_variables": job_variables(cfg),
        "entrypoint": FLOW_ENTRYPOINT,
    }


def worker_command(
    cfg: PipelineConfig, name: str | None = None, healthcheck: bool = False, limit: int | None = None
) -> list[str]:
    """`prefect worker start` on the deployment's pool (its flow runs inherit this environment).
    ``limit``: at most this many flow runs at once on this worker; the others stay Scheduled for
    another worker of the pool (one machine per run: docs/scaling.md)."""
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", cfg.deploy.work_pool]
    cmd += ["--type", cfg.deploy.work_pool_type]
    cmd += ["--name", name] if name else []
    cmd += ["--limit", str(limit)] if limit else []
    return cmd + (["--with-healthcheck"] if healthcheck else [])


def worker_env(base: dict[str, str]) -> dict[str, str]:
    env = dict(base)
    extra = [x for x in env.get("PREFECT_LOGGING_EXTRA_LOGGERS", "").split(",") if x]
    env["PREFECT_LOGGING_EXTRA_LOGGERS"] = ",".join(dict.fromkeys([*extra, "dagtune"]))
    env.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    return env
