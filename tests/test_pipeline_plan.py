"""Keys depend on a node's own section and its upstream keys only: changing one section re-runs
that node and its downstream nodes, nothing else."""

from __future__ import annotations

import pytest

from dagtune.config import load_config
from dagtune.pipeline import NODE_ORDER, NODES, plan

# One harmless change per section, to see which keys move.
TWEAKS = {
    "prepare_data": {"seed": 7},
    "train_function_calling": {"seed": 1},
    "train_extractor": {"seed": 1},
    "train_classifier": {"seed": 1},
    "evaluate": {"max_new_tokens": 7},
    "convert_gguf": {"parity_prompts": 3},
    "register": {"experiment": "other"},
}


def descendants(name: str) -> set[str]:
    out = {name}
    changed = True
    while changed:
        changed = False
        for n, node in NODES.items():
            if n not in out and any(u in out for u in node.upstream):
                out.add(n)
                changed = True
    return out


def test_every_section_has_a_tweak():
    assert {node.section_name for node in NODES.values()} <= set(TWEAKS)


@pytest.mark.parametrize("section", list(TWEAKS))
def test_changing_a_section_moves_its_nodes_and_downstream_only(section, state_dir):
    """convert_gguf configures two nodes (one export per model): both move, and register."""
    base = plan(load_config())
    changed = plan(load_config(overrides={section: TWEAKS[section]}))
    moved = {n for n in NODE_ORDER if base[n]["key"] != changed[n]["key"]}
    configured = [n for n, node in NODES.items() if node.section_name == section]
    assert configured and moved == set().union(*(descendants(n) for n in configured))


def test_runtime_and_unrelated_sections_do_not_move_data_key(state_dir):
    base = plan(load_config())
    other = plan(load_config(overrides={"evaluate": {"batch_size": 3}}))
    assert base["prepare_data"]["key"] == other["prepare_data"]["key"]
