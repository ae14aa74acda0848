"""Prefect task publishing the run's summary as artifacts (content: dagtune.report)."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from dagtune.report import metric_rows, run_markdown


@task(name="publish_report", task_run_name="publish_report")
def publish_report(cfg, results: list[dict]) -> None:
    create_markdown_artifact(
        markdown=run_markdown(results, cfg.profile, cfg.tracking_uri, cfg.artifact_root),
        key="dagtune-run-report",
        description="Nodes, fine-tuned vs base, promotion gate and MLflow links of this run",
    )
    create_table_artifact(
        table=metric_rows(results, cfg.artifact_root),
        key="dagtune-headline-metrics",
        description="Headline metrics of every node of this run",
    )
