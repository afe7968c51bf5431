# Sourced by pretrain_large.sh and pretrain_base.sh (which set SCRIPT, RUN_NAME, MODEL_CONFIG).
#
# PHASE=1 (default): seq-128 phase from configs/phase1.json into $RUN_DIR/phase1; on its first
# start it also submits phase 2 as a dependent job (afterok), so `sbatch slurm/pretrain_large.sh`
# is the whole pretraining. PHASE=2: seq-512 phase from configs/phase2.json into $RUN_DIR/phase2,
# initialised from phase 1's checkpoint. Every start resumes from its save dir's `latest`.
source "$REPO/slurm/_common.sh"
slurm_require_allocation "$SCRIPT"

PHASE=${PHASE:-1}
case "$PHASE" in 1|2) ;; *) slurm_die "PHASE=$PHASE: use PHASE=1 (seq 128, chains phase 2) or PHASE=2 (seq 512 only)";; esac
[ -n "${DATA:-}" ] || slurm_die "DATA is not set: export DATA=/path/to/data_prep/output (made by slurm/data_prep.sh) before sbatch"
case "$DATA" in /*) ;; *) DATA=$SLURM_SUBMIT_DIR/$DATA;; esac
RUN_DIR=${RUN_DIR:-$REPO/runs/$RUN_NAME}
case "$RUN_DIR" in /*) ;; *) RUN_DIR=$SLURM_SUBMIT_DIR/$RUN_DIR;; esac
PHASE1_CONFIG=${PHASE1_CONFIG:-configs/phase1.json}
PHASE2_CONFIG=${PHASE2_CONFIG:-configs/phase2.json}
CHAIN_PHASE2=${CHAIN_PHASE2:-1}
export DATA RUN_DIR
# A container sees them only if mounted; a checkpoint written to an unmounted path is lost with it.
mkdir -p "$RUN_DIR"
SLURM_JOB_PATHS+=("$DATA" "$RUN_DIR")
if [ -n "${INIT_FROM:-}" ]; then SLURM_JOB_PATHS+=("$(dirname "$INIT_FROM")"); fi

cd "$REPO"
for f in "$MODEL_CONFIG" "$PHASE1_CONFIG" "$PHASE2_CONFIG" ${DS_CONFIG:+"$DS_CONFIG"}; do
  [ -f "$f" ] || slurm_die "config file $f not found (relative paths are relative to $REPO); fix MODEL_CONFIG/PHASE1_CONFIG/PHASE2_CONFIG/DS_CONFIG"
  # A config outside the repository (an absolute path, or ../) must be mounted too.
  case "$f" in /*) SLURM_JOB_PATHS+=("$(dirname "$f")");; *) SLURM_JOB_PATHS+=("$(dirname "$REPO/$f")");; esac
done
[ -f "$DATA/manifest.json" ] || slurm_die "DATA=$DATA has no manifest.json: data prep did not finish there (run slurm/data_prep.sh)"
slurm_add_arg_paths "$@"
# A path the container cannot mount ends the job now, before phase 2 is chained.
slurm_container_args >/dev/null

# Chain phase 2 once the inputs are known good (a phase 1 that fails would leave it pending; with
# --kill-on-invalid-dep it is then cancelled), before this job changes its environment
# (MASTER_ADDR, PATH), and only on the first start: a requeued phase 1 keeps its phase 2.
if [ "$PHASE" = 1 ] && [ "$CHAIN_PHASE2" = 1 ] && [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then
  if _shape_text=$(slurm_same_shape_args); then
    mapfile -t _shape <<<"$_shape_text"
    # PHASE2_SBATCH_ARGS come last: they override what was copied (e.g. a longer --time).
    # shellcheck disable=SC2206
    _phase2=(sbatch --parsable "${_shape[@]}" ${PHASE2_SBATCH_ARGS:-} --job-name="${SLURM_JOB_NAME}-phase2"
             --dependency="afterok:$SLURM_JOB_ID" --kill-on-invalid-dep=yes --export=ALL,PHASE=2 "$SCRIPT" "$@")
    slurm_log "chaining phase 2: ${_phase2[*]}"
    if PHASE2_JOB_ID=$(cd "$SLURM_SUBMIT_DIR" && "${_phase2[@]}"); then
      slurm_log "submitted phase 2 as job ${PHASE2_JOB_ID%%;*} (starts after job $SLURM_JOB_ID completes successfully)"
    else
      # Phase 1 is still worth running: its checkpoint is what phase 2 starts from.
      slurm_log "WARNING: the controller refused phase 2 (see sbatch's error above); phase 1 continues. Once it is done, submit phase 2 with PHASE=2 and the same DATA/RUN_DIR, e.g. PHASE=2 DATA=$DATA RUN_DIR=$RUN_DIR sbatch ${_shape[*]} ${PHASE2_SBATCH_ARGS:-} $SCRIPT $*"
    fi
  else
    # Not chained rather than chained with the script's defaults. The environment tells part of
    # the shape; GPUs, memory, time, constraint and exclusivity only the controller knows.
    _known="--nodes=$SLURM_JOB_NUM_NODES${SLURM_NTASKS_PER_NODE:+ --ntasks-per-node=$SLURM_NTASKS_PER_NODE}${SLURM_CPUS_PER_TASK:+ --cpus-per-task=$SLURM_CPUS_PER_TASK}${SLURM_JOB_PARTITION:+ --partition=$SLURM_JOB_PARTITION}${SLURM_JOB_ACCOUNT:+ --account=$SLURM_JOB_ACCOUNT}${SLURM_JOB_QOS:+ --qos=$SLURM_JOB_QOS}${SLURM_JOB_RESERVATION:+ --reservation=$SLURM_JOB_RESERVATION}"
    slurm_log "WARNING: phase 2 NOT chained: \`scontrol show job $SLURM_JOB_ID\` gave no answer in ${SCONTROL_TRIES:-3} tries, and without phase 1's shape phase 2 would get the script's defaults. Phase 1 continues. Submit phase 2 by hand with the sbatch options phase 1 had (GPUs, memory, time, constraint too), e.g. PHASE=2 DATA=$DATA RUN_DIR=$RUN_DIR sbatch --dependency=afterok:$SLURM_JOB_ID $_known ${PHASE2_SBATCH_ARGS:-} $SCRIPT $*"
  fi
fi

slurm_activate
slurm_rendezvous

args=(--model_config "$MODEL_CONFIG" --data "$DATA")
if [ "$PHASE" = 1 ]; then
  args=(--config "$PHASE1_CONFIG" "${args[@]}" --save_dir "$RUN_DIR/phase1")
  if [ -n "${TRAIN_STEPS:-}" ]; then args+=(--train_steps "$TRAIN_STEPS"); fi
else
  args=(--config "$PHASE2_CONFIG" "${args[@]}" --save_dir "$RUN_DIR/phase2"
        --init_from "${INIT_FROM:-$RUN_DIR/phase1/latest}")
  if [ -n "${PHASE2_TRAIN_STEPS:-}" ]; then args+=(--train_steps "$PHASE2_TRAIN_STEPS"); fi
fi
if [ -n "${DS_CONFIG:-}" ]; then args+=(--ds_config "$DS_CONFIG"); fi
slurm_log "phase $PHASE of $RUN_NAME, restart ${SLURM_RESTART_COUNT:-0}: $PYTHON pretrain/run.py ${args[*]} $*"
slurm_srun -- "$PYTHON" pretrain/run.py "${args[@]}" "$@"
