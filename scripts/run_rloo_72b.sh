#!/usr/bin/env bash
# RLOO on Qwen2.5-VL-72B across a Ray cluster (4 nodes x 8 GPUs by default). Start the cluster first (on SLURM:
# sbatch scripts/slurm/ray_cluster.sbatch, which runs this script on the head node), then:
#   MODEL=/ckpt/Qwen2.5-VL-72B-Instruct DATA=/data/train.jsonl OUT=/outputs/run bash scripts/run_rloo_72b.sh [k=v ...]
# Before allocating the cluster, check that the layout is legal and every phase fits (no GPU, no weights: the
# model's config.json only; MODEL defaults to configs/models/qwen2_5_vl_72b, GPU to H100-80GB):
#   bash scripts/run_rloo_72b.sh --dry-run [k=v ...]        # exit 0: it fits; 1: it does not (the plan says why)
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=configs/rloo_qwen2_5_vl_72b.yaml
if [[ "${1:-}" == "--dry-run" ]]; then
  shift
  exec python -m lmmrl_megatron.cli.plan --config "$CONFIG" --gpu "${GPU:-H100-80GB}" \
    model.pretrain="${MODEL:-configs/models/qwen2_5_vl_72b}" "$@"
fi
MODEL=${MODEL:?set MODEL to a Hugging Face Qwen2.5-VL-72B directory}
DATA=${DATA:?set DATA to an LMM-R1 format prompt file (jsonl/json/parquet) or json@DIR}
OUT=${OUT:-outputs/rloo_qwen2_5_vl_72b}
export RAY_ADDRESS=${RAY_ADDRESS:-auto}   # join the running cluster instead of starting a local one
exec lmmrl-train --config "$CONFIG" \
  model.pretrain="$MODEL" data.prompt_data="[$DATA]" checkpoint.save_path="$OUT" "$@"
