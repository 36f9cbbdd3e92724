#!/usr/bin/env bash
# The main job on its embedded default: the legal clause-risk demo (MiniLM, 2 Ray workers, ZeRO-3 on CPU).
# Extra arguments are Hydra overrides, e.g. `bash scripts/demo.sh data.path=../shared/data/unfair_tos`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python -m orchestrator +experiment=legal_demo "$@"
