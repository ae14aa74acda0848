"""Serve the pipeline from this process, without a work pool (development; production: `dagtune deploy`
+ `dagtune worker`, whose schedule survives the worker). Cron, time zone and profile as `dagtune deploy`:
the config's `deploy` section and default_profile (DAGTUNE_PROFILE overrides, as for the CLI).

python -m flows.serve            # needs PREFECT_API_URL pointing at a Prefect server
"""

from __future__ import annotations

from dagtune.config import load_config
from dagtune.runner import prepare_environment

if __name__ == "__main__":
    cfg = load_config()
    prepare_environment(cfg)  # before Prefect is imported: result storage = artifact root
    from prefect.schedules import Cron

    from dagtune.deployment import run_parameters
    from flows.pipeline import dagtune_pipeline

    dagtune_pipeline.serve(
        name=cfg.deploy.name,
        schedules=[Cron(cfg.deploy.cron, timezone=cfg.deploy.timezone)],
        parameters=run_parameters(cfg, None),
    )
