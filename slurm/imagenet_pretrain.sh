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

[ -f "${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh" ] || {
  echo "error: submit from the repository root (no slurm/launch.sh in ${SLURM_SUBMIT_DIR:-.})" >&2; exit 2; }
# shellcheck source=slurm/launch.sh
source "${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh"
# data.num_workers (ffcv decoding threads) follows --cpus-per-task; later key=value arguments still win.
lkm_launch "$CONFIG" "python -m backbone.train" -- "$PYTHON" -m backbone.train -- \
  "data.num_workers=${SLURM_CPUS_PER_TASK:-1}" "$@"
