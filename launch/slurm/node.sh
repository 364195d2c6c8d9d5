#!/bin/bash
# Runs once per node (srun task): starts the launcher with this node's rank. Environment
# from job.sh: WLORA_PYTHON, WLORA_LAUNCHER, WLORA_ACCELERATE_CONFIG, WLORA_NPROC_PER_NODE,
# NNODES, MASTER_ADDR, MASTER_PORT; SLURM_NODEID from srun.
set -euo pipefail
NODE_RANK=${SLURM_NODEID:?run by srun}
case "$WLORA_LAUNCHER" in
    torchrun)
        exec "$WLORA_PYTHON" -m torch.distributed.run \
            --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$WLORA_NPROC_PER_NODE" \
            --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
            train.py --config "$@" ;;
    accelerate)
        exec "$WLORA_PYTHON" -m accelerate.commands.launch --config_file "$WLORA_ACCELERATE_CONFIG" \
            --num_machines "$NNODES" --machine_rank "$NODE_RANK" \
            --num_processes $((NNODES * WLORA_NPROC_PER_NODE)) \
            --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
            train.py --config "$@" ;;
    *)
        echo "WLORA_LAUNCHER=$WLORA_LAUNCHER: use torchrun or accelerate" >&2
        exit 2 ;;
esac
