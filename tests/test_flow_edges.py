"""The flow's wiring equals the DAG declared in ``dagtune.pipeline.NODES``: every task is submitted with
exactly its node's upstream artifacts (a missing one would run too early, an extra one waits for nothing)."""

from __future__ import annotations

import flows.pipeline as F
from dagtune.pipeline import NODES


class _Future:
    def __init__(self, name: str):
        self.name = name

    def result(self) -> dict:
        return {"name": self.name}


def test_flow_edges_equal_nodes_upstreams(monkeypatch):
    edges: dict[str, set[str]] = {}

    def recorder(name: str):
        class _Task:
            @staticmethod
            def submit(cfg, upstream, only, force):
                edges[name] = set(upstream)
                return _Future(name)

        return _Task

    for name in NODES:
        monkeypatch.setattr(F, name, recorder(name))
    monkeypatch.setattr(F.RunRequest, "load", lambda self: None)
    monkeypatch.setattr(F, "publish_report", lambda cfg, results: None)
    F.dagtune_pipeline.fn()
    assert edges == {name: set(node.upstream) for name, node in NODES.items()}
