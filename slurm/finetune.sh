#!/usr/bin/env bash
# Downstream fine-tuning (python -m finetune) on one GPU. Fine-tuning BERT on GLUE/NER/SQuAD-sized
# data takes minutes to hours on one GPU, so one task; several seeds run in one process
# (--seeds 1 2 3: mean and std reported), or submit an array and pick the seed per element.
#
#   sbatch slurm/finetune.sh --task classify --model runs/bert-large/phase2/latest \
#       --train train.tsv --eval dev.tsv --output-dir runs/ft/sst2 --seeds 1 2 3
#   sbatch --array=1-5 slurm/finetune.sh --task token ... --seeds SEED   # SEED <- SLURM_ARRAY_TASK_ID
#
# Environment: VENV / ACTIVATE / CONTAINER_IMAGE, SRUN_ARGS. Arguments go to `python -m finetune`
# (see `python -m finetune --help`); relative paths are relative to the submit directory.
#
#SBATCH --job-name=bert-finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=08:00:00
#SBATCH --output=%x-%j.out
if [ -z "${REPO:-}" ]; then
  # sbatch runs a spooled copy of this file: ask the controller where the original lives.
  _orig=$(scontrol show job -o "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n "s/.* Command=\([^ ]*\).*/\1/p")
  REPO=$(cd "$(dirname "${_orig:-$0}")/.." && pwd)
fi
[ -f "$REPO/slurm/_common.sh" ] || { echo "cannot find the repository from $0: set REPO=/path/to/checkout" >&2; exit 2; }
source "$REPO/slurm/_common.sh"
slurm_require_allocation slurm/finetune.sh
[ $# -gt 0 ] || slurm_die "no arguments: pass the finetune flags after the script name (python -m finetune --help)"

args=()
for a in "$@"; do
  # The literal SEED stands for this array element's index (sbatch --array).
  if [ "$a" = SEED ]; then
    [ -n "${SLURM_ARRAY_TASK_ID:-}" ] || slurm_die "SEED in the arguments needs an array job (sbatch --array=1-5 ...)"
    a=$SLURM_ARRAY_TASK_ID
  fi
  args+=("$a")
done
slurm_activate
# Relative paths in the arguments are meant from where the job was submitted.
cd "$SLURM_SUBMIT_DIR"
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
slurm_log "finetune: $PYTHON -m finetune ${args[*]}"
slurm_srun -- "$PYTHON" -m finetune --threads "${SLURM_CPUS_PER_TASK:-1}" "${args[@]}"
