#!/usr/bin/env bash
# Sets up scratchgpt in ./.venv on a fresh machine. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
INSTALLER=${INSTALLER:-uv}
case "$INSTALLER" in
    uv | pip) ;;
    *) echo "setup.sh: INSTALLER is '$INSTALLER'; use uv (the default) or pip" >&2; exit 2 ;;
esac
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first: 2.13.0 is the CPU build; asking for it before anything that depends on
# torch keeps pip from fetching a multi-GB CUDA build.
.venv/bin/pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
# The rest with uv, which resolves and downloads in parallel: about 20 s on the project's 2-core machines,
# against about 200 s for pip. It keeps the torch installed above. uv does not read pip's configuration, so
# INSTALLER=pip is the way to install from a pip-configured private index; if uv fails, pip does the work.
if [ "$INSTALLER" = uv ] && .venv/bin/pip install -q --disable-pip-version-check "uv==0.13.9" \
        && .venv/bin/uv pip install -q --compile-bytecode --python .venv/bin/python -e ".[dev]"; then
    :
else
    if [ "$INSTALLER" = uv ]; then
        echo "setup.sh: uv did not install the project; installing it with pip" >&2
    fi
    .venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
fi
echo "scratchgpt is set up: .venv/bin/scratchgpt --help"
