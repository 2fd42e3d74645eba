#!/usr/bin/env bash
# Stop exactly the daemons slurm/local/start.sh started (pids recorded in $LKM_SLURM_DIR/run/*.ours).
#   slurm/local/stop.sh [--keep-jobs]   default: scancel every job of the test cluster first, so no
#                                 slurmstepd / job process outlives slurmd
# A munged that was already running before slurm/local/start.sh has no .ours file and is left alone.
set -uo pipefail
DIR=${LKM_SLURM_DIR:-/tmp/lkm-slurm}
RUN=$DIR/run
export SLURM_CONF=/etc/slurm/slurm.conf   # this cluster, not the 2-node one (start_2node.sh)
KEEP_JOBS=0
[ "${1:-}" = "--keep-jobs" ] && KEEP_JOBS=1

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"   # alive

if [ $KEEP_JOBS = 0 ] && alive "$RUN/slurmctld.ours" slurmctld; then
  jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// }" ]; then
    echo "[slurm-local] cancelling jobs: $jobs"
    scancel $jobs 2>/dev/null
    for _ in $(seq 1 150); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.1; done
  fi
fi

# stop_group NAME...: SIGTERM the recorded pids together, wait up to 10s each, then SIGKILL leftovers
rc=0
stop_group() {
  local name f pid; local -a names=() pids=()
  for name in "$@"; do
    f=$RUN/$name.ours
    if alive "$f" "$name"; then pid=$(cat "$f"); kill -TERM "$pid"; names+=("$name"); pids+=("$pid"); fi
    rm -f "$f"
  done
  for i in "${!pids[@]}"; do
    for _ in $(seq 1 200); do [ -d "/proc/${pids[$i]}" ] || break; sleep 0.05; done
    if [ -d "/proc/${pids[$i]}" ]; then
      echo "[slurm-local] ${names[$i]} (pid ${pids[$i]}) ignored SIGTERM, sending SIGKILL"; kill -KILL "${pids[$i]}"; rc=1
    fi
    echo "[slurm-local] stopped ${names[$i]} (pid ${pids[$i]})"
  done
}
stop_group slurmd slurmctld   # both take ~2s to exit, so in parallel
# munged last: the slurm daemons authenticate through it; left running while another cluster's daemons
# (slurm/local/start_2node.sh) still use it
if alive "$RUN/munged.ours" munged && others=$(pgrep -x 'slurm(ctl)?d' | xargs) && [ -n "$others" ]; then
  echo "[slurm-local] munged (pid $(cat "$RUN/munged.ours")) left running: other slurm daemons use it (pids $others)"
  rm -f "$RUN/munged.ours"
fi
stop_group munged
exit $rc
