#!/usr/bin/env bash
# A-CLIP ViT-B/16 on YFCC-15M, the paper run: 8 nodes x 8 GPUs, one task per GPU.
#
#   sbatch launch/yfcc15m.sh                                     # the paper recipe
#   sbatch launch/yfcc15m.sh data.train_shards='/x/{00000..01499}.tar' train.output_dir=runs/y
#   CONFIG=configs/other.yaml OVERRIDES="mask.keep_ratio=0.25" sbatch launch/yfcc15m.sh
#   LOG_DIR=/scratch/logs bash launch/yfcc15m.sh [overrides]     # submits itself, see below
#
# Arguments are `section.key=value` overrides for train.py, applied after $OVERRIDES (a
# space-separated list from the environment), which come after train.resume=latest, which comes
# after $CONFIG (default configs/yfcc15m_vit_b16.yaml). sbatch exports the submitting
# environment to the job, so CONFIG / OVERRIDES / PYTHON / ACLIP_REPO set there reach it.
#
# Resources: sbatch options on its command line override the #SBATCH lines below, e.g.
#   sbatch -N 2 launch/yfcc15m.sh ...                                          # 2 nodes x 8 GPUs
#   sbatch -N1 --ntasks-per-node=2 --cpus-per-task=1 --gpus-per-node=0 launch/yfcc15m.sh ...
# the last one being a CPU-only node (no GPU gres configured): `--gpus-per-node=0` cancels the
# GPU request below (`--gres=none` does not: slurm refuses it next to --gpus-per-node=8). On a
# CPU node also export DS_ACCELERATOR=cpu, and train.precision=fp32.
#
# Logs: one file per job, logs/<job name>-<job id>.out (stdout and stderr) under the submit
# directory. Slurm does not create that directory: create it, or pass `-o DIR/%x-%j.out`, or run
# this script with bash instead of sbatch: outside a job it creates $LOG_DIR (default logs) and
# submits itself with `sbatch -o $LOG_DIR/%x-%j.out $SBATCH_ARGS <this script> <arguments>`.
# The log is opened in append mode, so a requeued job keeps the earlier runs' lines.
#
# Preemption: --signal=USR1@180 asks slurm to send SIGUSR1 to the training tasks (not to this
# shell) 3 minutes before the time limit; so does `scancel --signal=USR1 <job id>`. train.py then
# checkpoints on every rank, requeues the job (`scontrol requeue`, allowed by --requeue) and
# exits 0; the requeued job runs this script again, and train.resume=latest continues from the
# checkpoint at the same step. SIGTERM (`scancel --signal=TERM [--full]`, slurm's preemption,
# a node going down) also checkpoints, on every rank, even when it reaches every process of
# the job (loader workers ignore it), and the job ends with exit code 3 without requeueing
# itself: a user's scancel means stop, and slurm's own preemption (PreemptMode=REQUEUE)
# requeues the job by itself. Submit it again (same train.output_dir) to go on.
#SBATCH --job-name=aclip-yfcc15m
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=72:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@180
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

if [[ -z ${SLURM_JOB_ID:-} ]]; then  # not in a job: submit this script
    LOG_DIR="${LOG_DIR:-logs}"
    mkdir -p "$LOG_DIR"
    export ACLIP_REPO="${ACLIP_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
    # shellcheck disable=SC2086
    exec sbatch --output="$LOG_DIR/%x-%j.out" ${SBATCH_ARGS:-} "${BASH_SOURCE[0]}" "$@"
fi

REPO="${ACLIP_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
cd "$REPO"
PY="${PYTHON:-$REPO/.venv/bin/python}"
CONFIG="${CONFIG:-configs/yfcc15m_vit_b16.yaml}"
RESTART="${SLURM_RESTART_COUNT:-0}"

MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
# one port per job and per restart: a requeued run never meets its predecessor's socket
MASTER_PORT="$((20000 + (SLURM_JOB_ID % 4000) * 10 + RESTART % 10))"
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"

# SIGUSR1 and SIGTERM are meant for the training tasks; should this shell get one too
# (scancel --full), it must not die before srun returns (its death would end the job, and the
# tasks with it, before they have checkpointed).
trap 'echo "batch shell: SIGUSR1 received (training tasks handle preemption)"' USR1
trap 'echo "batch shell: SIGTERM received (training tasks checkpoint and stop)"' TERM

echo "$(date -Is) job $SLURM_JOB_ID (restart $RESTART): $SLURM_JOB_NUM_NODES nodes," \
    "$SLURM_NTASKS tasks, $OMP_NUM_THREADS cpus/task, master $MASTER_ADDR:$MASTER_PORT"
echo "config $CONFIG; overrides: train.resume=latest ${OVERRIDES:-} $*"
# srun in slurm 22.05-23.02 ignores the job's --cpus-per-task unless told again
# shellcheck disable=SC2086
srun --kill-on-bad-exit=1 --cpu-bind=none --cpus-per-task="$OMP_NUM_THREADS" \
    "$PY" train.py --config "$CONFIG" train.resume=latest ${OVERRIDES:-} "$@" \
    && status=0 || status=$?
echo "$(date -Is) job $SLURM_JOB_ID (restart $RESTART): srun exited $status"
exit "$status"
