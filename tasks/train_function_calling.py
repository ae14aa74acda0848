"""Prefect task for the `train_function_calling` node (logic: dagtune)."""

from tasks._node import node_task

train_function_calling = node_task("train_function_calling")
