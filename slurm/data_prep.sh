#!/usr/bin/env bash
# Data preparation across nodes with mpi4py: srun starts one MPI rank per task (PMIx). Input
# files are cut into parts of ~--part-bytes (256 MiB) at document boundaries (a .gz file is one
# part), ranks take the parts round-robin and rank 0 merges them in order, so the output is
# byte-identical to a single-process run. Use at least as many parts as ranks: a large
# uncompressed file spreads over all nodes, a single .gz (or a corpus smaller than one part per
# rank) keeps the other ranks idle. Tokenizer processes per rank: --workers (default: the task's
# CPUs).
#
#   INPUT="/raw/wiki /raw/books" VOCAB=vocab.txt DATA=/data/bert sbatch slurm/data_prep.sh
#   DATA=/data/bert sbatch --nodes=4 slurm/data_prep.sh --embedded --part-bytes 1300000   # 5 MB: 4 parts, 1 a node
#
# Environment: INPUT (paths, space-separated; or pass --embedded), VOCAB, DATA (output dir),
# SEQ_LENGTHS (pair indexes to build, default "128 512": phase 1 and phase 2), MPI_TYPE (srun
# --mpi plugin, default pmix), VENV / ACTIVATE / CONTAINER_IMAGE (+ CONTAINER_MOUNTS), SRUN_ARGS. Arguments after the
# script go to `python -m data_prep` (see `python -m data_prep --help`).
#
#SBATCH --job-name=bert-data-prep
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
if [ -z "${REPO:-}" ]; then
  # sbatch runs a spooled copy of this file: ask the controller where the original lives. The
  # first line only: for an array's base id (one element has it) scontrol lists every element.
  _orig=$(scontrol show job -o "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n "s/.* Command=\([^ ]*\).*/\1/p" | sed -n 1p)
  REPO=$(cd "$(dirname "${_orig:-$0}")/.." && pwd)
fi
[ -f "$REPO/slurm/_common.sh" ] || { echo "cannot find the repository from $0: set REPO=/path/to/checkout" >&2; exit 2; }
source "$REPO/slurm/_common.sh"
slurm_require_allocation slurm/data_prep.sh

[ -n "${DATA:-}" ] || slurm_die "DATA is not set: export DATA=/path/to/output_dir before sbatch"
case "$DATA" in /*) ;; *) DATA=$SLURM_SUBMIT_DIR/$DATA;; esac
args=(--output-dir "$DATA" --mpi on --no-progress --workers "${WORKERS:-${SLURM_CPUS_PER_TASK:-1}}")
if [ -n "${INPUT:-}" ]; then
  read -r -a inputs <<<"$INPUT"
  for i in "${!inputs[@]}"; do
    case "${inputs[$i]}" in /*) ;; *) inputs[$i]=$SLURM_SUBMIT_DIR/${inputs[$i]};; esac
    [ -e "${inputs[$i]}" ] || slurm_die "INPUT: ${inputs[$i]} does not exist"
  done
  args+=(--input "${inputs[@]}")
elif [[ " $* " != *" --embedded "* && " $* " != *" --embedded="* && " $* " != *" --input "* ]]; then
  slurm_die "no input: set INPUT=\"file_or_dir ...\" or pass --embedded after the script name"
fi
if [ -n "${VOCAB:-}" ]; then
  case "$VOCAB" in /*) ;; *) VOCAB=$SLURM_SUBMIT_DIR/$VOCAB;; esac
  [ -f "$VOCAB" ] || slurm_die "VOCAB=$VOCAB: no such file"
  args+=(--vocab "$VOCAB")
fi
for L in ${SEQ_LENGTHS-128 512}; do args+=(--seq-length "$L"); done
# A container sees them only if mounted.
mkdir -p "$DATA"
SLURM_JOB_PATHS+=("$DATA" ${inputs[@]+"${inputs[@]}"})
if [ -n "${VOCAB:-}" ]; then SLURM_JOB_PATHS+=("$(dirname "$VOCAB")"); fi
slurm_add_arg_paths "$@"

slurm_activate
slurm_log "data prep on ${SLURM_NTASKS} MPI ranks (${SLURM_JOB_NODELIST}): $PYTHON -m data_prep ${args[*]} $*"
slurm_srun "--mpi=${MPI_TYPE:-pmix}" -- "$PYTHON" -m data_prep "${args[@]}" "$@"
