"""Prefect task for the `convert_gguf_extractor` node (logic: dagtune)."""

from tasks._node import node_task

convert_gguf_extractor = node_task("convert_gguf_extractor")
