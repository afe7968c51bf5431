# Run by `srun` in every task of a step (slurm/_common.sh, slurm_srun): not a job script itself.
#
#   bash slurm/_task.sh command [args...]
#
# Turns SLURM's task ids into what torch.distributed's env:// and DeepSpeed read, says in the job
# log where the task landed (host, GPU, CPUs), and refuses a GPU layout the trainer cannot use.
#
# GPU binding: every task sees all of its node's GPUs and uses the one at index LOCAL_RANK
# (torch.cuda.set_device(LOCAL_RANK) in pretrain/launch.py, cuda:LOCAL_RANK in the trainer, the
# fine-tuning runner and DeepSpeed's engine), which is also what torchrun and the deepspeed launcher
# do. The scripts do not narrow CUDA_VISIBLE_DEVICES per task (srun --gpus-per-task=1 or
# --gpu-bind=single:1/map_gpu): a task that sees one GPU has it at index 0, and local rank 3 would
# fail with "invalid device ordinal". A cluster that narrows it anyway is caught here.
export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
if [ -n "${SLURM_NTASKS_PER_NODE:-}" ]; then export LOCAL_WORLD_SIZE=${SLURM_NTASKS_PER_NODE%%(*}; fi
gpu=none
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  IFS=, read -r -a _gpus <<<"$CUDA_VISIBLE_DEVICES"
  if [ "$LOCAL_RANK" -ge "${#_gpus[@]}" ]; then
    echo "ERROR: task $RANK (local rank $LOCAL_RANK on $(hostname -s)) sees only GPU(s) $CUDA_VISIBLE_DEVICES, but uses the one at index LOCAL_RANK; drop --gpus-per-task/--gpu-bind from SRUN_ARGS (or the cluster's defaults) so that every task sees the node's GPUs" >&2
    exit 2
  fi
  gpu=${_gpus[$LOCAL_RANK]}
elif [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ "$SLURM_GPUS_ON_NODE" != 0 ]; then
  # GRES without device files known to SLURM: the GPU is the one at index LOCAL_RANK.
  gpu=$LOCAL_RANK/$SLURM_GPUS_ON_NODE
fi
cpus=$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' /proc/$$/status)
echo "task rank=$RANK local_rank=$LOCAL_RANK world_size=$WORLD_SIZE host=$(hostname -s) gpu=$gpu cpus=$cpus cpus_per_task=${SLURM_CPUS_PER_TASK:-?}" >&2
exec "$@"
