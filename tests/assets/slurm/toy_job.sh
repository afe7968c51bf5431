#!/usr/bin/env bash
# Test job: the product's srun/rendezvous/preemption helper (slurm/_common.sh) around the toy
# gloo trainer. Submitted by tests/integration/test_slurm_cluster.py with sbatch --requeue.
REPO=${REPO:?set REPO}
source "$REPO/slurm/_common.sh"
slurm_require_allocation toy_job.sh
slurm_activate
slurm_rendezvous
slurm_srun -- "$PYTHON" tests/assets/slurm/toy_trainer.py "$@"
