#!/usr/bin/env bash
# Create (or reuse) .venv and install share-cl into it. Sourced by demo.sh and test.sh.
# torch is installed first, pinned: a bare torch requirement pulls a multi-GB CUDA build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python_bin="${PYTHON:-python3}"
if ! "$python_bin" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "share-cl needs Python >= 3.11; set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv" >&2
  "$python_bin" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=".venv/.share-cl-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing torch==${TORCH_VERSION:-2.13.0} and share-cl (first run takes a few minutes)" >&2
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
  python -m pip install --quiet -e ".[dev]"
  touch "$stamp"
fi
