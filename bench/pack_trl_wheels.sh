#!/usr/bin/env bash
# The wheels bench/vs_trl.py needs on the GPU machine for TRL (it has transformers, torch, accelerate, peft, vLLM):
# trl itself, pure Python, 0.9 MiB. TRL also imports datasets, pyarrow and pandas at module level; their wheels
# (datasets 5.2.0, pyarrow 26.0.1, pandas 3.1.1, dill 0.4.1, multiprocess 0.70.19, xxhash 4.1.0, python-dateutil
# 4.0.0, tzdata 2026.6) come to 66 MiB, pyarrow's alone to 52.5 MiB, so bench/vs_trl.py runs TRL on the
# stand-ins of bench/trl_shim instead (--trl-shim auto).
# accelerate is listed for machines without it (the GPU machine has it: set WITH_ACCELERATE=0 to skip).
#
#   bash bench/pack_trl_wheels.sh [DEST]     # DEST defaults to .whl
# then on the GPU machine: python -m pip install --no-deps --target /tmp/trl-site DEST/*.whl
set -euo pipefail
dest="${1:-.whl}"
py="${PY:-python3.12}"
# pyenv keeps 3.12 off PATH unless it is selected
if ! "$py" -c '' 2>/dev/null && [ -z "${PY:-}" ]; then export PYENV_VERSION=3.12.1; fi
wheels=(trl==1.16.0)
if [ "${WITH_ACCELERATE:-1}" = 1 ]; then wheels+=(accelerate==1.16.0); fi
mkdir -p "$dest"
for wheel in "${wheels[@]}"; do
  "$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$dest" "$wheel"
done
total=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
echo "$(ls "$dest"/*.whl | wc -l) wheels, $((total / 1024)) KiB in $dest"
if [ "$total" -ge $((45 * 1024 * 1024)) ]; then echo "over 45 MiB" >&2; exit 1; fi
