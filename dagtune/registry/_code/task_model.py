"""MLflow "model from code" entry point for the function caller / extractor (dagtune/registry/models.py)."""

from mlflow.models import set_model

from dagtune.registry.models import TaskModel

set_model(TaskModel())
