"""What the pipeline's parent MLflow run shows: profile, config hash and git commit as params, the
resolved config as an artifact; and the experiment opening on its training runs."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from dagtune.registry.tracking import TAG_CONFIG_HASH, TAG_GIT_COMMIT, TAG_PROFILE, Tracker

# MLflow 3's UI picks an experiment's default view from this tag (its UI code: "custom_model_development"
# = training runs, "genai_development" = traces); without it the experiment opened on traces.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
PARAMS_FROM_TAGS = {"profile": TAG_PROFILE, "config_hash": TAG_CONFIG_HASH, "git_commit": TAG_GIT_COMMIT}


def open_experiment_on_training_runs(tracker: Tracker, experiment_id: str) -> None:
    """Set the kind unless someone chose one already (their choice stays)."""
    exp = tracker.call("read experiment", tracker.client.get_experiment, experiment_id)
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
        tracker.call(
            "tag experiment kind",
            tracker.client.set_experiment_tag,
            experiment_id,
            EXPERIMENT_KIND_TAG,
            TRAINING_KIND,
        )


def record_pipeline_run(
    tracker: Tracker, run_id: str, tags: Mapping[str, str], resolved_config: Mapping[str, Any] | None
) -> None:
    from mlflow.entities import Param

    params = [Param(k, tags[t]) for k, t in PARAMS_FROM_TAGS.items() if tags.get(t)]
    tracker.call("log parent run params", tracker.client.log_batch, run_id, params=params)
    if resolved_config is not None:
        tracker.call(
            "log resolved config",
            tracker.client.log_text,
            run_id,
            json.dumps(resolved_config, indent=2, sort_keys=True, default=str),
            "config/resolved_config.json",
        )
