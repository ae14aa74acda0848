"""Config traps: partial mapping overrides merge (or fail naming the path), and every command says which
config and state directory it uses on its first line."""

from __future__ import annotations

import pytest
import yaml

from dagtune.config import DEFAULT_CONFIG, ConfigError, load_config


def test_overriding_one_registered_model_keeps_the_others():
    cfg = load_config(overrides={"register": {"models": {"function_calling": {"gate": {"min_delta": 0.02}}}}})
    models = cfg.register.models
    assert set(models) == {"function_calling", "extractor", "classifier"}
    assert models["function_calling"].name == "dagtune-function-calling"  # the default, kept
    assert models["function_calling"].gate.min_delta == 0.02
    assert models["classifier"].gate.metric == "macro_f1"  # the other defaults untouched


def test_null_stops_registering_a_model():
    cfg = load_config(overrides={"register": {"models": {"extractor": None}}})
    assert set(cfg.register.models) == {"function_calling", "classifier"}


def test_a_bad_field_in_a_partial_override_names_its_path():
    with pytest.raises(ConfigError, match=r"register\.models\.function_calling\.gate\.bogus: unknown field"):
        load_config(overrides={"register": {"models": {"function_calling": {"gate": {"bogus": 1}}}}})
    with pytest.raises(ConfigError, match=r"register\.models\.regressor"):
        load_config(overrides={"register": {"models": {"regressor": {"name": "x"}}}})


def test_first_line_names_config_and_state_dir(tmp_path, monkeypatch, capsys):
    """A config outside the repository keeps a relative state_dir next to itself (documented): the
    command says so before anything else."""
    from dagtune.cli import main

    monkeypatch.delenv("DAGTUNE_STATE_DIR", raising=False)
    monkeypatch.delenv("DAGTUNE_ARTIFACT_ROOT", raising=False)
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    path = tmp_path / "elsewhere" / "cfg.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    assert main(["status", "--config", str(path), "--json"]) == 0
    first = capsys.readouterr().err.splitlines()[0]
    assert first == f"dagtune: config {path} (profile 'tiny'), state dir {path.parent / '.state'}"
