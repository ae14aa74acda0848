"""MLflow tracking and model registry for the pipeline (see tracking.py, models.py, registry.py).

Import the submodules directly; this package imports nothing heavy so ``dagtune status`` stays fast.
"""
