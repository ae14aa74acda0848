"""The ``evaluate`` node and its pure evaluation logic.

Modules: ``safe_arith`` (bounded arithmetic and equation checks), ``metrics`` (the metrics of all three
fine-tunes), ``tasks`` (per-task gold extraction and scoring tables), ``generate`` (batched greedy
generation), ``plots`` and ``report`` (the node's PNGs and report.md) and ``node`` (``build``).

Import the submodules directly; this package re-exports nothing.
"""
