#!/bin/bash
# Train a recipe on several Slurm nodes: one `recipe run` per node, torchrun inside each (train.distributed).
#   sbatch --nodes=2 --gpus-per-node=4 docs/launch/slurm.sh llama2_lora [field=value ...]
# Every node runs the whole recipe; the cached steps (data, model) are quick, and the train step joins the others
# through MASTER_ADDR/MASTER_PORT with its NODE_RANK. Put RECIPE_CACHE on a filesystem all nodes share to keep one copy
# of each result (node 0's), or leave it per node (each node commits its own, equal, copy).
#SBATCH --job-name=recipe
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
set -euo pipefail
RECIPE=${1:?usage: sbatch docs/launch/slurm.sh RECIPE [field=value ...]}
shift
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-29500}
GPUS=${SLURM_GPUS_ON_NODE:-1}
# SLURM_NODEID is set per task by srun: NODE_RANK must be read inside the task, hence the single quotes
srun --kill-on-bad-exit=1 bash -c 'NODE_RANK=$SLURM_NODEID exec recipe run "$@"' _ "$RECIPE" \
  "train.distributed.nnodes=$SLURM_JOB_NUM_NODES" "train.distributed.nproc_per_node=$GPUS" "$@"
