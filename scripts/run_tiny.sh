#!/usr/bin/env bash
# The embedded default: write a tiny Qwen2.5-VL checkpoint, then run it on a synthetic image prompt.
# (The RL training run replaces the second step once the training loop lands.)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
out=${OUT:-outputs/tiny}
python -m lmmrl_megatron.testing.make_tiny --arch qwen2_5_vl --out "$out/model" --seed 0
python -m lmmrl_megatron.testing.try_tiny --model "$out/model"
echo "tiny checkpoint: $out/model"
