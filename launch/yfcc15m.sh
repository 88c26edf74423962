#!/usr/bin/env bash
# A-CLIP ViT-B/16 on YFCC-15M: 8 nodes x 8 GPUs, one task per GPU.
#
#   sbatch launch/yfcc15m.sh                                  # the paper recipe
#   sbatch launch/yfcc15m.sh data.train_shards=/x/{00000..01499}.tar train.output_dir=runs/y
#   CONFIG=configs/other.yaml OVERRIDES="mask.keep_ratio=0.25" sbatch launch/yfcc15m.sh
#
# Node/GPU counts given to sbatch on the command line override the lines below
# (e.g. sbatch -N 2 --gpus-per-node 8 --ntasks-per-node 8 launch/yfcc15m.sh).
#SBATCH --job-name=aclip-yfcc15m
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=72:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@180
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.err
set -euo pipefail

REPO="${ACLIP_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
cd "$REPO"
mkdir -p logs
PY="${PYTHON:-$REPO/.venv/bin/python}"
CONFIG="${CONFIG:-configs/yfcc15m_vit_b16.yaml}"

MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_PORT="$((20000 + SLURM_JOB_ID % 40000))"
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"

echo "job $SLURM_JOB_ID: $SLURM_NNODES nodes, $SLURM_NTASKS tasks, master $MASTER_ADDR:$MASTER_PORT"
# shellcheck disable=SC2086
srun --kill-on-bad-exit=1 --cpu-bind=none \
    "$PY" train.py --config "$CONFIG" train.resume=latest ${OVERRIDES:-} "$@"
