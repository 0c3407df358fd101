#!/usr/bin/env bash
# Triton for the tests (make test): torch's CUDA builds bring their own, which is left alone; elsewhere
# the tests run the triton backend's GPU kernels in Triton's CPU interpreter. Training never needs it
# (make run does not install it), and a failed install only skips tests/test_triton.py, saying so
# (exit 1, so that make tries again next time).
set -euo pipefail
vpy=${1:-.venv}/bin/python
if ! "$vpy" -c "import triton" >/dev/null 2>&1; then
  if ! "$vpy" -m pip install -q "triton==3.9.0"; then
    echo "setup: triton==3.9.0 did not install; tests/test_triton.py will be skipped" >&2
    exit 1
  fi
fi
