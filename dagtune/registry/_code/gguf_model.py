"""MLflow "model from code" entry point for the GGUF pyfunc (see dagtune/registry/models.py)."""

from mlflow.models import set_model

from dagtune.registry.models import GGUFModel

set_model(GGUFModel())
