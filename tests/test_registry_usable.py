"""Registered models are usable: each version has a signature and an input example, and the
function caller, extractor and classifier loaded from the registry by alias predict what the evaluate
node predicted on the same test rows (greedy decoding both ways; the classifier within 1e-5).

The registry is built by the pipeline's real nodes on the tiny profile (made smaller as in
test_flow.py: two training steps), on a real MLflow SQLite store, through the real register node: the
nodes up to evaluate are the ones tests/test_flow.py's CLI run built (copied, served from the cache),
register runs here, forced (in its own process, as every model-loading node).
Two training steps rarely beat the base, so the gate usually leaves ``champion`` unset: each model is
loaded by ``@champion`` when the gate promoted this run's version, by ``@challenger`` otherwise."""

from __future__ import annotations

import json
import os
from typing import Any

import mlflow
import pandas as pd
import pytest

from dagtune import pipeline
from dagtune.config import load_config
from dagtune.data.split import read_split
from dagtune.evaluation.tasks import subsample
from dagtune.formats import END_CALL, parse_eq, parse_function_calls

pytestmark = pytest.mark.slow
MODELS = ("function_calling", "extractor", "classifier")


@pytest.fixture(scope="module")
def built(tmp_path_factory, copy_of_built_pipeline):
    # The fast pipeline's artifacts as tests/test_flow.py built them (conftest.py): every node up to
    # evaluate is cached here; register builds this state's own SQLite registry in-process.
    state, config = copy_of_built_pipeline(tmp_path_factory.mktemp("usable"))
    saved = {
        k: os.environ.get(k) for k in ("DAGTUNE_STATE_DIR", "DAGTUNE_ARTIFACT_ROOT", "MLFLOW_TRACKING_URI")
    }
    os.environ["DAGTUNE_STATE_DIR"] = str(state)
    for k in ("DAGTUNE_ARTIFACT_ROOT", "MLFLOW_TRACKING_URI"):
        os.environ.pop(k, None)
    try:
        cfg = load_config(config)
        arts = {}
        for name in pipeline.NODE_ORDER:
            node = pipeline.NODES[name]
            # register is forced: this state has no MLflow store yet (the copy holds artifacts only)
            arts[name], res = pipeline.run_node(
                name, cfg, {u: arts[u] for u in node.upstream}, force=name == "register"
            )
            assert (res.status == "ran") is (name == "register"), (name, res.status)  # same keys as the CLI
        # register ran in its own process: this one sets both URIs itself (an earlier test's server may
        # still be the process-wide registry URI)
        mlflow.set_tracking_uri(cfg.tracking_uri)
        mlflow.set_registry_uri(cfg.tracking_uri)
        registered = json.loads((arts["register"].dir / "registered.json").read_text())["models"]
        yield cfg, arts, registered
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _load(registered: dict, model: str):
    """The version this run registered, by alias: champion when the gate promoted it."""
    r = registered[model]
    alias = "champion" if r["champion"] == r["version"] else "challenger"
    assert r[alias] == r["version"], r
    return mlflow.pyfunc.load_model(f"models:/{r['name']}@{alias}")


def _test_rows(cfg, arts, task: str) -> pd.DataFrame:
    """The rows evaluate scored, in its order."""
    df = read_split(arts["prepare_data"].dir, task, "test")
    return subsample(df, cfg.evaluate.max_examples, cfg.evaluate.seed)


def _evaluated(arts, task: str) -> pd.DataFrame:
    df = pd.read_parquet(arts["evaluate"].dir / "predictions" / f"{task}.parquet")
    return df[df["model"] == "fine_tuned"].reset_index(drop=True) if "model" in df else df


def _rows_evaluated_and_model(built, task: str) -> tuple[pd.DataFrame, pd.DataFrame, Any]:
    """The task's test rows, evaluate's predictions on the same ids in the same order, the loaded model."""
    cfg, arts, registered = built
    rows = _test_rows(cfg, arts, task)
    evaluated = _evaluated(arts, task)
    assert list(evaluated["id"]) == list(rows["id"]) and len(rows) > 0
    return rows, evaluated, _load(registered, task)


def _cut_at_end_call(text: str) -> str:
    """evaluate generates past ``<end_function_call>``; the registered model stops there (kept)."""
    i = text.find(END_CALL)
    return text if i < 0 else text[: i + len(END_CALL)]


def test_every_registered_version_has_a_signature_and_an_input_example(built):
    _, _, registered = built
    assert set(registered) == set(MODELS)
    client = mlflow.MlflowClient()
    for model, r in registered.items():
        versions = client.search_model_versions(f"name='{r['name']}'")
        assert versions, model
        for v in versions:
            info = mlflow.models.get_model_info(f"models:/{r['name']}/{v.version}")
            assert info.signature is not None, (model, v.version)
            assert info.signature.inputs.inputs and info.signature.outputs.inputs, (model, v.version)
            assert info.saved_input_example_info is not None, (model, v.version)
            assert client.get_model_version(r["name"], v.version).tags["dagtune.serving"] in (
                "task",
                "classifier",
            )


def test_function_caller_predicts_what_evaluate_predicted(built):
    rows, evaluated, model = _rows_evaluated_and_model(built, "function_calling")
    request = pd.DataFrame(
        {
            "messages": [[{"role": "user", "content": u}] for u in rows["user"]],
            "tools": [json.loads(t) for t in rows["tools"]],
        }
    )
    # rendered exactly as prepare_data rendered the training prompts, with a single <bos>
    inner = model.unwrap_python_model()
    prompts = [inner.prompt(r, i) for i, r in enumerate(request.to_dict("records"))]
    assert prompts == list(rows["prompt"])
    tok = inner.tokenizer
    for p in prompts:
        ids = tok(p, add_special_tokens=False)["input_ids"]
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1

    out = model.predict(request)
    assert list(out.columns) == ["calls", "parse_ok", "text"]
    expected = [_cut_at_end_call(t) for t in evaluated["prediction"]]
    assert list(out["text"]) == expected
    assert list(out["calls"]) == [parse_function_calls(t) for t in expected]
    assert list(out["parse_ok"]) == [parse_function_calls(t) is not None for t in expected]


def test_function_caller_takes_one_openai_style_request(built):
    """The README's call: a dict with messages and tools; calls come back parsed or [] / None."""
    _, _, registered = built
    model = _load(registered, "function_calling")
    tool = {
        "type": "function",
        "function": {
            "name": "set_alarm",
            "description": "Set an alarm.",
            "parameters": {"type": "object", "properties": {"time": {"type": "string"}}},
        },
    }
    out = model.predict({"messages": [{"role": "user", "content": "اضبط منبه 7"}], "tools": [tool]})
    assert len(out) == 1 and isinstance(out["text"][0], str)
    assert out["calls"][0] is None or isinstance(out["calls"][0], list)


def test_extractor_predicts_what_evaluate_predicted(built):
    rows, evaluated, model = _rows_evaluated_and_model(built, "extractor")
    inner = model.unwrap_python_model()
    assert [inner.prompt({"line": ln}, i) for i, ln in enumerate(rows["line"])] == list(rows["prompt"])
    out = model.predict(pd.DataFrame({"line": rows["line"]}))
    assert list(out["text"]) == list(evaluated["prediction"])
    assert list(out["equation"]) == [parse_eq(t) or "" for t in evaluated["prediction"]]


def test_classifier_predicts_what_evaluate_predicted(built):
    rows, evaluated, model = _rows_evaluated_and_model(built, "classifier")
    request = pd.DataFrame({"problem": rows["question"], "solution": rows["solution"]})
    assert model.unwrap_python_model().prompts(request) == list(rows["prompt"])  # as in training
    out = model.predict(request)
    diffs = [abs(a - b) for a, b in zip(out["probability"], evaluated["prob_flawed"], strict=True)]
    assert max(diffs) <= 1e-5, diffs
    assert list(out["label"]) == ["flawed" if p else "correct" for p in evaluated["pred"]]


def test_function_caller_stops_at_end_function_call_and_keeps_it(built):
    """The stop set holds <end_function_call>, <end_of_turn> and EOS; a generation that stops on a
    kept stop token has it at the end of ``text``, so the call parses. (Two training steps never
    emit a call: the stop mechanics are shown with the model's own first greedy token as the stop.)"""
    from dagtune.evaluation.generate import Generator
    from dagtune.formats import END_OF_TURN
    from dagtune.registry.models import task_outputs

    cfg, arts, registered = built
    inner = _load(registered, "function_calling").unwrap_python_model()
    vocab = inner.tokenizer.get_vocab()
    assert {vocab[END_CALL], vocab[END_OF_TURN], inner.tokenizer.eos_token_id} <= set(
        inner.generator.stop_ids
    )
    assert inner.kept_stops == {vocab[END_CALL]}
    assert (inner._kept(vocab[END_CALL]), inner._kept(vocab[END_OF_TURN]), inner._kept(None)) == (
        END_CALL,
        "",
        "",
    )

    prompt = _test_rows(cfg, arts, "function_calling")["prompt"][0]
    merged = str(arts["train_function_calling"].dir / "merged")
    free = Generator(merged, device="cpu").generate([prompt], 1, 4)[0]
    first = inner.tokenizer(free.text, add_special_tokens=False)["input_ids"][0]
    stopped = Generator(
        merged, device="cpu", extra_stop_tokens=(inner.tokenizer.convert_ids_to_tokens(first),)
    ).generate([prompt], 1, 4)[0]
    assert (stopped.text, stopped.finished, stopped.stop_id) == ("", True, first)

    call = "<start_function_call>call:set_alarm{time:<escape>07:30<escape>}<end_function_call>"
    out = task_outputs("function_calling", [call, "لا", "<start_function_call>call:set_alarm{"])
    assert out["calls"] == [[{"name": "set_alarm", "arguments": {"time": "07:30"}}], [], None]
    assert out["parse_ok"] == [True, True, False]
