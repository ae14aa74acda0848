"""What goes into a registered model version, and how it loads back.

* ``GGUFModel``: pyfunc over a GGUF file with llama-cpp-python, greedy decoding; takes a prompt
  string, a chat (list of ``{"role", "content"}``), or a batch of either; returns one text each.
  ``llama_cpp`` is imported inside ``load_context`` so logging works where it is not installed.
* ``ClassifierModel``: pyfunc over the classifier artifact dir; the loader is an import path kept in
  the model config (default ``dagtune.training.classifier:load_classifier``), so the model points at
  whatever loader the training node ships (it may return the model or (model, tokenizer); its
  ``predict_proba`` may return P(flawed) per text or a (texts, labels) matrix). Input texts are
  passed as they are: for the real classifier, prompts rendered the way training rendered them.
  Returns a DataFrame ``probability`` (of label 1, "flawed", for two labels), ``label``.
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


def texts_of(model_input: Any) -> list[str]:
    """Classifier input: str, list of str, or a DataFrame with a ``text`` column (first otherwise)."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        col = _column(model_input, ("text", "solution", "prompt"))
        return [str(t) for t in (col if col is not None else model_input.iloc[:, 0])]
    if isinstance(model_input, str):
        return [model_input]
    return [str(t) for t in model_input]


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


class ClassifierModel(PythonModel):
    """Probability that a solution is flawed, and the label at the configured threshold."""

    def load_context(self, context: Any) -> None:
        cfg = dict(context.model_config or {})
        loader = import_string(cfg.get("loader") or DEFAULT_CLASSIFIER_LOADER)
        loaded = loader(context.artifacts["classifier"])
        # dagtune.training.classifier.load_classifier returns (model, tokenizer)
        self.classifier = loaded[0] if isinstance(loaded, tuple) else loaded
        self.threshold = float(cfg.get("threshold", 0.5))
        self.labels = list(cfg.get("labels") or DEFAULT_LABELS)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> Any:
        import pandas as pd

        texts = texts_of(model_input)
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
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(CODE_DIR / "gguf_model.py"),
            artifacts=artifacts,
            model_config={"n_ctx": n_ctx, "max_tokens": max_tokens, "stop": list(stop)},
            pip_requirements=pip_requirements("llama-cpp-python", "pandas"),
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
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(CODE_DIR / "classifier_model.py"),
            artifacts={"classifier": str(artifact_dir)},
            model_config={"loader": loader, "threshold": float(threshold), "labels": list(labels)},
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
