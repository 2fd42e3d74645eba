#!/usr/bin/env bash
# Idempotent TWO-node SLURM test cluster on ONE machine (Debian 12, slurm 22.05, no systemd, loopback only).
#   slurm/local/start_2node.sh [--clean]     --clean wipes controller state, logs and job history first
#
# One slurmctld (127.0.0.1:17010) and two slurmd, n1 (127.0.0.11, port 17011) and n2 (127.0.0.12,
# port 17012): Debian's slurm is built with MULTIPLE_SLURMD, so "slurmd -N n1" and "slurmd -N n2" run
# side by side, each in its own UTS namespace (unshare --uts) so that `hostname` inside a job prints
# n1 / n2 and gloo/NCCL resolve each rank's host to its own address. /etc/hosts gets "127.0.0.11 n1"
# and "127.0.0.12 n2" (tagged "# lkm-slurm-2node"; slurm/local/stop_2node.sh removes them).
#
# It coexists with the single-node cluster of slurm/local/start.sh (/etc/slurm/slurm.conf, ports
# 6817/6818): this one's config is $LKM_SLURM2_DIR/etc/slurm.conf, named by SLURM_CONF, other ports,
# its own state, and job ids from 20000 on (the sbatch scripts derive MASTER_PORT from the job id, so
# jobs of the two clusters do not pick the same rendezvous port). munged is shared. Clients need
#     source $LKM_SLURM2_DIR/env.sh        # SLURM_CONF=...; sbatch passes it on to the jobs
# Our daemons are recognised by SLURM_CONF=<our config> in their environment, not by pid files.
#
# CPU binding as on the single-node cluster (slurm/local/common.sh), where cgroup v1 is usable: each node is the
# whole machine with all CPUs but its own share reserved (CpuSpecList), so n1's tasks are bound to the first half
# of the CPUs and n2's to the second. Without cgroups (or with one CPU) the nodes cannot be kept apart: every slurmd
# would bind its tasks to the machine's first CPUs, both nodes' on the same ones; then tasks are not bound.
#
# Env: LKM_SLURM2_DIR (default /tmp/lkm-slurm-2node)   etc/ state/ log/ run/ bin/ live here
#      LKM_SLURM2_CTLD_PORT (17010), LKM_SLURM2_SLURMD_PORT (17011; n2 gets +1), LKM_SLURM2_WAIT_S (60)
#      LKM_SLURM_BINDING (default: cgroup where usable, else none)   as slurm/local/start.sh
set -euo pipefail

DIR=${LKM_SLURM2_DIR:-/tmp/lkm-slurm-2node}
CTLD_PORT=${LKM_SLURM2_CTLD_PORT:-17010}
D_PORT=${LKM_SLURM2_SLURMD_PORT:-17011}
WAIT_S=${LKM_SLURM2_WAIT_S:-60}
NODES=(n1 n2)
ADDRS=(127.0.0.11 127.0.0.12)
TAG="# lkm-slurm-2node"
ETC=$DIR/etc RUN=$DIR/run LOG=$DIR/log STATE=$DIR/state BIN=$DIR/bin
CONF=$ETC/slurm.conf
CGROUP_CONF=$ETC/cgroup.conf
MUNGE_PID=/run/munge/munged.pid
CLEAN=0
[ "${1:-}" = "--clean" ] && CLEAN=1
export SLURM_CONF=$CONF

T0=$(date +%s%N)
say() { echo "[slurm-2node +$(( ($(date +%s%N) - T0) / 1000000 ))ms] $*" 2>/dev/null || true; }
die() { echo "slurm/local/start_2node.sh: ERROR: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"
for b in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/sbin/munged /usr/bin/unshare; do
  [ -x $b ] || die "$b missing (make system-packages, or slurm/local/start.sh, installs slurmctld slurmd slurm-client munge)"
done
trap '' PIPE   # a closed stdout (e.g. `| head`) must not kill us between starting and waiting

# alive, wait_for, choose_binding, cgroup_conf, common_slurm_conf
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# ours_pids COMM [ARG]: live processes named COMM started with SLURM_CONF=$CONF (and ARG in their command line)
ours_pids() {
  local p c e a
  for p in /proc/[0-9]*; do
    read -r c 2>/dev/null < "$p/comm" || continue; [ "$c" = "$1" ] || continue
    e=$(tr '\0' '\n' 2>/dev/null < "$p/environ") || continue
    [[ $'\n'$e$'\n' == *$'\n'"SLURM_CONF=$CONF"$'\n'* ]] || continue
    a=$(tr '\0' ' ' 2>/dev/null < "$p/cmdline") || continue
    [[ $a == *"${2:-}"* ]] || continue
    echo "${p#/proc/}"
  done
}
# stop_slurm_daemons: TERM our slurmd + slurmctld, wait up to 10 s, then KILL
stop_slurm_daemons() {
  local pids p; pids=$(ours_pids slurmd; ours_pids slurmctld)
  [ -n "$pids" ] || return 0
  kill -TERM $pids 2>/dev/null
  for p in $pids; do wait_for 10 bash -c "[ ! -d /proc/$p ]" || kill -KILL "$p" 2>/dev/null; done
}

mkdir -p "$ETC" "$RUN" "$LOG" "$BIN"
if [ $CLEAN = 1 ]; then
  say "--clean: stopping our daemons, wiping state and logs"; stop_slurm_daemons
  rm -rf "$STATE" "$LOG"/*
fi
mkdir -p "$STATE/ctld"; for n in "${NODES[@]}"; do mkdir -p "$STATE/d-$n"; done

# ---- 1. /etc/hosts (in place: the file may be a bind mount) -----------------------------------
H=$(hostname -s)
for i in "${!NODES[@]}"; do
  grep -q "^${ADDRS[$i]} ${NODES[$i]} $TAG\$" /etc/hosts || echo "${ADDRS[$i]} ${NODES[$i]} $TAG" >> /etc/hosts
done
getent hosts "$H" >/dev/null || echo "127.0.0.1 $H" >> /etc/hosts   # as slurm/local/start.sh: kept

# ---- 2. configuration -------------------------------------------------------------------------
HW=$(slurmd -C); HW=${HW%%$'\n'*}   # NodeName=<host> CPUs=.. Boards=.. SocketsPerBoard=.. CoresPerSocket=.. ThreadsPerCore=.. RealMemory=..
read -r HW_CPUS HW_MEM < <(sed -n 's/.*CPUs=\([0-9]*\).*RealMemory=\([0-9]*\).*/\1 \2/p' <<< "$HW")
HW_TOPOLOGY=$(grep -o 'CPUs=.* ThreadsPerCore=[0-9]*' <<< "$HW")
CPN=$(( HW_CPUS / ${#NODES[@]} ))
MPN=$(( HW_MEM / ${#NODES[@]} ))
choose_binding || die "bad LKM_SLURM_BINDING"
if [ "$BINDING" != cgroup ] || [ $CPN -lt 1 ]; then BINDING=none; fi   # see the header
[ $CPN -ge 1 ] || CPN=1
# node_cpus I: the node's CPUs (CpuSpecList reserves all others: abstract CPU ids, SLURM widens them to whole cores)
node_cpus() {
  if [ "$BINDING" = cgroup ]; then
    local c spec=()
    for ((c = 0; c < HW_CPUS; c++)); do [ $((c / CPN)) = "$1" ] || spec+=("$c"); done
    echo "$HW_TOPOLOGY CpuSpecList=$(IFS=,; echo "${spec[*]}")"
  else
    echo "CPUs=$CPN Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPN ThreadsPerCore=1"
  fi
}
{
cat <<EOF
# Two-node test cluster on one machine, generated by slurm/local/start_2node.sh -- do not edit
ClusterName=lkm2node
SlurmctldHost=${H}(127.0.0.1)
# slurmctld binds 127.0.0.1 only. NOT NoInAddrAny (as the single-node cluster has): with it srun binds
# the address its node name resolves to (n1 -> 127.0.0.11) while slurmd answers from the address the
# request came from, and every srun inside a 2-node batch job hangs. All traffic stays on loopback.
CommunicationParameters=NoCtldInAddrAny
SlurmctldPort=$CTLD_PORT
SlurmdPort=$D_PORT
# job ids of this cluster start at 20000: MASTER_PORT = 20000 + id % 40000 then differs from the
# single-node cluster's jobs (ids from 1) for the first 20000 jobs of each
FirstJobId=20000
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
EOF
common_slurm_conf "$LOG"
for i in "${!NODES[@]}"; do
  echo "NodeName=${NODES[$i]} NodeAddr=${ADDRS[$i]} NodeHostname=${NODES[$i]} Port=$((D_PORT + i)) $(node_cpus "$i") RealMemory=$MPN State=UNKNOWN"
done
echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
} > "$CONF.new"
CHANGED=0
if ! cmp -s "$CONF.new" "$CONF"; then mv "$CONF.new" "$CONF"; CHANGED=1; say "wrote $CONF"; else rm -f "$CONF.new"; fi
if [ "$BINDING" = cgroup ]; then
  cgroup_conf > "$CGROUP_CONF.new"
  if ! cmp -s "$CGROUP_CONF.new" "$CGROUP_CONF"; then mv "$CGROUP_CONF.new" "$CGROUP_CONF"; CHANGED=1; say "wrote $CGROUP_CONF"; else rm -f "$CGROUP_CONF.new"; fi
fi
say "task binding: $BINDING ($(grep '^TaskPlugin=' "$CONF"))"
printf 'export SLURM_CONF=%s\ncase ":$PATH:" in *":%s:"*) ;; *) export PATH=%s:$PATH ;; esac\n' "$CONF" "$BIN" "$BIN" > "$DIR/env.sh"

# sacct shim: no slurmdbd here (slurm/local/common.sh says why it matters)
write_sacct_shim "$BIN/sacct"

# ---- 3. munge (shared with the single-node cluster) --------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
  (umask 077; dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none)
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
fi
if alive $MUNGE_PID munged; then
  say "munged already running (pid $(cat $MUNGE_PID))"
else
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  wait_for 10 alive $MUNGE_PID munged || die "munged did not start; see /var/log/munge/munged.log"
  cp $MUNGE_PID "$RUN/munged.ours"
  say "started munged (pid $(cat $MUNGE_PID))"
fi
munge -n | unmunge >/dev/null || die "munge credential round trip failed"

# ---- 4. daemons --------------------------------------------------------------------------------
if [ $CHANGED = 1 ] && [ -n "$(ours_pids slurmd; ours_pids slurmctld)" ]; then
  say "config changed: restarting our slurm daemons"; stop_slurm_daemons
fi
if [ -n "$(ours_pids slurmctld)" ]; then
  say "slurmctld already running (pid $(ours_pids slurmctld | xargs))"
else
  rm -f "$RUN/slurmctld.pid"
  /usr/sbin/slurmctld || die "slurmctld failed to start; see $LOG/slurmctld.log"
  wait_for 15 alive "$RUN/slurmctld.pid" slurmctld || { tail -20 "$LOG/slurmctld.log" >&2; die "slurmctld did not come up"; }
  say "started slurmctld (pid $(cat "$RUN/slurmctld.pid"))"
fi
wait_for 20 scontrol ping || { tail -20 "$LOG/slurmctld.log" >&2; die "slurmctld not answering"; }
started=()
for n in "${NODES[@]}"; do
  if [ -n "$(ours_pids slurmd "-N $n")" ]; then say "slurmd $n already running (pid $(ours_pids slurmd "-N $n" | xargs))"; continue; fi
  rm -f "$RUN/slurmd-$n.pid"
  # own UTS namespace: jobs on this "node" see hostname $n
  unshare --uts /bin/sh -c "hostname $n && exec /usr/sbin/slurmd -N $n" || die "slurmd $n failed; see $LOG/slurmd-$n.log"
  started+=("$n")
done
for n in "${started[@]}"; do
  wait_for 15 alive "$RUN/slurmd-$n.pid" slurmd || { tail -20 "$LOG/slurmd-$n.log" >&2; die "slurmd $n did not come up"; }
  say "started slurmd $n (pid $(cat "$RUN/slurmd-$n.pid"))"
done

# ---- 5. wait until both nodes are idle ---------------------------------------------------------
deadline=$(( $(date +%s) + WAIT_S )); declare -A resumed=()
while :; do
  ok=1
  for n in "${NODES[@]}"; do
    st=$(sinfo -h -n "$n" -o %T 2>/dev/null || true)
    case "$st" in
      idle|mixed|allocated|completing) ;;
      down*|drain*|fail*) ok=0
        if [ -z "${resumed[$n]:-}" ]; then scontrol update NodeName="$n" State=RESUME 2>/dev/null || true; resumed[$n]=1; fi ;;
      *) ok=0 ;;
    esac
  done
  [ $ok = 1 ] && break
  [ "$(date +%s)" -lt $deadline ] || { sinfo >&2; for n in "${NODES[@]}"; do tail -5 "$LOG/slurmd-$n.log" >&2; done; die "nodes not ready"; }
  sleep 0.2
done
say "nodes ${NODES[*]} ready; clients: source $DIR/env.sh"
sinfo || true
