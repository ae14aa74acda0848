"""Prefect task for the `evaluate` node (logic: dagtune)."""

from tasks._node import node_task

evaluate = node_task("evaluate")
