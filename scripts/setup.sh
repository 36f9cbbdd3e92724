#!/usr/bin/env bash
# Create .venv (once) with orchestrator and its dependencies. Where no NVIDIA GPU is present, the CPU
# build of torch is installed first so that pip does not pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
pip_quiet() {  # pip, without its lines about configured package locations that do not exist on this machine
  python -m pip "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored: it is neither a file nor a directory\.$" || true; }
}
# (re)install when the venv lacks the packages or pyproject.toml changed since the last install
STAMP=".venv/.pyproject.sha256"
if [ "$(sha256sum pyproject.toml)" != "$(cat "$STAMP" 2>/dev/null)" ] || \
   ! python -c "import orchestrator, torch, deepspeed, ray, pytest" >/dev/null 2>&1; then
  pip_quiet install -q --upgrade pip
  if command -v nvidia-smi >/dev/null 2>&1; then
    pip_quiet install -q "torch>=2.4,<2.15"
  else
    pip_quiet install -q "torch==2.13.0" || pip_quiet install -q "torch>=2.4,<2.15" \
      --index-url https://download.pytorch.org/whl/cpu
  fi
  EXTRAS="dev"
  command -v nvidia-smi >/dev/null 2>&1 && EXTRAS="dev,gpu"  # Liger's fused Triton kernels: GPUs only
  # setuptools warns that an editable install maps packages to folders of this checkout: that is the point of it
  PYTHONWARNINGS=ignore pip_quiet install -q -e ".[$EXTRAS]"
  sha256sum pyproject.toml > "$STAMP"
fi
