# Sourced by slurm/local/start*.sh and stop*.sh: what the single-node and the 2-node test clusters share.
# Each script keeps its own nodes, addresses, ports and paths.

# alive PIDFILE NAME: the pid in PIDFILE is a live process whose comm is NAME
alive() { local p; [ -s "$1" ] && p=$(cat "$1") && [ -r "/proc/$p/comm" ] && [ "$(cat "/proc/$p/comm")" = "$2" ]; }
# wait_for SECONDS CMD...: retry CMD every 0.1 s
wait_for() { local n=$(( $1 * 10 )); shift; while ! "$@" >/dev/null 2>&1; do n=$((n - 1)); [ $n -gt 0 ] || return 1; sleep 0.1; done; }

# common_slurm_conf LOGDIR: the slurm.conf lines both clusters share (users, auth, plugins, scheduling,
# requeue, timeouts, job completion log), tuned for tests: jobs start and requeue within seconds.
common_slurm_conf() {
cat <<CONF
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# requeued jobs wait cred_expire seconds before they may start again (default 120)
AuthInfo=cred_expire=10
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# no slurmdbd: plain sacct fails; 'sacct -c' reads this job completion log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$1/jobcomp.txt
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# reject impossible requests instead of leaving them pending forever
EnforcePartLimits=ALL
ReturnToService=2
JobRequeue=1
# keep finished jobs visible to squeue (the sacct shim) for an hour
MinJobAge=3600
KillWait=5
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
CONF
}

# write_sacct_shim PATH: an sacct for a test cluster without slurmdbd. submitit polls
# `sacct -o JobID,State,NodeList --parsable2 -j ID`; without an answer, a job that dies before writing its
# result pickle makes job.result() wait forever. Finished jobs come from the jobcomp log (`sacct -c`), then
# live and recent ones from squeue (later lines win in submitit's parser).
write_sacct_shim() {
cat > "$1" <<'SHIM'
#!/bin/bash
# sacct for a test Slurm without slurmdbd (written by slurm/local/common.sh): finished jobs from the jobcomp
# log (`sacct -c`), then live/recent jobs from squeue (later lines win in submitit's parser).
REAL=/usr/bin/sacct
args=("$@"); ids=(); fields=""
while [ $# -gt 0 ]; do
  case "$1" in
    -j|--jobs) ids+=("$2"); shift 2 ;;
    --jobs=*) ids+=("${1#--jobs=}"); shift ;;
    -j*) ids+=("${1#-j}"); shift ;;
    -o|--format) fields="$2"; shift 2 ;;
    --format=*) fields="${1#--format=}"; shift ;;
    *) shift ;;
  esac
done
"$REAL" -c "${args[@]}" || exit $?
if [ ${#ids[@]} -gt 0 ] && [ "${fields,,}" = "jobid,state,nodelist" ]; then
  IFS=, ; joblist="${ids[*]}"; unset IFS
  squeue -h -t all -j "$joblist" -o '%i|%T|%N' 2>/dev/null
fi
exit 0
SHIM
chmod 755 "$1"
}
