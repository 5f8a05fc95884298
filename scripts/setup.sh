#!/usr/bin/env bash
# Creates .venv with everything the project needs. torch 2.13.0 (a CPU build on CPU machines) goes in
# first and stays pinned by requirements/constraints.txt, so no other package can pull a CUDA build.
# Usage: bash scripts/setup.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
export PATH="$PWD/.venv/bin:$PATH"
# pip with this machine's index configuration warns once per package about local index folders that do
# not exist; drop those lines so real errors stay visible.
pipq() { python -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
if ! python -c "import torch" 2>/dev/null; then
  pipq install -q "torch==2.13.0"
fi
pipq install -q -c requirements/constraints.txt -r requirements/requirements.txt -r requirements/requirements-bench.txt
if [ "${1:-}" = "--test" ]; then
  pipq install -q -c requirements/constraints.txt -r requirements/requirements-test.txt
fi
echo "environment ready: $(python -c 'import torch, sys; print(sys.version.split()[0], "torch", torch.__version__)')"
