"""MLflow "models from code" entry points (each file calls mlflow.models.set_model)."""
