#!/usr/bin/env bash
# Create ./.venv and install resclip with its test tools.
# torch is pinned to the build this project is tested with; override with TORCH_SPEC="torch torchvision".
# Which torch build: TORCH_BUILD=auto (default) takes the CPU-only build (about 1 GB instead of
# about 6 GB with CUDA) on Linux / Windows when no NVIDIA GPU is found (no working `nvidia-smi`),
# the default build otherwise; TORCH_BUILD=cpu or TORCH_BUILD=default forces one. The CPU build comes
# from TORCH_CPU_INDEX (default https://download.pytorch.org/whl/cpu); if that index cannot be
# reached, the default package index is used instead (with a note). A machine whose pip is set up
# with a local wheel folder (pip's find-links, as on this project's own machines) keeps using it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true

TORCH_BUILD=${TORCH_BUILD:-auto}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
case "$TORCH_BUILD" in
  auto)
    TORCH_BUILD=default
    case "$(uname -s)" in
      Linux | MINGW* | MSYS* | CYGWIN*)
        if ! nvidia-smi >/dev/null 2>&1; then TORCH_BUILD=cpu; fi ;;
    esac ;;
  cpu | default) ;;
  *) echo "setup.sh: TORCH_BUILD must be auto, cpu or default, got '$TORCH_BUILD'" >&2; exit 2 ;;
esac
torch_index=()
if [ "$TORCH_BUILD" = cpu ] && [ -z "${PIP_FIND_LINKS:-}" ] \
    && [ -z "$(python -m pip config get global.find-links 2>/dev/null || true)" ]; then
  # a quick check, so an unreachable index costs seconds, not pip's retries
  if python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=5)" \
      "$TORCH_CPU_INDEX" >/dev/null 2>&1; then
    echo "setup.sh: no NVIDIA GPU found: installing the CPU-only torch from $TORCH_CPU_INDEX (TORCH_BUILD=default for the CUDA build)"
    torch_index=(--index-url "$TORCH_CPU_INDEX")
  else
    echo "setup.sh: note: $TORCH_CPU_INDEX cannot be reached; installing torch from the default index"
  fi
fi
# shellcheck disable=SC2086
python -m pip install -q ${torch_index[@]+"${torch_index[@]}"} ${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
# sam2 (the dev and sam extras) ships as source that builds against the installed torch: build it
# here without pip's isolated build (which would fetch a second torch) and without its CUDA kernel
# (an optional post-processing speed-up)
python -m pip install -q setuptools wheel
SAM2_BUILD_CUDA=0 python -m pip install -q --no-build-isolation "sam2>=1.0"
python -m pip install -q -e ".[dev${EXTRAS:+,$EXTRAS}]"
echo "resclip installed in $(pwd)/.venv"
