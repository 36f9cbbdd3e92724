#!/usr/bin/env bash
# The test suite: unit tests, then Ray + DeepSpeed integration tests on 2 CPU workers, then the demo end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python -m pytest -q "$@"
