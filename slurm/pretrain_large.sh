#!/usr/bin/env bash
# BERT-large pretraining on N nodes x G GPUs: phase 1 (seq 128), then phase 2 (seq 512) as a
# dependent job from phase 1's checkpoint. Hyper-parameters live in configs/ (phase1.json,
# phase2.json, bert-large.json, zero*.json); this script only places processes.
#
#   DATA=/data/bert sbatch slurm/pretrain_large.sh                 # 4 nodes x 8 GPUs
#   DATA=/data/bert RUN_DIR=/ckpt/run7 sbatch --nodes=16 slurm/pretrain_large.sh --log_interval 50
#
# Environment (all optional except DATA): RUN_DIR, MODEL_CONFIG, DS_CONFIG, PHASE1_CONFIG,
# PHASE2_CONFIG, TRAIN_STEPS, PHASE2_TRAIN_STEPS, PHASE (1|2), CHAIN_PHASE2 (1|0), INIT_FROM,
# VENV / ACTIVATE / CONTAINER_IMAGE (+ CONTAINER_MOUNTS), NCCL_*, MASTER_PORT, SRUN_ARGS, CPU_BIND,
# TASK_DISTRIBUTION, PHASE2_SBATCH_ARGS, SCONTROL_TRIES, SCONTROL_RETRY_DELAY, TRAINER_SIGNAL, REQUEUE.
# Arguments after the script go to pretrain/run.py. See docs/slurm.md.
# Whole nodes (--exclusive, --mem=0: all of each node's memory), as NVIDIA's run.sub asks.
#
#SBATCH --job-name=bert-large
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
if [ -z "${REPO:-}" ]; then
  # sbatch runs a spooled copy of this file: ask the controller where the original lives. The
  # first line only: for an array's base id (one element has it) scontrol lists every element.
  _orig=$(scontrol show job -o "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n "s/.* Command=\([^ ]*\).*/\1/p" | sed -n 1p)
  REPO=$(cd "$(dirname "${_orig:-$0}")/.." && pwd)
fi
[ -f "$REPO/slurm/_common.sh" ] || { echo "cannot find the repository from $0: set REPO=/path/to/checkout" >&2; exit 2; }
SCRIPT=$REPO/slurm/pretrain_large.sh
RUN_NAME=bert-large
MODEL_CONFIG=${MODEL_CONFIG:-configs/bert-large.json}
source "$REPO/slurm/_pretrain.sh"
