"""dagtune: an orchestrated, content-addressed training pipeline (core library; imports no Prefect)."""

__version__ = "0.1.0"
