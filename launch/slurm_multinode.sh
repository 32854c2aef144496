#!/usr/bin/env bash
# Multi-node training with Slurm: one `accelerate launch` per node, each starting one process per GPU.
#
#   sbatch --nodes 2 launch/slurm_multinode.sh launch/zero3.yaml sft --config recipes/vsp_spatial_planning/stage1_qwen2.5_vl_7b.yaml
#   sbatch --nodes 4 launch/slurm_multinode.sh launch/zero2.yaml grpo --config recipes/vsp_spatial_planning/grpo_qwen2.5_vl_7b.yaml
#
# Arguments: an accelerate config from launch/ (its num_machines/num_processes/machine_rank are overridden here),
# then the `mirage-rl` command and its arguments. Every node must see the same repository, outputs folder and data
# (a shared file system). The machine rank comes from SLURM_NODEID, the main address is the first node of the job.
#SBATCH --job-name=mirage-rl
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.err
set -euo pipefail

if [ "$#" -lt 2 ]; then
    echo "usage: sbatch --nodes N $0 LAUNCH_CONFIG.yaml {sft|grpo} [--config RECIPE.yaml] [--key value ...]" >&2
    exit 2
fi
CONFIG=$1
shift
if [ ! -f "$CONFIG" ]; then
    echo "$0: no accelerate config at $CONFIG (one of launch/*.yaml)" >&2
    exit 2
fi

GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi --list-gpus | wc -l)}
NUM_NODES=${SLURM_NNODES:?run this script with sbatch (SLURM_NNODES is not set)}
WORLD_SIZE=$((NUM_NODES * GPUS_PER_NODE))
MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # sed reads it all: `head` could SIGPIPE scontrol under pipefail
MAIN_PORT=${MAIN_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export TOKENIZERS_PARALLELISM=false

echo "nodes=$NUM_NODES gpus/node=$GPUS_PER_NODE world=$WORLD_SIZE main=$MAIN_ADDR:$MAIN_PORT config=$CONFIG: mirage-rl $*"
# `srun` starts one task per node; the single quotes defer $SLURM_NODEID to each node.
srun --kill-on-bad-exit=1 bash -c "accelerate launch \
    --config_file '$CONFIG' \
    --num_machines $NUM_NODES \
    --num_processes $WORLD_SIZE \
    --machine_rank \$SLURM_NODEID \
    --main_process_ip $MAIN_ADDR \
    --main_process_port $MAIN_PORT \
    --rdzv_backend static \
    -m mirage_rl.cli $(printf '%q ' "$@")"
