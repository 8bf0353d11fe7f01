#!/usr/bin/env bash
# Create .venv and install the pinned stack (idempotent: skips when pyproject.toml has not changed).
#   bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ -f "$stamp" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# torch first, pinned: an unpinned torch pulled in by another package would be a multi-GB CUDA build.
pip install -q torch==2.13.0
pip install -q -e ".[test]"
rm -f .venv/.installed-*
touch "$stamp"
echo "[setup] .venv ready"
