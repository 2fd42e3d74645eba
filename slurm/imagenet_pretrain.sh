#!/usr/bin/env bash
# ImageNet pretraining on SLURM: one task per GPU, every task runs backbone.train (DDP).
#
#   sbatch slurm/imagenet_pretrain.sh [CONFIG] [key=value ...]
#   sbatch -p PARTITION -A ACCOUNT --nodes=4 slurm/imagenet_pretrain.sh \
#       configs/pretrain/resnet50_gcn_88_epochs.yaml data.train=/data/train.beton data.val=/data/val.beton \
#       run.dir=runs/r50gcn_88
#
# Defaults below: 2 nodes x 8 GPUs, 12 CPUs per task (the ffcv decoding threads). Options given to
# sbatch on the command line override these #SBATCH lines as usual. The log is <job name>-<job id>.out
# in the submission directory, appended to across requeues.
#
# Preemption-safe: 5 minutes before the time limit SLURM sends SIGUSR1 to every task
# (--signal=USR1@300); the trainer finishes its step, writes a checkpoint, runs
# `scontrol requeue $SLURM_JOB_ID` and exits. The requeued job (--requeue) starts this script again
# with the same arguments and the trainer resumes from the latest checkpoint in run.dir. Preemption
# by another partition (SIGTERM) is handled the same way.
#
# Environment: PYTHON (default: python on PATH, e.g. your activated venv), MASTER_PORT (default
# derived from the job id).
#SBATCH --job-name=lkm-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIG=${1:-configs/pretrain/resnet50_gcn_88_epochs.yaml}
[ $# -gt 0 ] && shift
PYTHON=${PYTHON:-python}

if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "error: submit this script with sbatch (e.g. sbatch $0 $CONFIG), or run python -m backbone.train directly" >&2
  exit 2
fi
if [ ! -f "$CONFIG" ]; then
  echo "error: config $CONFIG not found (run sbatch from the repository root, or give an absolute path)" >&2
  exit 2
fi

# Every task derives the same rendezvous from SLURM's variables (backbone/common/distributed.py);
# the port is fixed here once so that all nodes agree.
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 40000))}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

echo "[$(date '+%F %T')] job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}:" \
     "${SLURM_NTASKS} tasks, ${SLURM_CPUS_PER_TASK:-1} CPUs each; config ${CONFIG} $*"

# data.num_workers follows --cpus-per-task; later key=value arguments still win.
srun --kill-on-bad-exit=1 "$PYTHON" -m backbone.train --config "$CONFIG" \
  "data.num_workers=${SLURM_CPUS_PER_TASK:-1}" "$@"
