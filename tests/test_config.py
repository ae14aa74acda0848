"""Every shipped config and profile validates; bad values are named by their YAML path."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from pydantic import BaseModel

from dagtune.config import DEFAULT_CONFIG, ConfigError, PipelineConfig, load_config, profile_names, read_raw
from dagtune.pipeline import NODE_ORDER, NODES

RAW, _ = read_raw(DEFAULT_CONFIG)


@pytest.mark.parametrize("profile", profile_names(RAW))
def test_committed_config_validates_for_every_profile(profile):
    cfg = load_config(DEFAULT_CONFIG, profile)
    assert cfg.profile == profile
    for node in NODE_ORDER:
        assert isinstance(getattr(cfg, NODES[node].section_name), BaseModel)


def test_default_profile_is_tiny_cpu():
    cfg = load_config()
    assert cfg.profile == "tiny"
    assert cfg.runtime.device == "cpu"
    assert cfg.train_function_calling.model.name.startswith("tiny-")


def test_real_profile_uses_hub_ids_and_reference_recipe():
    cfg = load_config(profile="real")
    assert cfg.train_function_calling.model.name == "unsloth/functiongemma-270m-it"
    assert cfg.train_extractor.model.name == "unsloth/gemma-3-1b-it-unsloth-bnb-4bit"
    assert cfg.train_classifier.model.name == "microsoft/Phi-4-mini-instruct"
    fc = cfg.train_function_calling
    assert (fc.lora.r, fc.lora.alpha, fc.optim.learning_rate, fc.optim.warmup_steps) == (32, 64, 1e-3, 200)
    assert fc.optim.scheduler == "cosine"


def _all_models(model: type[BaseModel]):
    yield model
    for f in model.model_fields.values():
        ann = f.annotation
        for cand in getattr(ann, "__args__", (ann,)):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                yield from _all_models(cand)


def test_every_field_documents_itself_and_forbids_extras():
    for m in _all_models(PipelineConfig):
        assert m.model_config.get("extra") == "forbid", m.__name__
        for name, f in m.model_fields.items():
            assert f.description and len(f.description) >= 8, f"{m.__name__}.{name} has no description"


def _write(tmp_path, data):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_errors_name_yaml_path_value_and_allowed(tmp_path):
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["train_extractor"]["optim"]["scheduler"] = "cosinee"
    raw["train_function_calling"]["lora"]["alpah"] = 3
    raw["profiles"]["tiny"]["runtime"]["backend"] = "tpu"
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, raw), "tiny")
    msg = str(e.value)
    assert "train_extractor.optim.scheduler" in msg and "'cosinee'" in msg and "'cosine'" in msg
    assert "train_function_calling.lora.alpah: unknown field" in msg
    assert "runtime.backend" in msg and "'tpu'" in msg and "'unsloth'" in msg


def test_unknown_profile_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="profile 'nope' not defined"):
        load_config(profile="nope")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_env_overrides_paths_and_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGTUNE_STATE_DIR", str(tmp_path / "s"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    cfg = load_config()
    assert cfg.state_dir == tmp_path / "s"
    assert cfg.artifact_root == tmp_path / "s" / "artifacts"
    assert cfg.tracking_uri == "http://127.0.0.1:5999"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert load_config().tracking_uri == f"sqlite:///{tmp_path / 's' / 'mlflow.db'}"


def test_a_url_artifact_root_is_refused_by_name(tmp_path, monkeypatch):
    """The store works on a mounted path only: s3://... would otherwise become a local dir "s3:"."""
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["project"]["artifact_root"] = "s3://bucket/dagtune"
    with pytest.raises(ConfigError, match=r"project\.artifact_root.*is a URL"):
        load_config(_write(tmp_path, raw))
    monkeypatch.setenv("DAGTUNE_ARTIFACT_ROOT", "gs://bucket/dagtune")
    with pytest.raises(ConfigError, match="DAGTUNE_ARTIFACT_ROOT: 'gs://bucket/dagtune' is a URL"):
        load_config().artifact_root  # noqa: B018 - the property raises
    monkeypatch.setenv("DAGTUNE_ARTIFACT_ROOT", str(tmp_path / "a:b"))  # a colon alone is a path
    assert load_config().artifact_root == tmp_path / "a:b"


def test_cli_invalid_config_exits_2(tmp_path):
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["evaluate"]["batch_size"] = 0
    p = _write(tmp_path, raw)
    r = subprocess.run(
        [sys.executable, "-m", "dagtune.cli", "config", "validate", "--config", str(p)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "evaluate.batch_size" in r.stderr and "greater than or equal to 1" in r.stderr
    ok = subprocess.run(
        [sys.executable, "-m", "dagtune.cli", "config", "validate"], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert "profile 'tiny'" in ok.stdout and "profile 'real'" in ok.stdout


def test_renamed_max_parallel_training_still_works_with_a_deprecation_warning():
    from dagtune.config import RuntimeConfig

    with pytest.warns(DeprecationWarning, match="renamed runtime.nodes_per_device"):
        rt = RuntimeConfig.model_validate({"max_parallel_training": 2})
    assert rt.nodes_per_device == 2
    with pytest.warns(DeprecationWarning):  # both given: the new name wins
        assert (
            RuntimeConfig.model_validate({"max_parallel_training": 2, "nodes_per_device": 3}).nodes_per_device
            == 3
        )


def test_thread_isolation_with_several_slots_is_refused_by_yaml_path():
    with pytest.raises(ConfigError, match="runtime") as err:
        load_config(profile="tiny", overrides={"runtime": {"isolation": "thread", "nodes_per_device": 2}})
    assert "nodes_per_device to 1" in str(err.value)
