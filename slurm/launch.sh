# Shared launch logic of the sbatch scripts in this folder; sourced, not run.
# sbatch runs a copy of the job script from its spool directory, so the scripts source this file
# from $SLURM_SUBMIT_DIR (the repository root, where they are submitted from).
#
#   lkm_launch CONFIG HOW_TO_RUN_DIRECTLY -- COMMAND... -- [key=value ...]
# checks that this is an sbatch job and that CONFIG exists, sets the rendezvous port, the
# thread count and the task's CPUs, logs the job line (the log is appended to across requeues),
# then srun's COMMAND with `--config CONFIG` and the key=value overrides on every task.
lkm_launch() {
  local config=$1 direct=$2; shift 2
  [ "${1:-}" = "--" ] && shift
  local -a cmd=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do cmd+=("$1"); shift; done
  [ "${1:-}" = "--" ] && shift
  if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "error: submit this script with sbatch (e.g. sbatch $0 $config), or run $direct directly" >&2
    exit 2
  fi
  if [ ! -f "$config" ]; then
    echo "error: config $config not found (run sbatch from the repository root, or give an absolute path)" >&2
    exit 2
  fi
  # Every task derives the same rendezvous from SLURM's variables (backbone/common/distributed.py);
  # the port is fixed here once so that all nodes agree.
  export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 40000))}
  export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
  # Since SLURM 22.05 srun no longer inherits the job's --cpus-per-task: its step would give every task one
  # CPU, and where the cluster binds tasks to cores (task/affinity, task/cgroup) each rank then runs its loader
  # workers on that one core (pretraining stops: more workers than numba threads). SRUN_CPUS_PER_TASK is srun's
  # -c; equal to SLURM_CPUS_PER_TASK it is also right for SLURM >= 23.11, which reads that one again.
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
  echo "[$(date '+%F %T')] job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}:" \
       "${SLURM_NTASKS} tasks, ${SLURM_CPUS_PER_TASK:-1} CPUs each; config ${config} $*"
  srun --kill-on-bad-exit=1 "${cmd[@]}" --config "$config" "$@"
}
