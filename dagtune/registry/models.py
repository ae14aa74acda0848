"""What goes into a registered model version, and how it loads back.

* ``TaskModel``: what a function-calling or extractor version serves when its training wrote
  ``merged/``: the request is rendered with the training chat template (``dagtune.data.render``),
  generated with the evaluate node's ``Generator`` (greedy, add_special_tokens=False, so the
  template's ``<bos>`` is the only one) and parsed with evaluate's parsers. Signature: function caller
  ``messages`` (+ ``tools``) -> ``calls``, ``parse_ok``, ``text``; extractor ``line`` -> ``equation``,
  ``text``. Logged with a signature and an input example (``signature``, ``input_example``).
* ``GGUFModel``: pyfunc over a GGUF file with llama-cpp-python, greedy decoding; takes a prompt
  string, a chat (list of ``{"role", "content"}``), or a batch of either; returns one text each.
  ``llama_cpp`` is imported inside ``load_context`` so logging works where it is not installed.
* ``ClassifierModel``: pyfunc over the classifier artifact dir; the loader is an import path kept in
  the model config (default ``dagtune.training.classifier:load_classifier``), so the model points at
  whatever loader the training node ships (it returns (model, tokenizer); its ``predict_proba`` may
  return P(flawed) per text or a (texts, labels) matrix). Input ``problem`` + ``solution``, rendered
  with the tokenizer's chat template as training rendered them. Returns a DataFrame
  ``probability`` (of label 1, "flawed", for two labels), ``label``.
* Merged 16-bit model: transformers flavor, logged from its local checkpoint directory (no copy in
  memory), loads back bit-identical.
* PEFT adapter: transformers flavor. A PEFT model whose base is a local directory MUST be logged with
  ``base_model_path``: without it MLflow 3 saves the LoRA-wrapped base under plain module names and
  the reload re-initialises the wrapped projections at random, with only a load report to show for
  it. ``log_peft_model`` passes it whenever the base resolves to a local directory.

Both pyfunc classes are logged as "models from code" (the tiny scripts in ``_code/``), not pickled:
a registered version then stays loadable after the classes change, as long as ``dagtune`` imports.
Explicit ``pip_requirements`` skip MLflow's requirement inference, which imports the model in a
subprocess and costs seconds per log.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

CODE_DIR = Path(__file__).resolve().parent / "_code"
DEFAULT_CLASSIFIER_LOADER = "dagtune.training.classifier:load_classifier"
DEFAULT_LABELS = ("correct", "flawed")


def _requirement(dist: str) -> str | None:
    from importlib import metadata

    try:
        return f"{dist}=={metadata.version(dist)}"
    except metadata.PackageNotFoundError:
        return None


def pip_requirements(*dists: str) -> list[str]:
    return [r for r in (_requirement(d) for d in ("mlflow", *dists)) if r]


def import_string(path: str) -> Any:
    """``"pkg.module:attr"`` (or ``"pkg.module.attr"``) -> the object."""
    mod, sep, attr = path.partition(":")
    if not sep:
        mod, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(mod), attr)


# ----------------------------------------------------------------------------------------------
# input normalisation
# ----------------------------------------------------------------------------------------------
def _is_chat(x: Any) -> bool:
    return (
        isinstance(x, Sequence)
        and not isinstance(x, str)
        and len(x) > 0
        and all(isinstance(m, Mapping) and "role" in m for m in x)
    )


def _column(df: Any, names: Sequence[str]) -> list[Any] | None:
    for n in names:
        if n in df.columns:
            return list(df[n])
    return None


def generation_inputs(model_input: Any) -> list[str | list[dict[str, Any]]]:
    """One prompt or chat per output. Accepts str, chat, list of either, ``{"prompt"|"messages"}``
    dicts, or a DataFrame with a ``prompt``/``messages`` column (its first column otherwise)."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        col = _column(model_input, ("messages", "prompt", "text"))
        items: list[Any] = col if col is not None else list(model_input.iloc[:, 0])
    elif isinstance(model_input, str) or _is_chat(model_input):
        items = [model_input]
    elif isinstance(model_input, Mapping):
        items = [model_input]
    else:
        items = list(model_input)
    out: list[str | list[dict[str, Any]]] = []
    for it in items:
        if isinstance(it, Mapping):
            it = it.get("messages", it.get("prompt"))
        if hasattr(it, "tolist"):  # numpy arrays from a DataFrame cell
            it = it.tolist()
        if isinstance(it, str):
            out.append(it)
        elif _is_chat(it):
            out.append([dict(m) for m in it])
        else:
            raise ValueError(f"expected a prompt string or a list of chat messages, got {type(it).__name__}")
    return out


# ----------------------------------------------------------------------------------------------
# pyfunc models
# ----------------------------------------------------------------------------------------------
class GGUFModel(PythonModel):
    """Greedy generation from a GGUF file (llama-cpp-python)."""

    def load_context(self, context: Any) -> None:
        from llama_cpp import Llama  # lazy: not needed to log, register or list versions

        cfg = dict(context.model_config or {})
        self.max_tokens = int(cfg.get("max_tokens", 256))
        self.stop = list(cfg.get("stop") or [])
        self.llm = Llama(
            model_path=context.artifacts["gguf"],
            n_ctx=int(cfg.get("n_ctx", 2048)),
            n_threads=int(cfg.get("n_threads") or max(1, (os.cpu_count() or 2) // 2)),
            seed=int(cfg.get("seed", 0)),
            verbose=False,
        )

    def _generate(self, item: str | list[dict[str, Any]], max_tokens: int) -> str:
        greedy = {"temperature": 0.0, "top_k": 1, "top_p": 1.0, "max_tokens": max_tokens}
        if isinstance(item, str):
            out = self.llm.create_completion(item, stop=self.stop or None, **greedy)
            return out["choices"][0]["text"]
        out = self.llm.create_chat_completion(messages=item, stop=self.stop or None, **greedy)
        return out["choices"][0]["message"]["content"] or ""

    # model_input is left unannotated on purpose: MLflow turns a type hint into input validation
    # and conversion, which would reject the mix of strings and chats this model accepts.
    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        max_tokens = int((params or {}).get("max_tokens", self.max_tokens))
        return [self._generate(it, max_tokens) for it in generation_inputs(model_input)]


# ----------------------------------------------------------------------------------------------
# task models: the registered function caller and extractor (transformers, evaluate's decoding)
# ----------------------------------------------------------------------------------------------
FUNCTION_CALLING, EXTRACTOR = "function_calling", "extractor"


def _json_value(value: Any, what: str, row: int) -> Any:
    """A cell that is a JSON string or an already-decoded value (numpy arrays -> lists)."""
    import json

    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"row {row}: {what} is not valid JSON: {e}") from None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [_json_value(v, what, row) if hasattr(v, "tolist") else v for v in value]
    return value


def records_of(model_input: Any) -> list[dict[str, Any]]:
    """Rows as dicts from a DataFrame, a dict (one row) or a list of dicts."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        return model_input.to_dict("records")
    if isinstance(model_input, Mapping):
        return [dict(model_input)]
    return [dict(r) for r in model_input]


def fc_chat(rec: Mapping[str, Any], row: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) of one function-calling request; tools normalised the way prepare_data did."""
    from dagtune.data.tools import RowProblem, normalize_tool

    messages = _json_value(rec.get("messages"), "messages", row)
    if not _is_chat(messages):
        raise ValueError(f"row {row}: messages must be a non-empty list of {{role, content}} objects")
    tools = rec.get("tools")
    missing = tools is None or (isinstance(tools, float) and tools != tools)  # NaN: a DataFrame gap
    tools = None if missing else _json_value(tools, "tools", row)
    if tools is not None and not isinstance(tools, list):
        raise ValueError(f"row {row}: tools must be a list of tool schemas, got {type(tools).__name__}")
    try:
        tools = None if tools is None else [normalize_tool(t) for t in tools]
    except RowProblem as e:
        raise ValueError(f"row {row}: tools: {e}") from None
    return [{k: v for k, v in m.items() if v is not None} for m in messages], tools


class TaskModel(PythonModel):
    """The fine-tuned function caller or extractor: renders the request with the training chat
    template (dagtune.data.render), generates with the evaluate node's Generator (greedy, the
    prompt's own single ``<bos>``, add_special_tokens=False) and parses with evaluate's parsers.

    function_calling: input ``messages`` (+ optional ``tools``, OpenAI-style); a chat without a
    developer/system turn gets the one training put first. Stops at ``<end_function_call>`` (kept in
    ``text``, so the call parses) or ``<end_of_turn>``/EOS. Output ``calls`` (``[{name, arguments}]``,
    ``[]`` for no call, None for malformed markup), ``parse_ok``, ``text``.
    extractor: input ``line``; output ``equation`` (``lhs=rhs``, ``""`` for none or unparseable) and
    ``text``."""

    def load_context(self, context: Any) -> None:
        from dagtune.evaluation.generate import Generator
        from dagtune.formats import END_CALL

        cfg = dict(context.model_config or {})
        self.task = cfg["task"]
        self.developer_prompt = str(cfg.get("developer_prompt") or "")
        self.batch_size = int(cfg.get("batch_size", 8))
        self.max_new_tokens = int(cfg.get("max_new_tokens", 128))
        extra = (END_CALL,) if self.task == FUNCTION_CALLING else ()
        self.generator = Generator(
            context.artifacts["model"], device=cfg.get("device", "auto"), extra_stop_tokens=extra
        )
        self.tokenizer = self.generator.tokenizer
        self.kept_stops = set(self.tokenizer.convert_tokens_to_ids(list(extra)))

    def prompt(self, rec: Mapping[str, Any], row: int) -> str:
        from dagtune.data import render

        if self.task == FUNCTION_CALLING:
            messages, tools = fc_chat(rec, row)
            chat = render.function_calling_messages(self.developer_prompt, messages)
            text = render.render_prompt(self.tokenizer, chat, tools)
        else:
            line = rec.get("line")
            if not isinstance(line, str):
                raise ValueError(f"row {row}: line must be a string, got {type(line).__name__}")
            text = render.render_prompt(self.tokenizer, render.extractor_messages(line))
        return with_one_bos(text, self.tokenizer.bos_token)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> Any:
        import pandas as pd

        params = params or {}
        prompts = [self.prompt(r, i) for i, r in enumerate(records_of(model_input))]
        gens = self.generator.generate(
            prompts,
            int(params.get("batch_size") or self.batch_size),
            int(params.get("max_new_tokens") or self.max_new_tokens),
        )
        texts = [g.text + self._kept(g.stop_id) for g in gens]
        return pd.DataFrame(task_outputs(self.task, texts))

    def _kept(self, stop_id: int | None) -> str:
        return self.tokenizer.convert_ids_to_tokens(stop_id) if stop_id in self.kept_stops else ""


def with_one_bos(prompt: str, bos: str | None) -> str:
    """The prompt is tokenized with add_special_tokens=False: the template's own ``<bos>`` is the
    only one; a template that writes none gets one here."""
    return prompt if not bos or prompt.startswith(bos) else bos + prompt


def task_outputs(task: str, texts: list[str]) -> dict[str, list[Any]]:
    """Generated texts -> output columns, with the parsers the evaluate node scores with."""
    from dagtune.formats import parse_eq, parse_function_calls

    if task == FUNCTION_CALLING:
        calls = [parse_function_calls(t) for t in texts]
        return {"calls": calls, "parse_ok": [c is not None for c in calls], "text": texts}
    return {"equation": [parse_eq(t) or "" for t in texts], "text": texts}


def load_on_device(loader: Any, artifact_dir: str | Path, device: str) -> Any:
    """The classifier from a ``register.classifier_loader`` function, on ``device`` when the loader
    takes one (the default loader's own default is the CPU in float32: minutes for a real-size model)."""
    import inspect

    if "device" in inspect.signature(loader).parameters:
        return loader(str(artifact_dir), device=device)
    return loader(str(artifact_dir))


class ClassifierModel(PythonModel):
    """Input ``problem`` + ``solution``, rendered with the classifier's chat template as training
    rendered them (dagtune.data.render); output ``probability`` (that the solution is flawed, label 1)
    and ``label`` at the threshold evaluate chose on validation."""

    def load_context(self, context: Any) -> None:
        from dagtune.runtime import resolve_device

        cfg = dict(context.model_config or {})
        loader = import_string(cfg.get("loader") or DEFAULT_CLASSIFIER_LOADER)
        device = resolve_device(cfg.get("device", "auto"))
        loaded = load_on_device(loader, context.artifacts["classifier"], device)
        # dagtune.training.classifier.load_classifier returns (model, tokenizer)
        if not isinstance(loaded, tuple) or len(loaded) != 2 or loaded[1] is None:
            raise TypeError(f"classifier loader {cfg.get('loader')!r} must return (model, tokenizer)")
        self.classifier, self.tokenizer = loaded
        self.threshold = float(cfg.get("threshold", 0.5))
        self.labels = list(cfg.get("labels") or DEFAULT_LABELS)

    def prompts(self, model_input: Any) -> list[str]:
        from dagtune.data import render

        out = []
        for i, rec in enumerate(records_of(model_input)):
            problem, solution = rec.get("problem"), rec.get("solution")
            if not isinstance(problem, str) or not isinstance(solution, str):
                raise ValueError(f"row {i}: problem and solution must be strings")
            out.append(render.render_prompt(self.tokenizer, render.classifier_messages(problem, solution)))
        return out

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> Any:
        import pandas as pd

        texts = self.prompts(model_input)
        threshold = float((params or {}).get("threshold", self.threshold))
        if not texts:
            return pd.DataFrame({"probability": [], "label": []})
        probs, idx = label_probabilities(self.classifier.predict_proba(texts), threshold)
        return pd.DataFrame({"probability": probs, "label": [self.labels[i] for i in idx]})


def label_probabilities(raw: Any, threshold: float) -> tuple[list[float], list[int]]:
    """predict_proba output -> (probability, label index) per text. Accepts P(label 1) per text
    (binary, thresholded) or a (texts, labels) matrix: two columns -> column 1 thresholded, more ->
    argmax with its probability."""
    import numpy as np

    arr = np.asarray(raw, dtype=float)
    if arr.ndim == 2 and arr.shape[1] == 2:
        arr = arr[:, 1]
    if arr.ndim == 1:
        return arr.tolist(), [int(p >= threshold) for p in arr]
    best = arr.argmax(axis=1)
    return arr.max(axis=1).tolist(), best.tolist()


# ----------------------------------------------------------------------------------------------
# logging helpers: each logs into ``run_id`` (made active for the call; log_model has no run_id)
# ----------------------------------------------------------------------------------------------
def _save_pyfunc(path: str, mlflow_model: Any, validate_serving_input: bool = True, **kwargs: Any) -> Any:
    return mlflow.pyfunc.save_model(path=path, mlflow_model=mlflow_model, **kwargs)


def log_pyfunc(**kwargs: Any) -> Any:
    """``mlflow.pyfunc.log_model`` without MLflow's serving-input check: given an input example, MLflow
    loads the logged model and predicts on it while logging (``Model.log``'s ``validate_serving_input``,
    which pyfunc's ``log_model`` does not expose). At real size that loaded Phi-4-mini and merged its
    adapter inside the register node. The example and signature are stored as before; loading and
    predicting with each registered model is what ``tests/test_registry_usable.py`` checks."""
    from types import SimpleNamespace

    from mlflow.models import Model

    flavor = SimpleNamespace(__name__=mlflow.pyfunc.__name__, save_model=_save_pyfunc)
    return Model.log(artifact_path=None, flavor=flavor, validate_serving_input=False, **kwargs)


@contextmanager
def active_run(run_id: str) -> Iterator[None]:
    """Make an existing run the fluent API's active run; ends it FINISHED afterwards (FAILED on
    error), leaving whatever run was active before untouched."""
    with mlflow.start_run(run_id=run_id, nested=True):
        yield


def log_gguf_model(
    run_id: str,
    gguf_file: str | Path,
    *,
    name: str = "model",
    extra_artifacts: Mapping[str, str | Path] | None = None,
    n_ctx: int = 2048,
    max_tokens: int = 256,
    stop: Sequence[str] = (),
    metadata: Mapping[str, Any] | None = None,
) -> Any:
    """Log a GGUF pyfunc model. ``extra_artifacts`` (e.g. the adapter dir) travel with it."""
    artifacts = {"gguf": str(gguf_file), **{k: str(v) for k, v in (extra_artifacts or {}).items()}}
    with active_run(run_id):
        return log_pyfunc(
            name=name,
            python_model=str(CODE_DIR / "gguf_model.py"),
            artifacts=artifacts,
            model_config={"n_ctx": n_ctx, "max_tokens": max_tokens, "stop": list(stop)},
            pip_requirements=pip_requirements("llama-cpp-python", "pandas"),
            metadata=dict(metadata or {}),
        )


# ----------------------------------------------------------------------------------------------
# signatures and input examples (the README's "Using a registered model" shows the same calls)
# ----------------------------------------------------------------------------------------------
EXAMPLE_TOOL = {
    "type": "function",
    "function": {
        "name": "set_alarm",
        "description": "Set an alarm on the phone.",
        "parameters": {
            "type": "object",
            "properties": {"time": {"type": "string", "description": "HH:MM, 24-hour clock"}},
            "required": ["time"],
        },
    },
}
INPUT_EXAMPLES: dict[str, dict[str, list[Any]]] = {
    FUNCTION_CALLING: {
        "messages": [[{"role": "user", "content": "اضبط منبه الساعة 7:30 الصبح"}]],
        "tools": [[EXAMPLE_TOOL]],
    },
    EXTRACTOR: {"line": ["So she has 12 - 5 = 7 apples left."]},
    "classifier": {
        "problem": ["Tom has 3 bags of 4 apples. How many apples?"],
        "solution": ["3 * 4 = 12. Tom has 12 apples."],
    },
}


def signature(task: str, *, max_new_tokens: int = 128, batch_size: int = 8, threshold: float = 0.5) -> Any:
    """Column specs of each registered model's input and output, and its predict params."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

    if task == "classifier":
        inputs = Schema([ColSpec("string", "problem"), ColSpec("string", "solution")])
        outputs = Schema([ColSpec("double", "probability"), ColSpec("string", "label")])
        return ModelSignature(inputs, outputs, ParamSchema([ParamSpec("threshold", "double", threshold)]))
    params = ParamSchema(
        [ParamSpec("max_new_tokens", "long", max_new_tokens), ParamSpec("batch_size", "long", batch_size)]
    )
    if task == FUNCTION_CALLING:
        message = Object([Property("role", "string"), Property("content", "string")])
        # tools are JSON schemas of any shape, calls' arguments too: "any", not a fixed object
        inputs = Schema([ColSpec(Array(message), "messages"), ColSpec(AnyType(), "tools", required=False)])
        outputs = Schema(
            [ColSpec(AnyType(), "calls"), ColSpec("boolean", "parse_ok"), ColSpec("string", "text")]
        )
        return ModelSignature(inputs, outputs, params)
    if task == EXTRACTOR:
        inputs = Schema([ColSpec("string", "line")])
        outputs = Schema([ColSpec("string", "equation"), ColSpec("string", "text")])
        return ModelSignature(inputs, outputs, params)
    raise ValueError(f"no signature for task {task!r}")


def input_example(task: str) -> Any:
    import pandas as pd

    return pd.DataFrame(INPUT_EXAMPLES[task])


def log_task_model(
    run_id: str,
    task: str,
    model_dir: str | Path,
    *,
    developer_prompt: str = "",
    max_new_tokens: int = 128,
    batch_size: int = 8,
    name: str = "model",
    metadata: Mapping[str, Any] | None = None,
) -> Any:
    """Log the function caller or extractor (a merged HF checkpoint with its tokenizer) as pyfunc."""
    if task not in (FUNCTION_CALLING, EXTRACTOR):
        raise ValueError(f"task must be {FUNCTION_CALLING} or {EXTRACTOR}, got {task!r}")
    config = {
        "task": task,
        "developer_prompt": developer_prompt,
        "max_new_tokens": int(max_new_tokens),
        "batch_size": int(batch_size),
        "device": "auto",
    }
    with active_run(run_id):
        return log_pyfunc(
            name=name,
            python_model=str(CODE_DIR / "task_model.py"),
            artifacts={"model": str(model_dir)},
            model_config=config,
            signature=signature(task, max_new_tokens=max_new_tokens, batch_size=batch_size),
            # stored, not run (log_pyfunc); the signature above is given, so none is inferred either
            input_example=input_example(task),
            pip_requirements=pip_requirements("torch", "transformers", "pandas"),
            metadata=dict(metadata or {}),
        )


def log_classifier_model(
    run_id: str,
    artifact_dir: str | Path,
    *,
    loader: str = DEFAULT_CLASSIFIER_LOADER,
    name: str = "model",
    threshold: float = 0.5,
    labels: Sequence[str] = DEFAULT_LABELS,
    metadata: Mapping[str, Any] | None = None,
) -> Any:
    """Log the classifier (adapter, head, config, tokenizer: the whole artifact dir) as pyfunc."""
    with active_run(run_id):
        return log_pyfunc(
            name=name,
            python_model=str(CODE_DIR / "classifier_model.py"),
            artifacts={"classifier": str(artifact_dir)},
            model_config={
                "loader": loader,
                "threshold": float(threshold),
                "labels": list(labels),
                "device": "auto",
            },
            signature=signature("classifier", threshold=float(threshold)),
            input_example=input_example("classifier"),
            pip_requirements=pip_requirements("torch", "transformers", "peft", "safetensors", "pandas"),
            metadata=dict(metadata or {}),
        )


def log_merged_model(
    run_id: str,
    merged_dir: str | Path,
    *,
    name: str = "merged",
    task: str = "text-generation",
    metadata: Mapping[str, Any] | None = None,
) -> Any:
    """Log a merged HF model dir (weights + tokenizer) with the transformers flavor, from disk."""
    with active_run(run_id):
        return mlflow.transformers.log_model(
            str(merged_dir),
            name=name,
            task=task,
            pip_requirements=pip_requirements("torch", "transformers", "accelerate"),
            metadata=dict(metadata or {}),
        )


def resolve_local_base(base_model: str, base_model_path: str | Path | None = None) -> str | None:
    """The local base directory to record, or None when the base is a hub id MLflow can refetch."""
    if base_model_path is not None:
        return str(Path(base_model_path).resolve())
    p = Path(os.path.expanduser(base_model))
    return str(p.resolve()) if (p / "config.json").is_file() else None


def log_peft_model(
    run_id: str,
    peft_model: Any,
    tokenizer: Any,
    *,
    base_model_path: str | Path | None = None,
    name: str = "adapter",
    task: str = "text-generation",
    metadata: Mapping[str, Any] | None = None,
) -> Any:
    """Log an in-memory PEFT model with the transformers flavor (only the adapter is stored).

    The base is recorded by reference: a hub id as-is, a local directory through ``base_model_path``
    (taken from the base's ``name_or_path`` when not given). A base that is neither is refused: MLflow
    would save it in a form whose reload silently re-initialises the LoRA-wrapped layers."""
    from mlflow.utils.huggingface_utils import is_valid_hf_repo_id

    base_name = str(getattr(peft_model.get_base_model(), "name_or_path", "") or "")
    local = resolve_local_base(base_name, base_model_path)
    if local is None and not (is_valid_hf_repo_id(base_name) and not Path(base_name).exists()):
        raise ValueError(
            f"PEFT base {base_name!r} is neither a local model directory nor a hub id: pass "
            f"base_model_path, or MLflow reloads the base with re-initialised layers"
        )
    with active_run(run_id):
        return mlflow.transformers.log_model(
            {"model": peft_model, "tokenizer": tokenizer},
            name=name,
            task=task,
            base_model_path=local,
            pip_requirements=pip_requirements("torch", "transformers", "peft", "accelerate"),
            metadata=dict(metadata or {}),
        )
