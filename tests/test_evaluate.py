"""Evaluate node helpers: gold extraction, per-task scoring tables, verdict mapping, generation cut, plots
and the report. No model weights are trained here; the generator test uses a tiny tokenizer only."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

from dagtune.evaluation import plots
from dagtune.evaluation.report import write_report
from dagtune.evaluation.tasks import (
    ExtractorPrompt,
    expected_calls,
    extractor_evaluate,
    fc_delta_block,
    fc_evaluate,
    gold_verdict,
    solution_lines,
    subsample,
    verdict_evaluate,
)
from dagtune.formats import format_function_call

ROOT = Path(__file__).resolve().parent.parent
COMPUTATIONAL = ["arithmetic", "computational"]


def fc_frame() -> pd.DataFrame:
    call = format_function_call("get_weather", {"city": "الرياض"})
    return pd.DataFrame(
        [
            {
                "id": "a",
                "completion": call + "<end_of_turn>",
                "dialect": "MSA",
                "domain": "weather",
                "has_call": True,
                "target_name": "get_weather",
                "target_arguments": json.dumps({"city": "الرياض"}),
            },
            {
                "id": "b",
                "completion": "no tool<end_of_turn>",
                "dialect": "Gulf",
                "domain": "unknown",
                "has_call": False,
                "target_name": "",
                "target_arguments": "{}",
            },
            # completion in an unknown format: the target columns are the gold
            {
                "id": "c",
                "completion": "<start_function_call>broken",
                "dialect": "Gulf",
                "domain": "travel",
                "has_call": True,
                "target_name": "book_hotel",
                "target_arguments": json.dumps({"nights": 3}),
            },
        ]
    )


def test_expected_calls_from_completion_and_columns():
    rows = fc_frame().to_dict("records")
    assert expected_calls(rows[0]) == [{"name": "get_weather", "arguments": {"city": "الرياض"}}]
    assert expected_calls(rows[1]) == []
    assert expected_calls(rows[2]) == [{"name": "book_hotel", "arguments": {"nights": 3}}]


def test_fc_evaluate_counts_bad_output_as_miss():
    df = fc_frame()
    good = format_function_call("get_weather", {"city": "الرياض"})
    preds = [
        good.replace("الرياض", "جدة") + "<end_of_turn>",  # right tool, wrong argument value
        "<start_function_call>call:get_weather{city:<escape>x",  # truncated: false call
        None,  # no output at all: a parse failure and a missed call
    ]
    m, table = fc_evaluate(df, preds, arabic=True)
    o = m["overall"]
    assert o["n"] == 3 and o["n_positive"] == 2 and o["n_negative"] == 1
    assert o["tool_name_accuracy"] == 0.5
    assert o["false_call_rate"] == 1.0
    assert o["missed_call_rate"] == 0.5
    assert set(m["by_dialect"]) == {"MSA", "Gulf"} and set(m["by_domain"]) == {"weather", "unknown", "travel"}
    assert m["by_domain"]["unknown"]["tool_name_accuracy"] is None  # empty denominator stays None
    assert list(table["id"]) == ["a", "b", "c"] and table["parse_ok"].tolist() == [True, False, False]
    assert o["exact_match"] == 0.0 and o["arg_key_f1"] == 0.5
    perfect, _ = fc_evaluate(
        df, [good, "no tool", format_function_call("book_hotel", {"nights": 3})], arabic=True
    )
    assert perfect["overall"]["exact_match"] == 1.0
    d = fc_delta_block(perfect, m)
    assert d["tool_name_accuracy"] == 0.5 and d["false_call_rate"] == -1.0
    assert d["by_dialect"]["MSA"]["tool_name_accuracy"] == 0.0
    assert d["by_domain"]["unknown"]["tool_name_accuracy"] is None


def test_extractor_evaluate_and_prompt_renderer():
    df = pd.DataFrame(
        [
            {
                "id": 1,
                "prompt": "<bos>U: extract\nA + B line\nM:",
                "line": "A + B line",
                "eqn": "3+4=7",
                "type": "correct",
            },
            {"id": 2, "prompt": "p", "line": "no eq here", "eqn": "", "type": "missing"},
            {"id": 3, "prompt": "p", "line": "x", "eqn": "12-5=8", "type": "flawed"},
        ]
    )
    m, table = extractor_evaluate(df, ["<eq>3 + 4 = 7</eq>", "<eq></eq>", "12-5=8"], rel_tol=1e-5)
    assert m["overall"]["equation_score"] == pytest.approx(2 / 3)
    assert m["overall"]["tag_parse_failure_rate"] == pytest.approx(1 / 3)
    assert table["tag_parse_failure"].tolist() == [False, False, True]
    render = ExtractorPrompt.from_rows(df)
    assert render("7 * 2 = 14") == "<bos>U: extract\n7 * 2 = 14\nM:"
    with pytest.raises(ValueError):
        ExtractorPrompt.from_rows(df.iloc[1:2].assign(prompt="nothing"))


def test_gold_verdict_mapping():
    assert gold_verdict(0, "", COMPUTATIONAL) == "correct"
    assert gold_verdict(1, "arithmetic", COMPUTATIONAL) == "computational_error"
    assert gold_verdict(1, "Computational", COMPUTATIONAL) == "computational_error"
    assert gold_verdict(1, "wrong_operation", COMPUTATIONAL) == "conceptual_error"
    assert gold_verdict(1, "final_answer", COMPUTATIONAL) == "conceptual_error"
    assert gold_verdict(1, None, COMPUTATIONAL) == "conceptual_error"


def test_verdict_evaluate_two_stages():
    df = pd.DataFrame(
        [
            {"id": "c", "label": 0, "error_type": "", "solution": "so 2 + 2 = 4.\nThe answer is 4."},
            {"id": "a", "label": 1, "error_type": "arithmetic", "solution": "so 2 + 2 = 5.\nAnswer: 5"},
            {"id": "w", "label": 1, "error_type": "wrong_operation", "solution": "so 2 * 3 = 6."},
            {"id": "g", "label": 0, "error_type": "", "solution": "so 5 - 1 = 4."},
        ]
    )
    lines = solution_lines(df["solution"].tolist())
    assert lines[0] == ["so 2 + 2 = 4."] and lines[1] == ["so 2 + 2 = 5."]  # final-answer lines skipped
    outs = [["<eq>2+2=4</eq>"], ["<eq>2+2=5</eq>"], ["<eq>2*3=6</eq>"], ["garbage <eq>"]]  # last: tag failure
    probs = [0.1, 0.2, 0.9, float("nan")]
    m, table = verdict_evaluate(df, lines, outs, probs, 0.5, COMPUTATIONAL)
    assert table["gold"].tolist() == ["correct", "computational_error", "conceptual_error", "correct"]
    assert table["pred"].tolist() == [
        "correct",
        "computational_error",
        "conceptual_error",
        "conceptual_error",
    ]
    assert m["n"] == 4 and m["accuracy"] == 0.75 and m["n_equations"] == 3
    assert set(m) >= {"macro_f1", "weighted_f1", "per_class", "confusion_matrix", "threshold"}
    empty, t = verdict_evaluate(df.iloc[:0], [], [], [], 0.5, COMPUTATIONAL)
    assert empty == {"n": 0} and t.empty


def test_subsample_is_seeded_and_ordered():
    df = pd.DataFrame({"i": range(100)})
    a, b = subsample(df, 10, 0), subsample(df, 10, 0)
    assert a.equals(b) and len(a) == 10 and a["i"].is_monotonic_increasing
    assert a["i"].max() > 10  # not a plain head
    assert len(subsample(df, None, 0)) == 100 and len(subsample(df, 500, 0)) == 100


def test_plots_and_report(tmp_path):
    assert plots.read_train_log(tmp_path / "missing.jsonl") == []
    log = tmp_path / "log.jsonl"
    log.write_text(
        '{"step": 1, "loss": 2.0}\n{"event": "resume", "step": 1}\nnot json\n{"step": 2, "loss": 1.0}\n'
    )
    rows = plots.read_train_log(log)
    assert [r["step"] for r in rows] == [1, 2]
    pngs = [
        plots.loss_curves_png({"a": rows, "b": []}, tmp_path / "loss.png"),
        plots.confusion_matrix_png([[3, 1], [0, 2]], ["correct", "flawed"], "cm", tmp_path / "cm.png"),
        plots.group_bars_png(
            {"fine_tuned": {"MSA": {"x": 0.5}}, "base": {"MSA": {"x": None}, "Gulf": {"x": 0.1}}},
            ["x"],
            "bars",
            tmp_path / "bars.png",
        ),
    ]
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    df = fc_frame()
    ft, _ = fc_evaluate(df, [None] * 3, arabic=False)
    report = write_report(
        tmp_path / "report.md",
        {
            "function_calling": {"fine_tuned": ft, "base": ft, "delta": fc_delta_block(ft, ft)},
            "verdict": {"n": 0},
        },
        ["plots/fc_by_dialect.png"],
    )
    text = report.read_text()
    assert (
        "| fine_tuned |" in text
        and "delta (ft - base)" in text
        and "![fc_by_dialect](plots/fc_by_dialect.png)" in text
    )


def test_generator_cuts_at_stop_token_and_keeps_control_tokens(tmp_path):
    """Decoding contract on a real tiny tokenizer with a scripted model: stop-cut, special tokens kept."""
    import torch

    from dagtune.evaluation.generate import Generator
    from dagtune.models import resolve_model
    from dagtune.store import ArtifactStore

    g = Generator(resolve_model("tiny-functiongemma", ArtifactStore(tmp_path / "store")))
    tok = g.tokenizer
    call = format_function_call("get_weather", {"city": "Cairo"})
    scripts = [
        tok(call + "<end_of_turn><pad><pad>", add_special_tokens=False)["input_ids"],
        tok("<start_function_call>call:get_weather{city:", add_special_tokens=False)["input_ids"],
    ]
    width = max(map(len, scripts))

    def fake_generate(input_ids, attention_mask, **kw):
        assert kw["do_sample"] is False and kw["max_new_tokens"] == width
        assert set(kw["eos_token_id"]) == set(g.stop_ids)
        assert (attention_mask[:, -1] == 1).all()  # left padding: every prompt ends at the right edge
        new = [s + [tok.pad_token_id] * (width - len(s)) for s in scripts[: len(input_ids)]]
        return torch.cat([input_ids, torch.tensor(new)], dim=1)

    g.model.generate = fake_generate
    out = g.generate(["<bos><start_of_turn>user\nhi there, long prompt<end_of_turn>\n", "<bos>x"], 2, width)
    # Longest prompt first: scripts[0] goes to prompt 0.
    assert out[0].text == call and out[0].finished
    assert out[1].text.startswith("<start_function_call>call:get_weather") and not out[1].finished
    cfg = g.decoding_config(2, width)
    assert (
        "<end_of_turn>" in cfg["stop_tokens"] and cfg["padding_side"] == "left" and cfg["do_sample"] is False
    )
    g.close()


def test_flawed_probability_adapter():
    import numpy as np

    from dagtune.evaluation.node import FlawedProbability

    class TwoColumns:
        def predict_proba(self, texts):
            return np.array([[0.9, 0.1], [0.2, 0.8]])[: len(texts)]

    class OneColumn:
        def predict_proba(self, texts):
            return [0.3] * len(texts)

    assert FlawedProbability(TwoColumns()).predict_proba(["a", "b"]) == pytest.approx([0.1, 0.8])
    assert FlawedProbability(OneColumn()).predict_proba(["a"]) == [0.3]
    assert FlawedProbability(OneColumn()).predict_proba([]) == []


# Strings the random-init tiny models write at different points of different rows (looked up once on
# these prompts): rows stop at different steps, some never, which is what per-row stopping must handle.
_TINY_STOPS = {
    "tiny-functiongemma": ("فهل", "الالجواب", "معرفة"),
    "tiny-gemma3": (" then", "transfer"),
}


@pytest.mark.parametrize("name", sorted(_TINY_STOPS))
def test_batched_generation_equals_one_at_a_time(tmp_path, name):
    """Batches (left padding, per-row stop strings) give every row exactly the tokens it gets alone."""
    import torch

    from dagtune.data.render import render_extractor, render_function_calling
    from dagtune.data.synthetic import synthetic_extractor, synthetic_function_calling
    from dagtune.evaluation.generate import Generator
    from dagtune.models import resolve_model
    from dagtune.store import ArtifactStore

    torch.set_num_threads(1)
    g = Generator(resolve_model(name, ArtifactStore(tmp_path / "store")), device="cpu")
    if name == "tiny-functiongemma":
        rows, _ = synthetic_function_calling(24, 0.2, seed=1)
        prompts = [render_function_calling(g.tokenizer, r, "Call functions.", "no")["prompt"] for r in rows]
    else:
        prompts = [render_extractor(g.tokenizer, r)["prompt"] for r in synthetic_extractor(24, seed=1)]
    stops = _TINY_STOPS[name]
    alone = g.generate(prompts, 1, 24, stops)
    batched = g.generate(prompts, 8, 24, stops)
    g.close()
    assert [(x.text, x.finished, x.new_tokens) for x in batched] == [
        (x.text, x.finished, x.new_tokens) for x in alone
    ]
    stopped = [x for x in alone if x.finished]
    assert stopped and len(stopped) < len(alone)  # some rows stop, others run to max_new_tokens
    assert len({x.new_tokens for x in stopped}) > 1  # ... at different steps
    assert all(x.text.endswith(stops) and sum(x.text.count(s) for s in stops) == 1 for x in stopped)


def _real_shape(model: str) -> dict:
    """A real model's config (sizes, attention layout) from the benchmark's table, where it is written once."""
    spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "benchmarks/train_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.MODELS[model]["config"]


def test_cuda_batch_size_follows_kv_bytes_per_token():
    """FunctionGemma-270M's shape: 18 layers x 1 KV head x 256 dims x K,V x bf16 = 18,432 bytes/token."""
    from transformers import Gemma3TextConfig

    from dagtune.evaluation.generate import kv_bytes_per_token, memory_batch_size, row_bytes

    cfg = Gemma3TextConfig(**_real_shape("functiongemma-270m"))
    assert kv_bytes_per_token(cfg, 2) == 18432
    per_row = row_bytes(cfg, 2, 512)
    assert per_row == 18432 * 512 + 512 * (2 * 2048 + 4 * 640) * 2 + 4 * 262144
    gib = 1024**3
    assert memory_batch_size(cfg, 2, 512, 10 * gib, 0.5, 4096) == (5 * gib) // per_row
    assert memory_batch_size(cfg, 2, 512, 100 * gib, 0.5, 256) == 256  # the cap
    assert memory_batch_size(cfg, 2, 512, 1024, 0.5, 256) == 1  # never zero
    assert memory_batch_size(cfg, 2, 1024, 10 * gib, 0.5, 4096) < memory_batch_size(
        cfg, 2, 512, 10 * gib, 0.5, 4096
    )
