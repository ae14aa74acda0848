"""Prefect task for the `prepare_data` node (logic: dagtune)."""

from tasks._node import node_task

prepare_data = node_task("prepare_data")
