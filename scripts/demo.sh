#!/usr/bin/env bash
# Set up .venv if needed and run the main job on embedded defaults: local Ray, embedded Redis,
# local MLflow, the bundled all-MiniLM-L6-v2 and WordNet tasks. Extra arguments go to `sharecl demo`.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export HF_HUB_OFFLINE=1
exec sharecl demo "$@"
