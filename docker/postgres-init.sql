-- The MLflow backend store beside Prefect's database (POSTGRES_DB creates `prefect`).
CREATE DATABASE mlflow OWNER dagtune;
