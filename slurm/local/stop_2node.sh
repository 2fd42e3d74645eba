#!/usr/bin/env bash
# Stop what slurm/local/start_2node.sh started and drop its /etc/hosts lines. Idempotent.
#   slurm/local/stop_2node.sh [--purge]     --purge also deletes $LKM_SLURM2_DIR (config, state, logs, job history)
# Ours: slurmd/slurmctld processes started with SLURM_CONF=$LKM_SLURM2_DIR/etc/slurm.conf, every process
# still living in one of our slurmd's UTS namespaces (job processes that outlived slurmd), and munged
# only if start_2node.sh started it and no other slurm daemon (e.g. the single-node cluster of
# slurm/local/start.sh) still needs it. Jobs are cancelled first. The single-node cluster is left alone.
set -uo pipefail
trap '' PIPE
DIR=${LKM_SLURM2_DIR:-/tmp/lkm-slurm-2node}
RUN=$DIR/run
CONF=$DIR/etc/slurm.conf
TAG="# lkm-slurm-2node"
PURGE=0
[ "${1:-}" = "--purge" ] && PURGE=1
export SLURM_CONF=$CONF
say() { echo "[slurm-2node] $*" 2>/dev/null || true; }
[ "$(id -u)" = 0 ] || { echo "slurm/local/stop_2node.sh: must run as root" >&2; exit 1; }

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"   # alive
ours_pids() {  # COMM: live processes named COMM started with SLURM_CONF=$CONF
  local p c e
  for p in /proc/[0-9]*; do
    read -r c 2>/dev/null < "$p/comm" || continue; [ "$c" = "$1" ] || continue
    e=$(tr '\0' '\n' 2>/dev/null < "$p/environ") || continue
    [[ $'\n'$e$'\n' == *$'\n'"SLURM_CONF=$CONF"$'\n'* ]] || continue
    echo "${p#/proc/}"
  done
}
rc=0
term_wait_kill() {  # PID...: TERM, wait up to 10 s each, then KILL
  local p
  [ $# -gt 0 ] || return 0
  kill -TERM "$@" 2>/dev/null
  for p in "$@"; do
    for _ in $(seq 1 200); do [ -d "/proc/$p" ] || break; sleep 0.05; done
    if [ -d "/proc/$p" ]; then say "pid $p ignored SIGTERM, SIGKILL"; kill -KILL "$p" 2>/dev/null; rc=1; fi
  done
}

CTLD=$(ours_pids slurmctld); SLURMDS=$(ours_pids slurmd)

# 1. cancel jobs (stopping slurmd does not end running jobs)
if [ -n "$CTLD" ]; then
  jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// }" ]; then
    say "cancelling jobs: $jobs"
    scancel $jobs 2>/dev/null
    for _ in $(seq 1 150); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.1; done
  fi
fi

# 2. remember our slurmds' UTS namespaces, then stop the slurm daemons together
uts=()
my_uts=$(readlink /proc/$$/ns/uts)
for p in $SLURMDS; do
  u=$(readlink "/proc/$p/ns/uts" 2>/dev/null) && [ "$u" != "$my_uts" ] && uts+=("$u")
done
if [ -n "$CTLD$SLURMDS" ]; then
  term_wait_kill $SLURMDS $CTLD
  say "stopped slurmd ($(echo $SLURMDS)) and slurmctld ($(echo $CTLD))"
fi

# 3. leftovers inside our UTS namespaces (only processes started by our slurmds live there)
if [ ${#uts[@]} -gt 0 ]; then
  for sig in TERM KILL; do
    left=()
    for p in /proc/[0-9]*; do
      u=$(readlink "$p/ns/uts" 2>/dev/null) || continue
      for x in "${uts[@]}"; do [ "$u" = "$x" ] && left+=("${p#/proc/}"); done
    done
    [ ${#left[@]} -eq 0 ] && break
    say "SIG$sig to leftover processes in our node namespaces: ${left[*]}"
    kill -$sig "${left[@]}" 2>/dev/null; sleep 1
  done
fi

# 4. munged last, only if we started it and no other slurm daemon (another cluster) still uses it
if alive "$RUN/munged.ours" munged; then
  others=$(pgrep -x 'slurm(ctl)?d' | xargs)
  if [ -n "$others" ]; then
    say "munged (pid $(cat "$RUN/munged.ours")) left running: other slurm daemons use it (pids $others)"
  else
    p=$(cat "$RUN/munged.ours"); term_wait_kill "$p"; say "stopped munged (pid $p)"
  fi
fi
rm -f "$RUN/munged.ours" "$RUN"/*.pid 2>/dev/null

# 5. /etc/hosts: drop our tagged lines, written in place (the file may be a bind mount)
if grep -q "$TAG" /etc/hosts; then
  tmp=$(mktemp) && grep -v "$TAG" /etc/hosts > "$tmp" && cat "$tmp" > /etc/hosts
  rm -f "$tmp"
  say "removed our lines from /etc/hosts"
fi
if [ $PURGE = 1 ] && [ $rc = 0 ] && [ -d "$DIR" ]; then rm -rf "$DIR"; say "purged $DIR"; fi
exit $rc
