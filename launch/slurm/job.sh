#!/bin/bash
# The body of every wlora_dist SLURM job, sourced by single_node.sbatch / multi_node.sbatch
# (in the batch shell, so that its signal trap sees what SLURM sends).
#
#   sbatch launch/slurm/multi_node.sbatch CONFIG.yaml [key=value ...]
#
# Environment (all optional):
#   WLORA_PYTHON            python with wlora_dist installed (default: .venv/bin/python if present, else python)
#   WLORA_LAUNCHER          torchrun (default) or accelerate
#   WLORA_ACCELERATE_CONFIG accelerate config for WLORA_LAUNCHER=accelerate
#                           (default launch/accelerate/multinode_fsdp2.yaml)
#   WLORA_NPROC_PER_NODE    processes per node (default: SLURM_GPUS_ON_NODE, else nvidia-smi's GPU count, else 1)
#   WLORA_MASTER_PORT       rendezvous port (default: 20000 + job id % 20000)
#   WLORA_SHARD_SIZE        FSDP2's shard group: "node" for hybrid sharding (HSDP: the base
#                           sharded over a node's GPUs, replicated across nodes, so only
#                           gradients cross the network), a number, or unset for the config's
#                           distributed.fsdp.shard_size
set -euo pipefail

CONFIG=${1:?usage: sbatch launch/slurm/<script>.sbatch CONFIG.yaml [key=value ...]}
shift
cd "${SLURM_SUBMIT_DIR:-.}"

if [[ -z "${WLORA_PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then WLORA_PYTHON=.venv/bin/python; else WLORA_PYTHON=python; fi
fi
NNODES=${SLURM_NNODES:-1}
if [[ -z "${WLORA_NPROC_PER_NODE:-}" ]]; then
    WLORA_NPROC_PER_NODE=${SLURM_GPUS_ON_NODE:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)}
    [[ "$WLORA_NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] || WLORA_NPROC_PER_NODE=1
fi
# Rendezvous on the first node of the allocation.
# awk reads every name (head would exit after the first, and under pipefail a scontrol that
# then writes into the closed pipe fails the job: seen with an unbuffered writer).
MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a SLURM job}" | awk 'NR == 1')
MASTER_PORT=${WLORA_MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
export WLORA_PYTHON WLORA_NPROC_PER_NODE NNODES MASTER_ADDR MASTER_PORT
export WLORA_LAUNCHER=${WLORA_LAUNCHER:-torchrun}
export WLORA_ACCELERATE_CONFIG=${WLORA_ACCELERATE_CONFIG:-launch/accelerate/multinode_fsdp2.yaml}
EXTRA=()
case "${WLORA_SHARD_SIZE:-}" in
    "") ;;
    node) EXTRA+=("distributed.fsdp.shard_size=${WLORA_NPROC_PER_NODE}") ;;
    *) EXTRA+=("distributed.fsdp.shard_size=${WLORA_SHARD_SIZE}") ;;
esac
echo "[wlora_dist] job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}): ${NNODES} node(s) x" \
     "${WLORA_NPROC_PER_NODE} process(es), ${WLORA_LAUNCHER}, rendezvous ${MASTER_ADDR}:${MASTER_PORT}, config ${CONFIG}${WLORA_SHARD_SIZE:+, shard groups: ${WLORA_SHARD_SIZE}}"

# Preemption / time limit: SLURM sends SIGUSR1 to this shell (#SBATCH --signal=B:USR1@...),
# or SIGTERM. We pass SIGTERM to the job step; every rank finishes its optimizer step,
# writes a checkpoint and exits 0; then the job is requeued and resumes from that
# checkpoint (checkpoint.resume_from=auto below).
preempted=0
step_pid=""
on_signal() {
    preempted=1
    echo "[wlora_dist] signal received: asking the trainer to checkpoint and stop"
    [[ -n "$step_pid" ]] && kill -TERM "$step_pid" 2>/dev/null || true
}
trap on_signal USR1 TERM

# One task per node; each starts the launcher, which starts one process per GPU.
srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    bash launch/slurm/node.sh "$CONFIG" checkpoint.resume_from=auto ${EXTRA[@]+"${EXTRA[@]}"} "$@" &
step_pid=$!
rc=0
while true; do
    wait "$step_pid" && rc=0 || rc=$?
    # wait returns early (> 128) when a trapped signal arrives; wait again for the step.
    kill -0 "$step_pid" 2>/dev/null || break
done
if [[ "$preempted" == 1 ]]; then
    echo "[wlora_dist] step ended (exit ${rc}) after the signal; requeueing job ${SLURM_JOB_ID:-?}"
    scontrol requeue "${SLURM_JOB_ID:?}"
    exit 0
fi
exit "$rc"
