#!/usr/bin/env bash
# RLOO on Qwen2.5-VL-72B across a Ray cluster (4 nodes x 8 GPUs by default). Start the cluster first (on SLURM:
# sbatch scripts/slurm/ray_cluster.sbatch, which runs this script on the head node), then:
#   MODEL=/ckpt/Qwen2.5-VL-72B-Instruct DATA=/data/train.jsonl OUT=/outputs/run bash scripts/run_rloo_72b.sh [k=v ...]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:?set MODEL to a Hugging Face Qwen2.5-VL-72B directory}
DATA=${DATA:?set DATA to an LMM-R1 format prompt file (jsonl/json/parquet) or json@DIR}
OUT=${OUT:-outputs/rloo_qwen2_5_vl_72b}
export RAY_ADDRESS=${RAY_ADDRESS:-auto}   # join the running cluster instead of starting a local one
exec lmmrl-train --config configs/rloo_qwen2_5_vl_72b.yaml \
  model.pretrain="$MODEL" data.prompt_data="[$DATA]" checkpoint.save_path="$OUT" "$@"
