# Sourced by the sbatch scripts in this folder; not a job script itself.
#
# It gives every job the same behaviour:
#   - the environment: VENV (default $REPO/.venv when present) or ACTIVATE (any shell snippet,
#     e.g. "module load cuda; conda activate bert"), or a container through CONTAINER_IMAGE
#     (pyxis/enroot: srun --container-image) or SRUN_ARGS;
#   - the rendezvous from the allocation: MASTER_ADDR = first host of the job, MASTER_PORT derived
#     from the job id (stable across a requeue, different for jobs sharing a node);
#   - one task per GPU through `srun`, each task told RANK/LOCAL_RANK/WORLD_SIZE from
#     SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS (what torch.distributed's env:// and DeepSpeed read);
#   - NCCL settings exported here, visible and overridable, not buried in Python;
#   - failure: srun --kill-on-bad-exit=1 takes the job down when one task dies instead of leaving
#     the others blocked in a collective;
#   - preemption: the signal SLURM sends before the time limit (#SBATCH --signal=B:USR1@...) or by
#     `scancel --signal=USR1 --batch JOBID` is forwarded to the tasks, which save a checkpoint and
#     exit; then the job requeues itself and the next start resumes from the run's `latest`.

set -euo pipefail

slurm_log() { echo "[$(date -u +%H:%M:%S) ${SLURM_JOB_ID:-nojob} $(hostname -s)] $*" >&2; }
slurm_die() { slurm_log "ERROR: $*"; exit 2; }

slurm_require_allocation() {
  [ -n "${SLURM_JOB_ID:-}" ] || slurm_die "$1 is an sbatch script: submit it with \`sbatch $1\` (see docs/slurm.md for mpirun and the deepspeed launcher)"
}

# ---------------------------------------------------------------- environment
slurm_activate() {
  cd "$REPO"
  if [ -n "${ACTIVATE:-}" ]; then
    slurm_log "activate: $ACTIVATE"
    eval "$ACTIVATE"
  elif [ -z "${CONTAINER_IMAGE:-}" ]; then
    VENV=${VENV:-$REPO/.venv}
    if [ -f "$VENV/bin/activate" ]; then
      # shellcheck disable=SC1091
      source "$VENV/bin/activate"
      # DeepSpeed JIT-builds ops into this cache; one per venv, or two venvs rebuild each other's.
      export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}
    elif [ "$VENV" != "$REPO/.venv" ]; then
      slurm_die "VENV=$VENV has no bin/activate; point VENV at a virtual environment or set ACTIVATE"
    fi
  fi
  PYTHON=${PYTHON:-python}
  # One OpenMP pool per task sized to its CPUs, not to the whole node.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
}

# ---------------------------------------------------------------- rendezvous and NCCL
slurm_rendezvous() {
  MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
  # Below the Linux ephemeral range (32768+), so the port is not taken by an outgoing socket.
  MASTER_PORT=${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}
  export MASTER_ADDR MASTER_PORT
  # NCCL: all settings are env vars with defaults here; set any NCCL_* in the submitting shell
  # (sbatch exports it) to override, e.g. NCCL_SOCKET_IFNAME=ib0 NCCL_IB_HCA=mlx5.
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
  # A hung collective aborts the process (then srun --kill-on-bad-exit ends the job) instead of
  # blocking until the time limit.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export TORCH_NCCL_BLOCKING_WAIT=${TORCH_NCCL_BLOCKING_WAIT:-0}
  for v in NCCL_SOCKET_IFNAME NCCL_IB_HCA NCCL_IB_DISABLE NCCL_NET_GDR_LEVEL NCCL_P2P_LEVEL \
           NCCL_CROSS_NIC NCCL_ALGO NCCL_PROTO NCCL_TOPO_FILE GLOO_SOCKET_IFNAME; do
    if [ -n "${!v:-}" ]; then export "${v?}"; fi
  done
  local nccl_env
  nccl_env=$(env | grep -E '^(NCCL|TORCH_NCCL|GLOO)_' | sort | tr '\n' ' ')
  slurm_log "rendezvous ${MASTER_ADDR}:${MASTER_PORT}, ${SLURM_NTASKS:-?} tasks on ${SLURM_JOB_NODELIST}; ${nccl_env}"
}

# ---------------------------------------------------------------- the srun step
# slurm_srun [srun options...] -- command [args...]
# Runs one step with a task per GPU (srun's defaults from the allocation), forwards the
# preemption signal, and on preemption requeues the job. Returns the step's exit status.
slurm_srun() {
  local srun_opts=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do srun_opts+=("$1"); shift; done
  [ "${1:-}" = "--" ] && shift
  if [ -n "${CONTAINER_IMAGE:-}" ]; then
    srun_opts+=("--container-image=$CONTAINER_IMAGE" "--container-workdir=$REPO"
                "--container-mounts=${CONTAINER_MOUNTS:-$REPO:$REPO}")
  fi
  # shellcheck disable=SC2206
  local extra=(${SRUN_ARGS:-})

  _SLURM_PREEMPTED=0
  trap _slurm_on_preempt USR1
  trap _slurm_on_term TERM
  # The inline wrapper turns SLURM's task ids into the variables torch.distributed reads.
  srun --kill-on-bad-exit=1 "${srun_opts[@]}" "${extra[@]}" \
    bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
             if [ -n "${SLURM_NTASKS_PER_NODE:-}" ]; then export LOCAL_WORLD_SIZE=$SLURM_NTASKS_PER_NODE; fi
             echo "task rank=$RANK local_rank=$LOCAL_RANK world_size=$WORLD_SIZE host=$(hostname -s)" >&2
             exec "$@"' task "$@" &
  _SLURM_SRUN_PID=$!
  local rc=0
  # `wait` returns early when a trapped signal arrives; keep waiting until srun itself is gone.
  while kill -0 "$_SLURM_SRUN_PID" 2>/dev/null; do
    rc=0; wait "$_SLURM_SRUN_PID" || rc=$?
  done
  trap - USR1 TERM

  if [ "$_SLURM_PREEMPTED" = 1 ]; then
    if [ "$rc" = 0 ]; then
      slurm_log "the tasks checkpointed and stopped"
    else
      # Still requeue: the time limit would end the job anyway, and the next start resumes from
      # the newest complete checkpoint (`latest` only moves once a checkpoint is whole).
      slurm_log "WARNING: the tasks exited with status $rc after the signal; the next start resumes from the last complete checkpoint"
    fi
    if [ "${REQUEUE:-1}" = 1 ]; then
      slurm_log "requeueing job $SLURM_JOB_ID (restart $((${SLURM_RESTART_COUNT:-0} + 1)))"
      scontrol requeue "$SLURM_JOB_ID" ||
        slurm_die "scontrol requeue failed (job submitted with --no-requeue, or requeue disabled on this cluster); resubmit the same command: it resumes from the run's latest checkpoint"
      # The controller now ends this script; do not fall through to whatever follows.
      sleep 300
      exit 0
    fi
    slurm_log "REQUEUE=0: not requeueing"
    return "$rc"
  fi
  if [ "$rc" != 0 ]; then
    slurm_log "ERROR: step failed with status $rc (a task died or timed out; srun --kill-on-bad-exit stopped the others). See the task output above."
  fi
  return "$rc"
}

# USR1 is the scheduled warning before the time limit (#SBATCH --signal=B:USR1@T) or a manual
# `scancel --signal=USR1 --batch JOBID`: checkpoint, stop, requeue.
_slurm_on_preempt() {
  local sig=${TRAINER_SIGNAL:-USR1}
  slurm_log "received SIGUSR1: sending SIG$sig to the tasks so that they checkpoint and exit, then requeueing"
  _SLURM_PREEMPTED=1
  # srun forwards the signal to every task of the step.
  kill -s "$sig" "$_SLURM_SRUN_PID" 2>/dev/null || true
}

# TERM means SLURM itself is ending the job (scancel, scontrol requeue, time limit, preemption by
# another job): srun and the tasks get it too. Never requeue here, or a cancelled job would
# come back; just keep waiting so that srun can report the tasks' exit.
_slurm_on_term() {
  slurm_log "received SIGTERM: the job is being ended by SLURM; waiting for the tasks to stop"
}

# ---------------------------------------------------------------- chaining
# Options that give a follow-up job the same shape as this one (nodes, tasks, CPUs, GPUs,
# partition, time), read back from the controller so that command-line overrides carry over.
slurm_same_shape_args() {
  local info gres
  info=$(scontrol show job -o "$SLURM_JOB_ID")
  _field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$info"; }
  echo "--nodes=$SLURM_JOB_NUM_NODES"
  [ -n "${SLURM_NTASKS_PER_NODE:-}" ] && echo "--ntasks-per-node=$SLURM_NTASKS_PER_NODE"
  [ -n "${SLURM_CPUS_PER_TASK:-}" ] && echo "--cpus-per-task=$SLURM_CPUS_PER_TASK"
  [ -n "${SLURM_MEM_PER_NODE:-}" ] && echo "--mem=${SLURM_MEM_PER_NODE}M"
  [ -n "${SLURM_JOB_PARTITION:-}" ] && echo "--partition=$SLURM_JOB_PARTITION"
  gres=$(_field TresPerNode)
  if [ -n "$gres" ]; then echo "--gres=${gres#gres:}"; else echo "--gres=none"; fi
  local t
  t=$(_field TimeLimit)
  if [ -n "$t" ] && [ "$t" != UNLIMITED ]; then echo "--time=$t"; fi
  # Same folder and naming as this job's log, with the follow-up's own name and id.
  local out
  out=$(_field StdOut)
  if [ -n "$out" ]; then echo "--output=$(dirname "$out")/%x-%j.out"; fi
}
