"""Prefect task for the `train_extractor` node (logic: dagtune)."""

from tasks._node import node_task

train_extractor = node_task("train_extractor")
