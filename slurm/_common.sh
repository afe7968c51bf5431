# Sourced by the sbatch scripts in this folder; not a job script itself.
#
# It gives every job the same behaviour:
#   - the environment: VENV (default $REPO/.venv when present) or ACTIVATE (any shell snippet,
#     e.g. "module load cuda; conda activate bert"), or a container through CONTAINER_IMAGE
#     (pyxis/enroot: srun --container-image) or SRUN_ARGS;
#   - the rendezvous from the allocation: MASTER_ADDR = first host of the job, MASTER_PORT derived
#     from the job id (stable across a requeue, different for jobs sharing a node);
#   - one task per GPU through `srun`, each task told RANK/LOCAL_RANK/WORLD_SIZE from
#     SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS (what torch.distributed's env:// and DeepSpeed read)
#     by slurm/_task.sh; each task bound to its own cores (srun --cpus-per-task, --cpu-bind) and
#     to the GPU with its local rank as index;
#   - containers (CONTAINER_IMAGE, pyxis): the repository, the submit directory and every path the
#     job reads or writes (DATA, RUN_DIR, ...) are mounted at the same path inside;
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
  local hosts own_addr own_port
  hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
  # sed, not head: head exits after one line and, with pipefail, a long node list SIGPIPEs scontrol.
  own_addr=$(sed -n 1p <<<"$hosts")
  # Below the Linux ephemeral range (32768+), so the port is not taken by an outgoing socket.
  own_port=$((10000 + SLURM_JOB_ID % 20000))
  # sbatch exports the submitting shell (--export=ALL): a MASTER_ADDR/MASTER_PORT left there by a
  # torchrun session would otherwise land in every job.
  if [ -n "${MASTER_ADDR:-}" ] && ! grep -qxF "$MASTER_ADDR" <<<"$hosts"; then
    slurm_log "WARNING: ignoring MASTER_ADDR=$MASTER_ADDR from the submitting environment: not a host of this job; using $own_addr"
    MASTER_ADDR=$own_addr
  fi
  if [ -n "${MASTER_PORT:-}" ] && [ "$MASTER_PORT" != "$own_port" ]; then
    slurm_log "WARNING: MASTER_PORT=$MASTER_PORT from the submitting environment replaces this job's own port $own_port: jobs sharing a node with the same MASTER_PORT collide (unset it before sbatch for a port per job)"
  fi
  MASTER_ADDR=${MASTER_ADDR:-$own_addr}
  MASTER_PORT=${MASTER_PORT:-$own_port}
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
# Paths the job reads or writes besides the repository and the submit directory (DATA, RUN_DIR,
# inputs): the scripts add them here so that a container sees them at the same path.
SLURM_JOB_PATHS=()

# slurm_add_arg_paths args...: the existing absolute paths among the arguments, as `/abs` or
# `--flag=/abs`, join SLURM_JOB_PATHS (a folder itself, a file through its folder).
slurm_add_arg_paths() {
  local a
  for a in "$@"; do
    case "$a" in --*=/*) a=${a#*=};; esac
    case "$a" in /*) ;; *) continue;; esac
    if [ -d "$a" ]; then SLURM_JOB_PATHS+=("$a"); elif [ -e "$a" ]; then SLURM_JOB_PATHS+=("$(dirname "$a")"); fi
  done
}

# The srun options that place the tasks, one per line (slurm_srun uses them; tests print them).
slurm_placement_args() {
  # SLURM 22.05 to 23.11: srun no longer inherits sbatch's --cpus-per-task; without it each task
  # gets one CPU and, bound, runs its OpenMP threads and loader workers on one core.
  # (slurm_srun also exports SRUN_CPUS_PER_TASK, for srun calls made inside the step.)
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then echo "--cpus-per-task=$SLURM_CPUS_PER_TASK"; fi
  # Each task on its own cores; block:block keeps consecutive local ranks (and so consecutive GPU
  # indices) on the same socket, which matches nodes whose GPUs 0-3 and 4-7 hang off one socket
  # each (the block:cyclic default alternates sockets between local ranks). Other layouts (see
  # `nvidia-smi topo -m`; DGX A100: CPU_BIND=map_ldom:3,3,1,1,7,7,5,5, docs/slurm.md) or
  # TASK_DISTRIBUTION. task/none ignores both.
  echo "--cpu-bind=${CPU_BIND:-cores}"
  echo "--distribution=${TASK_DISTRIBUTION:-block:block}"
}

# The srun options that run the step in CONTAINER_IMAGE (pyxis), one per line; nothing without one.
slurm_container_args() {
  [ -n "${CONTAINER_IMAGE:-}" ] || return 0
  local mounts=() p src seen=" "
  for p in "$REPO" "${SLURM_SUBMIT_DIR:-$PWD}" ${SLURM_JOB_PATHS[@]+"${SLURM_JOB_PATHS[@]}"}; do
    # Inside, the job uses the paths as it sees them outside (REPO from pwd, DATA, the workdir),
    # which may pass through a symlink (/home -> /gpfs/home): the target keeps them unresolved
    # (only normalised), the source is the real folder the host mounts.
    p=$(realpath -m -s "$p")
    src=$(realpath -m "$p")
    # --container-mounts is SRC:DST[:FLAGS],...: a comma or colon in a path would split it.
    case "$p$src" in *[,:]*)
      slurm_die "CONTAINER_IMAGE: cannot mount $p$([ "$src" = "$p" ] || echo " (really $src)"): --container-mounts cannot express a path with ',' or ':'; rename or move that folder (a symlink to it does not help: its real path is what is mounted)";;
    esac
    case "$seen" in *" $p "*) continue;; esac
    seen+="$p "
    mounts+=("$src:$p")
  done
  local all
  all=$(IFS=,; echo "${mounts[*]}")
  # Same working directory inside as outside: finetune.sh runs from the submit directory so that
  # relative paths in its arguments resolve as the user meant them.
  echo "--container-image=$CONTAINER_IMAGE"
  echo "--container-workdir=$PWD"
  echo "--container-mounts=${all}${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}"
}

# slurm_srun [srun options...] -- command [args...]
# Runs one step with a task per GPU (srun's defaults from the allocation), forwards the
# preemption signal, and on preemption requeues the job. Returns the step's exit status.
slurm_srun() {
  local srun_opts=() opts_text
  # Not in a process substitution: a path the container cannot mount must end the job here.
  opts_text=$(slurm_placement_args; slurm_container_args) || exit 2
  mapfile -t srun_opts <<<"$opts_text"
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do srun_opts+=("$1"); shift; done
  [ "${1:-}" = "--" ] && shift
  # shellcheck disable=SC2206
  local extra=(${SRUN_ARGS:-})

  _SLURM_PREEMPTED=0
  trap _slurm_on_preempt USR1
  trap _slurm_on_term TERM
  # _task.sh turns SLURM's task ids into the variables torch.distributed reads.
  srun --kill-on-bad-exit=1 "${srun_opts[@]}" "${extra[@]}" bash "$REPO/slurm/_task.sh" "$@" &
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
# Options that give a follow-up job the same shape and the same place as this one: nodes, tasks,
# CPUs, memory, GPUs, partition, time, and account, QOS, constraint, exclusivity, reservation (a
# follow-up without them may be rejected, or land on other hardware). Read back from the
# controller, so that command-line overrides of the #SBATCH defaults carry over. One per line.
# Returns 1 (and prints nothing) when the controller did not answer: a follow-up submitted
# without the shape would get the script's #SBATCH defaults (other node count, no account...).
slurm_same_shape_args() {
  local info="" try tries=${SCONTROL_TRIES:-3}
  for ((try = 1; try <= tries; try++)); do
    # This job's line only (for an array's base id scontrol lists every element). A busy
    # controller times out now and then ("Socket timed out on send/recv"): ask again.
    info=$(scontrol show job -o "$SLURM_JOB_ID" | awk -v id="JobId=$SLURM_JOB_ID" '$1 == id && !n {print; n = 1}') || info=""
    [ -z "$info" ] || break
    if [ "$try" -lt "$tries" ]; then sleep "$((try * ${SCONTROL_RETRY_DELAY:-5}))"; fi
  done
  [ -n "$info" ] || return 1
  _field() {
    local v
    v=$(sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<" $info")
    case "$v" in "(null)"|"") ;; *) echo "$v";; esac
  }
  echo "--nodes=$SLURM_JOB_NUM_NODES"
  [ -n "${SLURM_NTASKS_PER_NODE:-}" ] && echo "--ntasks-per-node=$SLURM_NTASKS_PER_NODE"
  [ -n "${SLURM_CPUS_PER_TASK:-}" ] && echo "--cpus-per-task=$SLURM_CPUS_PER_TASK"
  # As requested, not as granted: --mem=0 (all of a node's memory) stays 0 on other nodes.
  local mem
  mem=$(_field MinMemoryNode)
  if [ -n "$mem" ]; then echo "--mem=$mem"
  else
    mem=$(_field MinMemoryCPU)
    if [ -n "$mem" ]; then echo "--mem-per-cpu=$mem"; fi
  fi
  [ -n "${SLURM_JOB_PARTITION:-}" ] && echo "--partition=$SLURM_JOB_PARTITION"
  # GPUs however phase 1 asked for them: --gres/--gpus-per-node (TresPerNode), --gpus
  # (TresPerJob), --gpus-per-task, --gpus-per-socket. gres:gpu:8 up to SLURM 22.05, gres/gpu:8
  # from 23.02, several comma-separated (23.x also lists cpu=8 in TresPerTask: not a GPU).
  _gpus() { _field "$1" | tr ',' '\n' | sed -n 's/^gres[:/]gpu[:=]//p' | sed -n 1p; }
  local gres v
  gres=$(_field TresPerNode | sed 's/gres[:/]//g')
  if [ -n "$gres" ]; then echo "--gres=$gres"
  else
    # The script's own #SBATCH --gres=gpu:8 would otherwise come back: phase 1 turned it off.
    echo "--gres=none"
  fi
  v=$(_gpus TresPerJob); if [ -n "$v" ]; then echo "--gpus=$v"; fi
  v=$(_gpus TresPerTask); if [ -n "$v" ]; then echo "--gpus-per-task=$v"; fi
  v=$(_gpus TresPerSocket); if [ -n "$v" ]; then echo "--gpus-per-socket=$v"; fi
  # Nodes phase 1 kept away from (a known bad node) stay excluded.
  v=$(_field ExcNodeList); if [ -n "$v" ]; then echo "--exclude=$v"; fi
  local t
  t=$(_field TimeLimit)
  if [ -n "$t" ] && [ "$t" != UNLIMITED ]; then echo "--time=$t"; fi
  v=$(_field Account); v=${v:-${SLURM_JOB_ACCOUNT:-}}
  if [ -n "$v" ]; then echo "--account=$v"; fi
  v=$(_field QOS); v=${v:-${SLURM_JOB_QOS:-}}
  if [ -n "$v" ]; then echo "--qos=$v"; fi
  v=$(_field Features)
  if [ -n "$v" ]; then echo "--constraint=$v"; fi
  v=$(_field Reservation); v=${v:-${SLURM_JOB_RESERVATION:-}}
  if [ -n "$v" ]; then echo "--reservation=$v"; fi
  case "$(_field OverSubscribe)" in
    NO) echo "--exclusive";;
    USER) echo "--exclusive=user";;
    MCS) echo "--exclusive=mcs";;
    YES) echo "--oversubscribe";;
  esac
  # Same folder and naming as this job's log, with the follow-up's own name and id.
  local out
  out=$(_field StdOut)
  if [ -n "$out" ]; then echo "--output=$(dirname "$out")/%x-%j.out"; fi
}
