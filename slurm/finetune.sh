#!/usr/bin/env bash
# Downstream fine-tuning (python -m finetune) on one GPU. Fine-tuning BERT on GLUE/NER/SQuAD-sized
# data takes minutes to hours on one GPU, so one task; several seeds run in one process
# (--seeds 1 2 3: mean and std reported), or submit an array and pick the seed per element.
#
#   sbatch slurm/finetune.sh --task classify --model runs/bert-large/phase2/latest \
#       --train train.tsv --eval dev.tsv --output-dir runs/ft/sst2 --seeds 1 2 3
#   sbatch --array=1-5 slurm/finetune.sh --task token ... --output-dir OUT --seeds SEED   # SEED <- SLURM_ARRAY_TASK_ID
#       # element i writes OUT/array_i/; OUT/metrics.json sums up the finished elements
#
# Environment: VENV / ACTIVATE / CONTAINER_IMAGE (+ CONTAINER_MOUNTS), SRUN_ARGS, MASTER_PORT. Arguments go to `python -m finetune`
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
  # sbatch runs a spooled copy of this file: ask the controller where the original lives. The
  # first line only: for an array's base id (one element has it) scontrol lists every element.
  _orig=$(scontrol show job -o "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n "s/.* Command=\([^ ]*\).*/\1/p" | sed -n 1p)
  REPO=$(cd "$(dirname "${_orig:-$0}")/.." && pwd)
fi
[ -f "$REPO/slurm/_common.sh" ] || { echo "cannot find the repository from $0: set REPO=/path/to/checkout" >&2; exit 2; }
source "$REPO/slurm/_common.sh"
slurm_require_allocation slurm/finetune.sh
[ $# -gt 0 ] || slurm_die "no arguments: pass the finetune flags after the script name (python -m finetune --help)"

args=()
seed_arg=0
for a in "$@"; do
  # The literal SEED stands for this array element's index (sbatch --array).
  if [ "$a" = SEED ]; then
    [ -n "${SLURM_ARRAY_TASK_ID:-}" ] || slurm_die "SEED in the arguments needs an array job (sbatch --array=1-5 ...)"
    a=$SLURM_ARRAY_TASK_ID
    seed_arg=1
  fi
  args+=("$a")
done

# The output directory, as given (relative to the submit directory).
out=""
for i in "${!args[@]}"; do
  case "${args[$i]}" in
    --output-dir|--output_dir) out=${args[$((i + 1))]:-};;
    --output-dir=*|--output_dir=*) out=${args[$i]#*=};;
  esac
done
[ -n "$out" ] || slurm_die "no --output-dir in the arguments: pass --output-dir OUT (python -m finetune --help)"
case "$out" in /*) ;; *) out=$SLURM_SUBMIT_DIR/$out;; esac

# An array's elements run at once: each writes its own OUT/array_<index> (metrics, models, the
# `consolidated` export), and every element that finishes rewrites OUT/metrics.json over all the
# finished ones (runs, mean, std: the shape --seeds 1 2 3 gives in one process).
elem_out=$out
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
  elem_out=$out/array_$SLURM_ARRAY_TASK_ID
  for i in "${!args[@]}"; do
    case "${args[$i]}" in
      --output-dir|--output_dir) args[$((i + 1))]=$elem_out;;
      --output-dir=*|--output_dir=*) args[$i]=--output-dir=$elem_out;;
    esac
  done
  [ "$seed_arg" = 1 ] || slurm_log "array element $SLURM_ARRAY_TASK_ID without SEED in the arguments: every element trains with the same seeds"
fi
mkdir -p "$elem_out"
# The summary counts an element once this marker names the array job; a requeued or resubmitted
# element drops its old one first, so old metrics are not counted while it trains again.
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then rm -f "$elem_out/slurm_array.json"; fi
SLURM_JOB_PATHS+=("$out")
# Absolute paths in the arguments (--model /ckpt/..., --train=/data/...) must be visible in a container.
slurm_add_arg_paths "${args[@]}"
slurm_container_args >/dev/null

slurm_activate
# Relative paths in the arguments are meant from where the job was submitted.
cd "$SLURM_SUBMIT_DIR"
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
# --deepspeed starts a process group: its address and port come from this job (the port from the
# job id), so two fine-tunes sharing a node never meet on a default port.
slurm_rendezvous
slurm_log "finetune: $PYTHON -m finetune ${args[*]}"
rc=0
slurm_srun -- "$PYTHON" -m finetune --threads "${SLURM_CPUS_PER_TASK:-1}" "${args[@]}" || rc=$?
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ] && [ "$rc" = 0 ]; then
  printf '{"array_job_id": "%s", "array_task_id": %s, "job_id": "%s"}\n' \
    "${SLURM_ARRAY_JOB_ID:-}" "$SLURM_ARRAY_TASK_ID" "$SLURM_JOB_ID" >"$elem_out/slurm_array.json"
  # The element's own results are written; a summary that fails (file system, a leftover lock
  # symlink) must not mark it FAILED.
  slurm_srun --ntasks=1 --nodes=1 -- "$PYTHON" "$REPO/slurm/_array_summary.py" "$out" ||
    slurm_log "WARNING: the array summary $out/metrics.json was not updated (see above); this element's results are in $elem_out"
fi
exit "$rc"
