"""Render examples into each model's exact input format with the model's own chat template.

Training, evaluation and the GGUF export all read ``prompt``/``completion``/``text`` from these files,
so the template is applied exactly once, here. ``prompt`` ends with the generation prompt; ``text`` is
what the template renders for the whole conversation and starts with ``prompt`` (checked per row), so
``completion`` is exactly the tokens the model must learn to produce.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pandas as pd

from dagtune.data.errors import DataError
from dagtune.formats import format_eq, parse_function_calls

EXTRACTOR_INSTRUCTION = (
    "Extract the equation from this line of a math solution. Answer with <eq>lhs=rhs</eq> written without "
    "spaces and with * for multiplication, or <eq></eq> if the line has no equation.\n\nLine: "
)
CLASSIFIER_PROMPT = (
    "You are a math tutor. Read the problem and the student's solution, then decide whether the solution "
    "is correct.\n\nProblem: {question}\n\nSolution: {solution}\n\nIs this solution correct?"
)
# The classifier reads the hidden state of the prompt's last token; the verdict makes `text` a complete
# conversation too, so a generative reading of the same data is possible.
CLASSIFIER_VERDICTS = {0: "Correct", 1: "Flawed"}

COMMON_COLUMNS = ["id", "prompt", "completion", "text"]
TASK_COLUMNS = {
    "function_calling": ["user", "dialect", "domain", "has_call", "tools", "target_name", "target_arguments"],
    "extractor": ["line", "eqn", "type"],
    "classifier": ["question", "solution", "label", "error_type"],
}
TAIL_COLUMNS = ["n_prompt_tokens", "n_tokens", "truncated", "source"]


class Unrenderable(Exception):
    """A row the template cannot render faithfully (reported as a bad row, not a crash)."""


def render_prompt(tokenizer: Any, messages: list[dict[str, Any]], tools: list | None = None) -> str:
    """The generation prompt for ``messages`` (and ``tools``): what training rendered before the answer,
    and what a registered model renders at inference."""
    kw: dict[str, Any] = {"tokenize": False}
    if tools is not None:
        kw["tools"] = tools
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kw)


def function_calling_messages(developer_prompt: str, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The developer turn training put first (FunctionGemma's activation line), unless the chat has one."""
    if messages and messages[0].get("role") in ("developer", "system"):
        return list(messages)
    return [{"role": "developer", "content": developer_prompt}, *messages]


def extractor_messages(line: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": EXTRACTOR_INSTRUCTION + line}]


def classifier_messages(question: str, solution: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": CLASSIFIER_PROMPT.format(question=question, solution=solution)}]


def render_conversation(
    tokenizer: Any, messages: list[dict[str, Any]], target: dict[str, Any], tools: list | None = None
) -> tuple[str, str, str]:
    """(prompt, completion, text) from the tokenizer's chat template."""
    kw: dict[str, Any] = {"tokenize": False}
    if tools is not None:
        kw["tools"] = tools
    prompt = render_prompt(tokenizer, messages, tools)
    text = tokenizer.apply_chat_template([*messages, target], add_generation_prompt=False, **kw)
    if not text.startswith(prompt):
        # A template that renders history differently once an answer follows would make training and
        # inference disagree about the prompt: refuse the whole task, it is not a data problem.
        raise DataError(
            "chat template renders the prompt differently with and without the answer; "
            f"prompt ends {prompt[-80:]!r}, text has {text[: len(prompt)][-80:]!r}"
        )
    return prompt, text[len(prompt) :], text


def render_function_calling(
    tokenizer: Any, ex: dict[str, Any], developer_prompt: str, negative_reply: str
) -> dict:
    """FunctionGemma: developer turn with the tool declarations, user request, then either one tool call
    (the template writes <start_function_call>call:NAME{...}<end_function_call><start_function_response>)
    or the fixed no-tool reply."""
    messages = function_calling_messages(developer_prompt, [{"role": "user", "content": ex["user"]}])
    if ex["has_call"]:
        call = {"name": ex["target_name"], "arguments": ex["target_arguments"]}
        target = {"role": "assistant", "tool_calls": [{"type": "function", "function": call}]}
    else:
        target = {"role": "assistant", "content": negative_reply}
    prompt, completion, text = render_conversation(tokenizer, messages, target, ex["tools"])
    expected = [{"name": ex["target_name"], "arguments": ex["target_arguments"]}] if ex["has_call"] else []
    if parse_function_calls(completion) != expected:  # what evaluation will parse must be the target
        raise Unrenderable(f"rendered completion does not parse back to the target: {completion[:120]!r}")
    return {
        "prompt": prompt,
        "completion": completion,
        "text": text,
        "user": ex["user"],
        "dialect": ex["dialect"],
        "domain": ex["domain"],
        "has_call": ex["has_call"],
        "tools": json.dumps(ex["tools"], ensure_ascii=False),
        "target_name": ex["target_name"],
        "target_arguments": json.dumps(ex["target_arguments"], ensure_ascii=False, sort_keys=True),
    }


def _rendered(conversation: tuple[str, str, str], ex: dict[str, Any], carried: tuple[str, ...]) -> dict:
    prompt, completion, text = conversation
    return {"prompt": prompt, "completion": completion, "text": text, **{k: ex[k] for k in carried}}


def render_extractor(tokenizer: Any, ex: dict[str, Any]) -> dict:
    """Gemma-3: fixed instruction + the line in the user turn; target <eq>lhs=rhs</eq> or <eq></eq>."""
    messages = extractor_messages(ex["line"])
    target = {"role": "assistant", "content": format_eq(ex["eqn"])}
    return _rendered(render_conversation(tokenizer, messages, target), ex, ("line", "eqn", "type"))


def render_classifier(tokenizer: Any, ex: dict[str, Any]) -> dict:
    """Phi: a tutor prompt with problem and solution; the label is a column, not generated text."""
    messages = classifier_messages(ex["question"], ex["solution"])
    target = {"role": "assistant", "content": CLASSIFIER_VERDICTS[ex["label"]]}
    row = _rendered(
        render_conversation(tokenizer, messages, target), ex, ("question", "solution", "error_type")
    )
    return {**row, "label": int(ex["label"])}


@contextmanager
def parallel_tokenizers() -> Iterator[None]:
    """The fast tokenizers' batch encoding on every CPU for the block. The runner turns it off for the
    process (TOKENIZERS_PARALLELISM=false: node processes start later), which left prepare_data counting
    the nightly run's tokens on one core; the Rust side reads the variable at each batch call."""
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def count_tokens(tokenizer: Any, texts: list[str]) -> list[int]:
    """Token counts of already-rendered text: the template wrote <bos> itself, so add none here."""
    if not texts:
        return []
    with parallel_tokenizers():
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [len(x) for x in ids]


def render_split(
    task: str, tokenizer: Any, rows: list[dict[str, Any]], max_length: int, options: dict[str, str]
) -> tuple[pd.DataFrame, list[tuple[dict[str, Any], str]]]:
    """A split's DataFrame (fixed column order) and the rows that could not be rendered, with why."""
    out, failed = [], []
    for ex in rows:
        try:
            if task == "function_calling":
                rendered = render_function_calling(
                    tokenizer, ex, options["developer_prompt"], options["negative_reply"]
                )
            elif task == "extractor":
                rendered = render_extractor(tokenizer, ex)
            else:
                rendered = render_classifier(tokenizer, ex)
        except Unrenderable as e:
            failed.append((ex, str(e)))
            continue
        out.append({"id": ex["id"], **rendered, "source": ex["source"]})
    n_tokens = count_tokens(tokenizer, [r["text"] for r in out])
    n_prompt = count_tokens(tokenizer, [r["prompt"] for r in out])
    for r, n, p in zip(out, n_tokens, n_prompt, strict=True):
        r.update(n_prompt_tokens=p, n_tokens=n, truncated=n > max_length)
    columns = COMMON_COLUMNS + TASK_COLUMNS[task] + TAIL_COLUMNS
    return pd.DataFrame(out, columns=columns), failed
