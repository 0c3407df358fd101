#!/usr/bin/env bash
# Create or update the project's virtual environment. Idempotent; installs torch==2.13.0
# only when no torch is importable (a GPU machine keeps its own CUDA build).
set -euo pipefail
venv=${1:-.venv}
py=${PY:-python3}
too_old='import sys; sys.exit(sys.version_info < (3, 10))'
if [ -e "$venv" ] && ! "$venv/bin/python" -c "$too_old" >/dev/null 2>&1; then
  echo "setup: $venv has no working Python >= 3.10 (a removed base interpreter, or an old one); making it anew" >&2
  rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ] && ! "$py" -c "$too_old" >/dev/null 2>&1; then  # only needed to make one
  echo "setup: rnnkit needs Python >= 3.10; $py is $({ command -v "$py" >/dev/null && "$py" -V 2>&1; } || echo 'not runnable'). Run with PY=python3.11 (say)." >&2
  exit 2
fi
if [ ! -x "$venv/bin/python" ]; then
  if "$py" -c "import torch" >/dev/null 2>&1; then
    echo "setup: torch found in $("$py" -c 'import torch; print(torch.__version__)'); reusing it" >&2
    "$py" -m venv --system-site-packages "$venv"
  else
    "$py" -m venv "$venv"
  fi
fi
vpy="$venv/bin/python"
if ! "$vpy" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch==2.13.0 (CPU build)" >&2
  "$vpy" -m pip install -q "torch==2.13.0"
fi
"$vpy" -m pip install -q -e ".[dev]"
# rnnkit's C++ CPU kernels, built once per machine into a cache (the Python loops run without them)
"$venv/bin/rnnkit" kernels || true
