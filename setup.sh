#!/usr/bin/env bash
# Sets up scratchgpt in ./.venv on a fresh machine. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first: 2.13.0 is the CPU build; asking for it before anything that depends on
# torch keeps pip from fetching a multi-GB CUDA build.
.venv/bin/pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
echo "scratchgpt is set up: .venv/bin/scratchgpt --help"
