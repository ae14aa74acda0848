"""Test doubles and fixtures' plumbing for the registry tests (not a test module).

* ``StandinClassifier`` / ``load_standin_classifier``: a STAND-IN for the real classifier loader
  (``dagtune.training.classifier.load_classifier``), used only by tests so the pyfunc can be logged,
  loaded by alias and asked to predict without training anything. The pyfunc reaches it through the
  import path ``registry_helpers:load_standin_classifier`` kept in its model config (pytest puts
  ``tests/`` on sys.path).
* ``fake_llama_cpp``: a module standing in for llama-cpp-python where it is not installed, recording
  the decoding arguments so the test can check they are greedy.
* ``migrated_db``: a SQLite MLflow store migrated once per session and copied per test (creating the
  schema costs ~6 s each time).
* ``MlflowServer``: a real ``mlflow server`` on 127.0.0.1 and a free port.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.request
from pathlib import Path
from typing import Any

from dagtune.pipeline import NODES
from dagtune.store import ArtifactStore

STANDIN_LOADER = "registry_helpers:load_standin_classifier"


# ----------------------------------------------------------------------------------------------
# stand-in classifier
# ----------------------------------------------------------------------------------------------
class StandinClassifier:
    """Probability of "flawed" = share of the configured marker words present in the text."""

    def __init__(self, markers: list[str]):
        self.markers = markers

    def predict_proba(self, texts: list[str]) -> list[float]:
        return [0.9 if any(m in t for m in self.markers) else 0.1 for t in texts]


def solutions(*texts: str) -> Any:
    """The classifier pyfunc's input: one problem per solution."""
    import pandas as pd

    return pd.DataFrame({"problem": ["How many apples?"] * len(texts), "solution": list(texts)})


class StandinTokenizer:
    """Renders a chat as its last message's text (the real loader returns the model's tokenizer)."""

    bos_token = None

    def apply_chat_template(self, messages: list[dict[str, Any]], **_: Any) -> str:
        return messages[-1]["content"]


def load_standin_classifier(artifact_dir: str) -> tuple[StandinClassifier, StandinTokenizer]:
    """The real loader's shape: (model, tokenizer)."""
    cfg = json.loads((Path(artifact_dir) / "classifier_config.json").read_text())
    return StandinClassifier(cfg["markers"]), StandinTokenizer()


class StandinMatrixClassifier(StandinClassifier):
    """Like dagtune.training.classifier: a (texts, labels) probability matrix."""

    def predict_proba(self, texts: list[str]) -> list[list[float]]:
        return [[1 - p, p] for p in super().predict_proba(texts)]


def load_standin_classifier_tuple(artifact_dir: str) -> tuple[StandinMatrixClassifier, StandinTokenizer]:
    """The real loader's shapes: (model, tokenizer), predict_proba a (texts, 2) matrix."""
    return StandinMatrixClassifier(load_standin_classifier(artifact_dir)[0].markers), StandinTokenizer()


def write_standin_classifier(out: Path, markers: tuple[str, ...] = ("wrong",), salt: str = "") -> None:
    """The classifier artifact layout (adapter/, head.safetensors, classifier_config.json,
    tokenizer) with placeholder bytes; only classifier_config.json is read by the stand-in loader."""
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 4, "salt": salt}))
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 64 + salt.encode())
    (out / "head.safetensors").write_bytes(b"\1" * 32)
    (out / "tokenizer.json").write_text("{}")
    (out / "classifier_config.json").write_text(json.dumps({"markers": list(markers), "num_labels": 2}))


# ----------------------------------------------------------------------------------------------
# fake llama_cpp
# ----------------------------------------------------------------------------------------------
def fake_llama_cpp() -> types.ModuleType:
    mod = types.ModuleType("llama_cpp")
    mod.calls = []  # type: ignore[attr-defined]

    class Llama:
        def __init__(self, model_path: str, **kw: Any):
            self.header = Path(model_path).read_bytes()[:5].decode()  # "GGUF" + variant letter
            mod.calls.append(("init", model_path, kw))  # type: ignore[attr-defined]

        def create_completion(self, prompt: str, **kw: Any) -> dict[str, Any]:
            mod.calls.append(("completion", prompt, kw))  # type: ignore[attr-defined]
            return {"choices": [{"text": f"{self.header}:{prompt}"}]}

        def create_chat_completion(self, messages: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
            mod.calls.append(("chat", messages, kw))  # type: ignore[attr-defined]
            return {"choices": [{"message": {"content": f"chat:{messages[-1]['content']}"}}]}

    mod.Llama = Llama  # type: ignore[attr-defined]
    return mod


# ----------------------------------------------------------------------------------------------
# pipeline artifacts as the upstream nodes will write them
# ----------------------------------------------------------------------------------------------
def tiny_gemma3(out: Path, seed: int = 0) -> None:
    """A random-init Gemma3ForCausalLM (hidden 64, 2 layers) + a WordLevel tokenizer, saved to ``out``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"w{i}" for i in range(60)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    cfg = Gemma3TextConfig(
        vocab_size=len(words),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(seed)
    Gemma3ForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)


def fc_metrics(exact: float, by_dialect: dict[str, float], n: int = 20) -> dict[str, Any]:
    return {
        "exact_match": exact,
        "by_dialect": {d: {"exact_match": v, "n": n} for d, v in by_dialect.items()},
    }


ROWS_PER_DIALECT = 50
CLASSIFIER_ROWS = 100


def fc_predictions(dialects: dict[str, float], base_rate: float = 0.1) -> Any:
    """evaluate's predictions/function_calling.parquet: ROWS_PER_DIALECT rows per dialect, the first
    ``rate`` of them correct (so a higher rate is a superset: a paired, clearly better model), for the
    fine-tune and its base."""
    import pandas as pd

    rows = []
    for role, rates in (("fine_tuned", dialects), ("base", dict.fromkeys(dialects, base_rate))):
        for d, rate in rates.items():
            k = round(rate * ROWS_PER_DIALECT)
            for i in range(ROWS_PER_DIALECT):
                rows.append({"model": role, "id": f"{d}-{i}", "dialect": d, "exact_match": i < k})
    return pd.DataFrame(rows)


def classifier_labels() -> list[int]:
    return [i % 2 for i in range(CLASSIFIER_ROWS)]


def classifier_predictions(f1: float) -> Any:
    """predictions/classifier.parquet: balanced labels, the first (1 - f1) share of rows wrong."""
    import pandas as pd

    labels = classifier_labels()
    wrong = round((1 - f1) * CLASSIFIER_ROWS)
    preds = [1 - y if i < wrong else y for i, y in enumerate(labels)]
    return pd.DataFrame({"id": [f"c{i}" for i in range(CLASSIFIER_ROWS)], "label": labels, "pred": preds})


def write_classifier_splits(out: Path) -> None:
    """prepare_data's classifier splits: a flawed row says "wrong" (what the stand-in loader looks
    for), so a re-scored stand-in classifier is right on every row."""
    import pandas as pd

    (out / "classifier").mkdir()
    labels = classifier_labels()
    for split in ("test", "validation"):
        pd.DataFrame(
            {
                "id": [f"c{i}" for i in range(CLASSIFIER_ROWS)],
                "prompt": ["step is wrong" if y else "step is fine" for y in labels],
                "label": labels,
            }
        ).to_parquet(out / "classifier" / f"{split}.parquet", index=False)


def build_artifacts(
    store: ArtifactStore,
    *,
    variant: str = "a",
    fc_exact: float | None = None,
    fc_dialects: dict[str, float] | None = None,
    clf_f1: float = 0.7,
    merged: bool = False,
    fc_base: float = 0.1,
    evaluate_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Upstream artifacts for register_pipeline, built through the real store (manifests, hashes).
    ``variant`` changes the model bytes (a new version); the scores change what the gate sees:
    ``fc_dialects`` (or ``fc_exact`` for every dialect) is the fine-tune's share of correct rows per
    dialect, ``fc_base`` its base's, ``clf_f1`` the classifier's. ``evaluate_config`` overrides the
    evaluate section recorded in the manifest (another evaluation config)."""
    dialects = fc_dialects or dict.fromkeys(("MSA", "Gulf"), 0.8 if fc_exact is None else fc_exact)
    fc_overall = sum(dialects.values()) / len(dialects)

    def data(out: Path, _: Path) -> dict[str, Any]:
        (out / "train.jsonl").write_text('{"x": 1}\n')
        write_classifier_splits(out)
        return {"rows": 1}

    def train_fc(out: Path, _: Path) -> dict[str, Any]:
        (out / "adapter").mkdir()
        (out / "adapter" / "adapter_config.json").write_text(json.dumps({"variant": variant}))
        (out / "adapter" / "adapter_model.safetensors").write_bytes(variant.encode() * 16)
        if merged:
            tiny_gemma3(out / "merged")
        log = [{"step": s, "loss": 2.0 / s, "learning_rate": 1e-4, "grad_norm": 1.0} for s in (1, 2, 3)]
        (out / "train_log.jsonl").write_text("\n".join(json.dumps(r) for r in log) + "\n")
        return {"train_seconds": 12.5, "trainable_params": 10, "total_params": 100, "backend": "hf"}

    def gguf(out: Path, _: Path) -> dict[str, Any]:
        (out / "function_calling").mkdir()
        (out / "function_calling" / "function_calling.q8_0.gguf").write_bytes(b"GGUF" + variant.encode())
        return {"files": 1}

    def train_clf(out: Path, _: Path) -> dict[str, Any]:
        write_standin_classifier(out, salt=variant)
        return {"train_seconds": 3.0}

    def evaluate(out: Path, _: Path) -> dict[str, Any]:
        n = ROWS_PER_DIALECT
        metrics = {
            "function_calling": {
                "fine_tuned": fc_metrics(fc_overall, dialects, n),
                "base": fc_metrics(fc_base, dict.fromkeys(dialects, fc_base), n),
            },
            "classifier": {"fine_tuned": {"macro_f1": clf_f1, "threshold": 0.5}},
        }
        (out / "metrics.json").write_text(json.dumps(metrics))
        (out / "predictions").mkdir()
        fc_predictions(dialects, fc_base).to_parquet(out / "predictions" / "function_calling.parquet")
        classifier_predictions(clf_f1).to_parquet(out / "predictions" / "classifier.parquet")
        return {"function_calling.exact_match": fc_overall}

    from dagtune.config import load_config

    cfg = load_config(profile="tiny", overrides={"evaluate": evaluate_config or {}})
    arts: dict[str, Any] = {}
    for node, fn, extra in (
        ("prepare_data", data, {}),
        ("train_function_calling", train_fc, {"variant": variant, "merged": merged}),
        ("convert_gguf_function_calling", gguf, {"variant": variant}),
        ("train_classifier", train_clf, {"variant": variant}),
        ("evaluate", evaluate, {"fc": fc_overall, "d": dialects, "clf": clf_f1, "base": fc_base}),
    ):
        # each manifest records its node's config section and upstream keys, as run_node does
        upstream = {
            u: a.key for u, a in arts.items() if node == "evaluate" and not u.startswith("convert_gguf")
        }
        section = getattr(cfg, NODES[node].section_name).model_dump(mode="json")
        inputs = {"node": node, "config": section, "upstream": upstream}
        arts[node], _ = store.build(node, {**inputs, **extra}, fn)
    return arts


def with_extractor_placeholders(store: ArtifactStore, arts: dict[str, Any]) -> dict[str, Any]:
    """``arts`` plus empty artifacts for the extractor's training and export: register's upstream
    needs every node, and write_config's register section leaves the extractor unregistered."""
    out = dict(arts)
    for node in ("train_extractor", "convert_gguf_extractor"):
        out[node], _ = store.build(node, {"node": node, "placeholder": True}, lambda o, s: {})
    return out


def write_config(tmp_path: Path, names: tuple[str, str] = ("fc", "clf")) -> Path:
    """The packaged config + small retries and the test registered names, as a file of its own
    (so ``dagtune promote --config`` sees the same thing as the library calls)."""
    import yaml

    from dagtune.config import deep_merge, read_raw

    raw, _ = read_raw(None)
    register = {
        "retries": 1,
        "backoff_seconds": 0.05,
        "log_merged_model": False,
        "classifier_loader": STANDIN_LOADER,
        "models": {
            "function_calling": {"name": names[0], "gate": {"min_delta": 0.01, "max_group_drop": 0.05}},
            "classifier": {"name": names[1], "gate": {"metric": "macro_f1"}},
            "extractor": None,  # not registered in these tests (partial mappings merge into the defaults)
        },
    }
    # register loads models, so it runs in a child process by default; these tests' stand-in llama_cpp
    # (fake_llama_cpp) lives in the test's process only, so the node runs in it (thread isolation).
    in_process = {"profiles": {"tiny": {"runtime": {"isolation": "thread", "nodes_per_device": 1}}}}
    path = tmp_path / "pipeline_config.yaml"
    # sort_keys=False: register.models keeps its order (function_calling registers first)
    path.write_text(
        yaml.safe_dump(
            deep_merge(raw, {"register": register, **in_process}), allow_unicode=True, sort_keys=False
        )
    )
    return path


# ----------------------------------------------------------------------------------------------
# MLflow stores
# ----------------------------------------------------------------------------------------------
_TEMPLATE: dict[str, Path] = {}


def migrated_db(dest: Path, template_dir: Path) -> Path:
    """Copy of an already-migrated MLflow SQLite DB (the schema is created once per session)."""
    if "db" not in _TEMPLATE:
        from mlflow import MlflowClient

        tpl = template_dir / "template.db"
        MlflowClient(tracking_uri=f"sqlite:///{tpl}").search_experiments()
        _TEMPLATE["db"] = tpl
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(_TEMPLATE["db"], dest)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` with a SQLite backend and proxied artifacts, started in its own process
    group so stop() ends the server and its workers (only them)."""

    def __init__(self, db: Path, artifacts: Path, log_file: Path, port: int | None = None):
        self.db, self.artifacts, self.log_file = db, artifacts, log_file
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.db}",
            "--artifacts-destination", str(self.artifacts),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited {self.proc.returncode}: {self.log_file.read_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout}s: {self.log_file.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
