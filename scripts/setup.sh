#!/usr/bin/env bash
# Create ./.venv and install resclip with its test tools.
# torch is pinned to the build this project is tested with; override with TORCH_SPEC="torch torchvision".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# shellcheck disable=SC2086
python -m pip install -q ${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
python -m pip install -q -e ".[dev${EXTRAS:+,$EXTRAS}]"
echo "resclip installed in $(pwd)/.venv"
