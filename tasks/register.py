"""Prefect task for the `register` node (logic: dagtune)."""

from tasks._node import node_task

register = node_task("register")
