"""The evaluate node end to end on stand-in upstream artifacts (tests/evaluate_standins.py): every output
file, the metrics.json layout, caching, garbage models scored as misses, identical decoding for base and
fine-tune, and (with a scripted oracle generator) that the scores really follow the outputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from evaluate_standins import KeywordClassifier, make_upstream

import dagtune.evaluation.node as node_mod
from dagtune import pipeline
from dagtune.config import load_config
from dagtune.evaluation.generate import Generation
from dagtune.store import ArtifactStore

EVALUATE = pipeline.Node(
    "evaluate",
    "1",
    ("prepare_data", "train_function_calling", "train_extractor", "train_classifier"),
    "dagtune.evaluation.node:build",
)
FILES = (
    "metrics.json",
    "report.md",
    "predictions/function_calling.parquet",
    "predictions/extractor.parquet",
    "predictions/classifier.parquet",
    "predictions/verdict.parquet",
    "plots/fc_by_dialect.png",
    "plots/fc_by_domain.png",
    "plots/classifier_confusion.png",
    "plots/verdict_confusion.png",
    "plots/train_loss.png",
)


@pytest.fixture
def setup(state_dir, monkeypatch):
    monkeypatch.setitem(pipeline.NODES, "evaluate", EVALUATE)
    monkeypatch.setattr(node_mod, "load_classifier", lambda *_a, **_k: KeywordClassifier())
    cfg = load_config(profile="tiny", overrides={"evaluate": {"batch_size": 4, "max_new_tokens": 12}})
    return cfg, ArtifactStore(cfg.artifact_root)


def test_garbage_models_give_misses_and_every_output(setup):
    cfg, store = setup
    ups = make_upstream(store, garbage=True)
    art, res = pipeline.run_node("evaluate", cfg, ups)
    assert res.status == "ran"
    d = art.dir
    for f in FILES:
        assert (d / f).is_file(), f
    m = json.loads((d / "metrics.json").read_text())
    print("evaluate seconds:", m["meta"]["seconds"], "node:", res.seconds)
    # layout read by the promotion gate
    fc = m["function_calling"]
    assert set(fc) == {"fine_tuned", "base", "delta"}
    for role in ("fine_tuned", "base"):
        assert set(fc[role]) == {"overall", "by_dialect", "by_domain"}
        assert fc[role]["overall"]["n"] == 6
        assert fc[role]["overall"]["tool_name_accuracy"] == 0.0  # random weights never name a tool
        assert set(fc[role]["by_dialect"]) == {"MSA", "Gulf", "Egyptian", "Levantine"}
    assert fc["delta"]["tool_name_accuracy"] == 0.0 and "by_dialect" in fc["delta"]
    assert set(m["extractor"]) == {"fine_tuned", "base", "delta"}
    assert m["extractor"]["fine_tuned"]["overall"]["tag_parse_failure_rate"] == 1.0
    cl = m["classifier"]["fine_tuned"]
    assert {"accuracy", "macro_f1", "roc_auc", "per_class", "confusion_matrix", "threshold"} <= set(cl)
    assert cl["threshold_source"] == "validation"
    v = m["verdict"]
    assert v["n"] == 6 and v["n_lines"] == 6 and v["n_equations"] == 0  # no tags: classifier decides all
    assert {"macro_f1", "weighted_f1", "per_class", "confusion_matrix"} <= set(v)
    # the same decoding for base and fine-tune (only the weights differ)
    for task in ("function_calling", "extractor"):
        dec = m["meta"]["decoding"][task]
        ft = {k: x for k, x in dec["fine_tuned"].items() if k != "model"}
        base = {k: x for k, x in dec["base"].items() if k != "model"}
        assert ft == base and ft["do_sample"] is False and ft["max_new_tokens"] == 12
        assert "<end_of_turn>" in ft["stop_tokens"]
    preds = pd.read_parquet(d / "predictions/function_calling.parquet")
    assert len(preds) == 12 and set(preds["model"]) == {"fine_tuned", "base"}
    assert not preds["name_correct"].fillna(False).any()
    assert len(pd.read_parquet(d / "predictions/verdict.parquet")) == 6
    report = (d / "report.md").read_text()
    for section in (
        "## Function calling",
        "## Equation extractor",
        "## Classifier",
        "## Two-stage math verdict",
    ):
        assert section in report
    for link in re.findall(r"\]\((plots/[^)]+)\)", report):
        assert (d / link).is_file()
    manifest = art.manifest()
    assert manifest["metrics"]["fc_tool_name_accuracy"] == 0.0
    # cached: the second run computes nothing
    art2, res2 = pipeline.run_node("evaluate", cfg, ups)
    assert res2.status == "cached" and art2.key == art.key


class OracleGenerator:
    """Scripted stand-in for Generator: the fine-tune answers with the gold target, the base with
    broken markup; verdict lines get the equation read off the line."""

    calls: list[tuple[str, int]] = []
    stops: list[tuple[str, ...]] = []

    def __init__(self, model_path, *, adapter_path=None, device="auto", dtype=None, **memory_kw):
        self.model_path = model_path
        self.fine_tuned = "merged" in model_path
        gold = {}
        for task in ("function_calling", "extractor"):
            for split in ("test", "train"):
                p = Path(self.data_dir) / task / f"{split}.parquet"
                df = pd.read_parquet(p)
                gold.update(dict(zip(df["prompt"], df["completion"], strict=True)))
        self.gold = gold

    def generate(self, prompts, batch_size, max_new_tokens, stop_strings=()):
        OracleGenerator.calls.append((self.model_path, len(prompts)))
        OracleGenerator.stops.append(tuple(stop_strings))
        out = []
        for p in prompts:
            if not self.fine_tuned:
                text = "<start_function_call>call:oops{"
            elif p in self.gold:
                text = self.gold[p].replace("<end_of_turn>", "")
            else:
                m = re.search(r"(\d+) ([-+*/]) (\d+) = (\d+)", p)
                text = f"<eq>{m.group(1)}{m.group(2)}{m.group(3)}={m.group(4)}</eq>" if m else "<eq></eq>"
            out.append(Generation(text, True, 5))
        return out

    def decoding_config(self, batch_size, max_new_tokens, stop_strings=()):
        return {"do_sample": False, "max_new_tokens": max_new_tokens, "batch_size": batch_size}

    def close(self):
        pass


def test_scores_follow_outputs_with_oracle_fine_tune(setup, monkeypatch):
    cfg, store = setup
    ups = make_upstream(store, garbage=False)
    OracleGenerator.data_dir = ups["prepare_data"].dir
    OracleGenerator.calls = []
    OracleGenerator.stops = []
    monkeypatch.setattr(node_mod, "Generator", OracleGenerator)
    art, _ = pipeline.run_node("evaluate", cfg, ups)
    m = json.loads((art.dir / "metrics.json").read_text())
    ft, base = m["function_calling"]["fine_tuned"]["overall"], m["function_calling"]["base"]["overall"]
    assert ft["tool_name_accuracy"] == ft["exact_match"] == ft["parse_ok_rate"] == 1.0
    assert ft["false_call_rate"] == 0.0 and ft["missed_call_rate"] == 0.0
    assert (
        base["parse_ok_rate"] == 0.0 and base["tool_name_accuracy"] == 0.0 and base["false_call_rate"] == 1.0
    )
    assert m["function_calling"]["delta"]["tool_name_accuracy"] == 1.0
    assert m["extractor"]["fine_tuned"]["overall"]["equation_score"] == 1.0
    assert m["extractor"]["base"]["overall"]["tag_parse_failure_rate"] == 1.0
    # verdict: the arithmetic error is caught by the equation check, the wrong operation and the wrong
    # final answer by the (stand-in) classifier
    v = pd.read_parquet(art.dir / "predictions/verdict.parquet")
    assert (
        v["gold"].tolist()
        == v["pred"].tolist()
        == ["correct", "computational_error", "conceptual_error", "correct", "conceptual_error", "correct"]
    )
    assert m["verdict"]["macro_f1"] == 1.0 and m["verdict"]["n_equations"] == 6
    stages = m["verdict"]["stages_by_class"]
    assert stages["computational_error"]["arithmetic"] == 1 and stages["correct"]["arithmetic"] == 0
    assert stages["conceptual_error"]["classifier"] == 2 and m["verdict"]["unmapped_error_types"] == {}
    assert "| computational_error | 1 | 1 | 0 |" in (art.dir / "report.md").read_text()
    # one load per model; the verdict lines reuse the loaded fine-tuned extractor
    assert [n for _, n in OracleGenerator.calls] == [6, 6, 4, 6, 4]
    # each task's answer ends at its own stop string (function calls, then equations)
    assert OracleGenerator.stops == [("<end_function_call>",)] * 2 + [("</eq>",)] * 3
