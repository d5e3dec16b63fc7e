#!/usr/bin/env bash
# The embedded default: a tiny Qwen2.5-VL checkpoint and a synthetic image task (name the shape's colour), written locally
# (train and held-out test split), then RLOO through Ray on this machine's CPUs with the actor at TP=2, evaluated on the
# test split before, during and after training; it ends with the before/after table and the plots beside
# outputs/tiny/run/metrics.jsonl. Extra arguments are config overrides, e.g. `bash scripts/run_tiny.sh trainer.max_steps=5`
# or `bash scripts/run_tiny.sh rollout.backend=vllm`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
out=outputs/tiny
# Text head_dim 32: the smallest vLLM's CPU attention runs, so `rollout.backend=vllm` works on the same model.
[ -f "$out/model/config.json" ] || python -m lmmrl_megatron.testing.make_tiny --arch qwen2_5_vl --out "$out/model" --seed 0 \
  --text-head-dim 32
[ -f "$out/data/train.jsonl" ] && [ -f "$out/data/test.jsonl" ] || python -m lmmrl_megatron.data.synthetic --task color_of_shape --n 512 --out "$out/data" --seed 0
python -m lmmrl_megatron.cli.train --config configs/rloo_tiny.yaml "$@"
