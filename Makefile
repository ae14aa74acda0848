# The two Quickstart commands. Each creates or reuses .venv and installs what it needs.
.PHONY: run test setup lint

setup:
	@bash scripts/setup_env.sh

run: setup  ## the whole pipeline on the embedded defaults (tiny CPU profile, local Prefect, SQLite MLflow)
	.venv/bin/dagtune run $(ARGS)

test: setup  ## the test suite (GPU tests are skipped without CUDA; run them on the GPU machine)
	.venv/bin/python -m pytest $(PYTEST_ARGS)

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
