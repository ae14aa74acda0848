"""MLflow "model from code" entry point for the classifier pyfunc (see dagtune/registry/models.py)."""

from mlflow.models import set_model

from dagtune.registry.models import ClassifierModel

set_model(ClassifierModel())
