"""Model flavors reload what was logged: transformers flavor (merged model, PEFT adapter on a local
base) gives the SAME logits after the round trip; the GGUF pyfunc predicts with llama-cpp-python."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import mlflow
import pytest
import torch
from registry_helpers import migrated_db, tiny_gemma3

from dagtune.registry import models as mdl
from dagtune.registry.tracking import RetryPolicy, connect


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow")
    db = migrated_db(d / "mlflow.db", tmp_path_factory.getbasetemp())
    t = connect(f"sqlite:///{db}", RetryPolicy(1, 0.05), state_dir=d)
    yield t
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("base") / "tiny-gemma3"
    tiny_gemma3(d)
    return d


def _run(tracker) -> str:
    exp = tracker.experiment_id("models")
    return tracker.client.create_run(exp).info.run_id


def _ids(base_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)("w1 w2 w3 w4 w5", return_tensors="pt").input_ids


@torch.no_grad()
def test_merged_model_reloads_with_identical_logits(tracker, base_dir):
    from transformers import AutoModelForCausalLM

    ids = _ids(base_dir)
    ref = AutoModelForCausalLM.from_pretrained(base_dir).eval()(ids).logits
    info = mdl.log_merged_model(_run(tracker), base_dir)
    loaded = mlflow.transformers.load_model(info.model_uri, return_type="components")["model"].eval()
    assert torch.equal(loaded(ids).logits, ref)


@torch.no_grad()
def test_peft_adapter_on_local_base_reloads_with_identical_logits(tracker, base_dir):
    """The silent-randomisation trap: logged without base_model_path, MLflow 3.17 saves the
    LoRA-wrapped base under plain names and the reload re-initialises q_proj/v_proj at random
    (logits differ by ~0.3 here). log_peft_model records the local base, so the reload is exact."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    peft = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ).eval()
    ids = _ids(base_dir)
    ref = peft(ids).logits
    assert not torch.equal(ref, AutoModelForCausalLM.from_pretrained(base_dir).eval()(ids).logits)

    info = mdl.log_peft_model(_run(tracker), peft, AutoTokenizer.from_pretrained(base_dir))
    flavor = mlflow.models.get_model_info(info.model_uri).flavors["transformers"]
    assert flavor["local_base_model_path"] == str(base_dir.resolve())  # by reference, no weight copy
    loaded = mlflow.transformers.load_model(info.model_uri, return_type="components")["model"].eval()
    assert torch.equal(loaded(ids).logits, ref)


def test_peft_base_that_is_neither_dir_nor_hub_id_is_refused(tracker, base_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    base.name_or_path = "/gone/after/training"  # a local base that no longer exists
    peft = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="base_model_path"):
        mdl.log_peft_model(_run(tracker), peft, None)


@pytest.mark.slow  # converts a model (~25 s on 2 cores)
@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama_cpp not importable (scripts/build_llama_cpp.sh installs it); the GGUF pyfunc's "
    "wiring is covered with a stand-in in test_registry.py",
)
def test_gguf_pyfunc_with_real_llama_cpp(tracker, base_dir, tmp_path):
    try:
        from dagtune.gguf import convert_hf_to_gguf, find_llama_cpp_tools

        find_llama_cpp_tools()
    except Exception as e:  # converter not extracted: nothing to build a GGUF with
        pytest.skip(f"llama.cpp converter unavailable: {e}")
    from dagtune.models.tiny import build_tiny

    model_dir = tmp_path / "tiny-gemma3"
    build_tiny("tiny-gemma3", model_dir)
    gguf = Path(convert_hf_to_gguf(model_dir, tmp_path / "tiny.f16.gguf", "f16")["out_file"])
    info = mdl.log_gguf_model(_run(tracker), gguf, max_tokens=4, n_ctx=256)
    model = mlflow.pyfunc.load_model(info.model_uri)
    out = model.predict(["hello world", [{"role": "user", "content": "hello"}]])
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    assert model.predict("hello world") == model.predict("hello world")  # greedy: deterministic


def test_logging_stores_the_example_without_loading_the_model(tracker, tmp_path, monkeypatch):
    """MLflow would load the model and predict on its input example while logging it (at real size a
    Phi-4-mini load and adapter merge inside the register node): the example and signature are stored,
    the model is not loaded."""
    from mlflow.models import Model

    marker = tmp_path / "loaded"
    (tmp_path / "probe_loader.py").write_text(
        f"def load(path):\n    open({str(marker)!r}, 'w').close()\n    raise RuntimeError('probe')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "clf").mkdir()
    info = mdl.log_classifier_model(_run(tracker), tmp_path / "clf", loader="probe_loader:load")
    assert not marker.exists(), "logging loaded the model"
    logged = Model.load(info.model_uri)
    assert logged.signature is not None
    example = logged.load_input_example(mlflow.artifacts.download_artifacts(info.model_uri))
    assert list(example.columns) == list(mdl.input_example("classifier").columns)
    with pytest.raises(RuntimeError, match="probe"):
        mlflow.pyfunc.load_model(info.model_uri)
    assert marker.exists()
