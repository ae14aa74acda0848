"""Prefect task for the `convert_gguf` node (logic: dagtune)."""

from tasks._node import node_task

convert_gguf = node_task("convert_gguf")
