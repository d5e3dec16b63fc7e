#!/usr/bin/env bash
# Run the test suite on CPU (installs the environment on first use). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec python -m pytest -q "$@"
