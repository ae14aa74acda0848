"""Prefect task for the `train_classifier` node (logic: dagtune)."""

from tasks._node import node_task

train_classifier = node_task("train_classifier")
