"""Serve the pipeline as a Prefect deployment: nightly retraining plus runs triggered from the UI.

python -m flows.serve            # needs PREFECT_API_URL pointing at a Prefect server
"""

from __future__ import annotations

import os

from dagtune.config import load_config
from dagtune.runner import prepare_environment

if __name__ == "__main__":
    prepare_environment(load_config())  # before Prefect is imported: result storage = artifact root
    from flows.pipeline import dagtune_pipeline

    dagtune_pipeline.serve(
        name="nightly",
        cron=os.environ.get("DAGTUNE_CRON", "0 2 * * *"),
        parameters={"profile": os.environ.get("DAGTUNE_PROFILE", "real")},
    )
