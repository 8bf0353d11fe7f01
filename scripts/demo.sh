#!/usr/bin/env bash
# Set up (if needed), then train the embedded default: synthetic data + tiny model, on the best local device.
#   bash scripts/demo.sh            extra args pass to `launcher local`, e.g. --set train.max_steps=200
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false
exec launcher local --config configs/tiny.yaml --device auto "$@"
