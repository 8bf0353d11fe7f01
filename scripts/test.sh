#!/usr/bin/env bash
# Set up (if needed), lint (ruff, import-linter) and run the whole test suite, slow tests (real Ray / DeepSpeed /
# MLflow server) included.
#   bash scripts/test.sh            extra pytest args pass through, e.g. -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
# habits that a tool checks: lint, formatting, and layers that only point down (pyproject.toml [tool.importlinter])
ruff check .
ruff format --check .
lint-imports
exec python -m pytest -q -rs --durations=15 "$@"
