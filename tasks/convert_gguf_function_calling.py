"""Prefect task for the `convert_gguf_function_calling` node (logic: dagtune)."""

from tasks._node import node_task

convert_gguf_function_calling = node_task("convert_gguf_function_calling")
