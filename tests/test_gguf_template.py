"""convert_gguf_function_calling's chat-template check on the tiny FunctionGemma: an export whose embedded chat
template renders the training prompts passes; one whose template was stripped, or changed so that the
tool declarations are lost, fails the node with a message that says so."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pandas as pd
import pytest

from dagtune import pipeline
from dagtune.config import load_config
from dagtune.gguf.node import ParityError
from dagtune.models import load_tokenizer, resolve_model
from dagtune.node_process import NodeProcessError
from dagtune.store import ArtifactStore

needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama_cpp not importable: run scripts/build_llama_cpp.sh (builds llama-cpp-python 0.3.36)",
)
DEVELOPER = "You are a model that can do function calling with the following functions"
N_PROMPTS = 12
TOOLS_BLOCK = "{%- if tools -%}"


def _prepare_data(out: Path, store: ArtifactStore) -> None:
    from dagtune.data.render import render_function_calling
    from dagtune.data.synthetic import synthetic_function_calling

    tok = load_tokenizer("tiny-functiongemma", store)
    rows, _ = synthetic_function_calling(N_PROMPTS, 0.2, seed=3)
    df = pd.DataFrame([render_function_calling(tok, r, DEVELOPER, "no tool") for r in rows])
    (out / "function_calling").mkdir(parents=True)
    df.to_parquet(out / "function_calling" / "test.parquet", index=False)


def _training(out: Path, store: ArtifactStore, variant: str) -> None:
    """merged/ = the tiny FunctionGemma with its chat template intact, stripped or without tools."""
    merged = out / "merged"
    src = Path(resolve_model("tiny-functiongemma", store))
    shutil.copytree(src, merged, ignore=shutil.ignore_patterns("manifest.json", "tiny_model.json"))
    template = merged / "chat_template.jinja"
    assert TOOLS_BLOCK in template.read_text()
    if variant == "stripped":
        template.unlink()
    elif variant == "no_tools":
        template.write_text(template.read_text().replace(TOOLS_BLOCK, "{%- if false -%}"))


def _upstream(store: ArtifactStore, variant: str) -> dict:
    config = {"function_calling": {"developer_prompt": DEVELOPER}}
    ups = {}
    ups["prepare_data"], _ = store.build(
        "prepare_data", {"standin": "template", "config": config}, lambda out, _s: _prepare_data(out, store)
    )
    model = {"model": {"name": "tiny-functiongemma"}}
    ups["train_function_calling"], _ = store.build(
        "train_function_calling",
        {"standin": variant, "config": model},
        lambda out, _s: _training(out, store, variant),
    )
    return ups


@pytest.fixture
def cfg(state_dir):
    return load_config(
        profile="tiny",
        overrides={
            "convert_gguf": {
                "models": ["function_calling"],
                "quantizations": ["f16"],
                "parity_prompts": N_PROMPTS,
                "max_new_tokens": 8,
            }
        },
    )


@pytest.mark.slow
@needs_llama_cpp
def test_embedded_template_renders_the_training_prompts(cfg):
    store = ArtifactStore(cfg.artifact_root)
    art, res = pipeline.run_node("convert_gguf_function_calling", cfg, _upstream(store, "intact"))
    p = art.manifest()["metrics"]["function_calling"]["f16"]["parity"]
    assert res.status == "ran" and p["passed"], p["failures"]
    assert (
        p["n_prompts"] == N_PROMPTS and p["n_positions"] > 50 * N_PROMPTS
    )  # tool declarations: long prompts
    assert p["template_embedded"] and p["template_prompt_ids_equal_rate"] == 1.0
    assert p["template_greedy_match_rate"] == 1.0
    assert p["top1_agreement_all_positions_ties_ok"] >= 0.98
    report = (art.dir / "parity_report.md").read_text()
    assert "top-1 all positions" in report and "| function_calling | f16 |" in report


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ("stripped", "the GGUF has no embedded chat template"),
        ("no_tools", "the template was lost or changed in conversion"),
    ],
)
def test_lost_or_changed_template_fails_the_node(cfg, variant, message):
    store = ArtifactStore(cfg.artifact_root)
    with pytest.raises(NodeProcessError, match=message) as err:  # the node runs in its own process
        pipeline.run_node("convert_gguf_function_calling", cfg, _upstream(store, variant))
    assert err.value.child_type == ParityError.__name__
    assert "function_calling f16" in str(err.value)
    assert not list(
        Path(cfg.artifact_root).glob("convert_gguf_function_calling/*/manifest.json")
    )  # nothing committed
    assert "top-1" not in str(err.value)  # the logits agree: only the template check fails


def test_top1_over_all_positions_counts_near_ties():
    import numpy as np

    from dagtune.gguf.parity import _Top1

    hf = np.array([[5.0, 1.0, 0.0], [2.0, 1.98, 0.0], [0.0, 3.0, 1.0], [4.0, 0.0, 3.0]])
    ll = np.array([[5.0, 1.0, 0.0], [1.9, 2.0, 0.0], [0.0, 1.0, 3.0], [4.0, 0.0, 3.0]])
    acc = _Top1(tolerance=0.05)
    acc.add(hf, ll)
    # position 1 flips between near-equal candidates (gap 0.02): a tie; position 2 is a real flip (gap 2)
    assert (acc.n, acc.hits, acc.ties) == (4, 2, 1)
    assert acc.strict() == 0.5 and acc.ties_ok() == 0.75 and acc.max_diff == 2.0


def test_failure_messages_name_the_template_problem():
    from dagtune.gguf.parity import _failures

    base = {
        "top1_agreement_all_positions": 1.0,
        "top1_agreement_all_positions_ties_ok": 1.0,
        "n_positions": 10,
        "top1_tie_tolerance": 0.05,
        "top1_agreement": 1.0,
        "max_abs_logit_diff_all_positions": 0.0,
        "greedy_exact_match_rate": 1.0,
    }
    missing = {**base, "template_embedded": False, "template_greedy_match_rate": 0.0}
    assert "no embedded chat template" in _failures(missing, 4, 0, 0.98, None, 0.95)[0]
    changed = {
        **base,
        "template_embedded": True,
        "template_greedy_match_rate": 0.5,
        "template_prompt_ids_equal_rate": 0.0,
    }
    assert "lost or changed in conversion" in _failures(changed, 4, 0, 0.98, None, 0.95)[0]
    assert _failures({**changed, "template_greedy_match_rate": 0.96}, 4, 0, 0.98, None, 0.95) == []
    low = {**base, "top1_agreement_all_positions_ties_ok": 0.9, "top1_agreement_all_positions": 0.8}
    assert "over all 10 prompt positions 0.9000 < 0.98" in _failures(low, 4, 0, 0.98, None, None)[0]
