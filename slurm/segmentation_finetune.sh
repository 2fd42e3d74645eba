#!/usr/bin/env bash
# Segmentation fine-tuning on SLURM: one task per GPU, every task runs segmentation/finetune.py (DDP).
#
#   sbatch slurm/segmentation_finetune.sh [CONFIG] [key=value ...]
#   sbatch -p PARTITION -A ACCOUNT slurm/segmentation_finetune.sh configs/segmentation/voc_stage2.yaml \
#       model.backbone=resnet50_gcn model.pretrained=runs/pretrain/resnet50_gcn/final.pth \
#       data.root=/data/VOCdevkit data.sbd_root=/data/benchmark_RELEASE run.dir=runs/seg/r50gcn_voc_stage2
#
# Stages run one after the other: submit stage N+1 with --dependency=afterok:<job of stage N> and
# model.init_from=<stage N run.dir>/final.pth (see the configs' headers).
#
# Defaults below: 1 node x 8 GPUs, 8 CPUs per task (DataLoader workers). Options given to sbatch on
# the command line override these #SBATCH lines as usual. The log is <job name>-<job id>.out in the
# submission directory, appended to across requeues.
#
# Preemption-safe like slurm/imagenet_pretrain.sh: 5 minutes before the time limit SLURM sends
# SIGUSR1 (--signal=USR1@300); the trainer finishes its iteration, writes a checkpoint, runs
# `scontrol requeue $SLURM_JOB_ID` and exits; the requeued job resumes from the latest checkpoint
# in run.dir. SIGTERM (preemption by another partition) is handled the same way.
#
# Environment: PYTHON (default: python on PATH), MASTER_PORT (default derived from the job id).
#SBATCH --job-name=lkm-finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIG=${1:-configs/segmentation/voc_stage2.yaml}
[ $# -gt 0 ] && shift
PYTHON=${PYTHON:-python}

[ -f "${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh" ] || {
  echo "error: submit from the repository root (no slurm/launch.sh in ${SLURM_SUBMIT_DIR:-.})" >&2; exit 2; }
# shellcheck source=slurm/launch.sh
source "${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh"
# DataLoader workers: all but one of the task's CPUs; later key=value arguments still win.
WORKERS=$(( ${SLURM_CPUS_PER_TASK:-1} > 1 ? ${SLURM_CPUS_PER_TASK:-1} - 1 : 0 ))
lkm_launch "$CONFIG" "python segmentation/finetune.py" -- "$PYTHON" segmentation/finetune.py -- \
  "data.num_workers=${WORKERS}" "$@"
