"""The registered function caller's predict path on the real tiny FunctionGemma tokenizer and chat
template: OpenAI-style request in, one <bos>, generation cut at <end_function_call> with the tag kept,
parsed calls out. The network's greedy output is scripted (a random tiny model never writes a call);
everything around it (rendering, stop set, cut, parsing) is the product code.
The pipeline-level agreement with evaluate is in test_registry_usable.py (slow)."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from dagtune.data import render
from dagtune.formats import END_CALL, START_RESPONSE, format_function_call
from dagtune.registry.models import EXAMPLE_TOOL, TaskModel, input_example, signature
from dagtune.store import ArtifactStore

DEVELOPER = "You are a model that can do function calling with the following functions"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> TaskModel:
    from dagtune.models import resolve_model

    path = resolve_model("tiny-functiongemma", ArtifactStore(tmp_path_factory.mktemp("store")))
    m = TaskModel()
    cfg = {"task": "function_calling", "developer_prompt": DEVELOPER, "max_new_tokens": 40, "device": "cpu"}
    m.load_context(SimpleNamespace(model_config=cfg, artifacts={"model": path}))
    return m


def _script(model: TaskModel, text: str) -> list[int]:
    """Make the network answer ``text`` (then padding) to every prompt; returns what it was fed."""
    tok, seen = model.tokenizer, []
    ids = tok(text, add_special_tokens=False)["input_ids"]

    def fake_generate(input_ids, attention_mask, **kw):
        assert kw["do_sample"] is False and set(kw["eos_token_id"]) == set(model.generator.stop_ids)
        seen.extend(input_ids[0][attention_mask[0].bool()].tolist())
        return torch.cat([input_ids, torch.tensor([ids] * len(input_ids))], dim=1)

    model.generator.model.generate = fake_generate
    return seen


def test_request_renders_like_training_with_one_bos_and_the_call_parses(model):
    call = format_function_call("set_alarm", {"time": "07:30"})
    seen = _script(model, call + START_RESPONSE + "garbage after the call")
    request = input_example("function_calling")
    out = model.predict(None, request)

    tok = model.tokenizer
    messages = [{"role": "developer", "content": DEVELOPER}, *request["messages"][0]]
    expected_prompt = render.render_prompt(tok, messages, request["tools"][0])
    assert expected_prompt.startswith(tok.bos_token)  # the template writes <bos> itself ...
    assert seen == tok(expected_prompt, add_special_tokens=False)["input_ids"]
    assert seen.count(tok.bos_token_id) == 1  # ... so the model sees exactly one
    assert tok(expected_prompt)["input_ids"].count(tok.bos_token_id) == 2  # what add_special_tokens did

    assert out["text"][0] == call and out["text"][0].endswith(END_CALL)
    assert out["calls"][0] == [{"name": "set_alarm", "arguments": {"time": "07:30"}}]
    assert bool(out["parse_ok"][0]) is True


def test_end_of_turn_stops_and_is_not_kept(model):
    _script(model, "لا أداة<end_of_turn>more")
    out = model.predict(None, pd.DataFrame({"messages": [[{"role": "user", "content": "مرحبا"}]]}))
    assert out["text"][0] == "لا أداة" and out["calls"][0] == []


def test_bad_requests_name_row_and_field(model):
    with pytest.raises(ValueError, match="row 1: messages"):
        model.predict(None, [{"messages": [{"role": "user", "content": "x"}]}, {"messages": "[]"}])
    with pytest.raises(ValueError, match="row 0: tools: .*function.name"):
        model.predict(None, {"messages": [{"role": "user", "content": "x"}], "tools": [{"function": {}}]})


def test_signatures_have_columns_and_examples_fit_them():
    from mlflow.models.utils import _enforce_schema

    for task in ("function_calling", "extractor", "classifier"):
        sig = signature(task)
        assert sig.inputs.input_names() and sig.outputs.input_names() and sig.params is not None
        _enforce_schema(input_example(task), sig.inputs)  # raises on a mismatch
    assert input_example("function_calling")["tools"][0] == [EXAMPLE_TOOL]
