#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the tests and for trying `recontrol slurm submit`.
#
#   scripts/slurm-local.sh start DIR   installs Debian's slurm-wlm and munge when missing, writes
#                                      DIR/slurm.conf, starts munged, slurmctld and slurmd as the
#                                      current user (root in CI) with their state, logs and pid
#                                      files under DIR, waits until the node is idle, and prints
#                                      `export SLURM_CONF=DIR/slurm.conf`
#   scripts/slurm-local.sh stop DIR    stops the three daemons by their pids
#
# The daemons listen on ports 16817/16818 and munge on a socket under DIR, so a cluster the
# machine already runs is left alone.
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action="$1"
dir="$(realpath -m "$2")"

stop() {
    for name in slurmd slurmctld munged; do
        pidfile="$dir/run/$name.pid"
        if [ -f "$pidfile" ]; then
            pid="$(cat "$pidfile")"
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
            rm -f "$pidfile"
        fi
    done
}

case "$action" in
stop)
    stop
    exit 0
    ;;
start) ;;
*) usage ;;
esac

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    echo "slurm-local: installing slurm-wlm and munge" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 || {
        apt-get update -q >/dev/null
        apt-get install -y -q slurm-wlm munge >/dev/null
    }
fi

stop # a previous start in the same folder
mkdir -p "$dir"/{run,state,spool,log,munge}
chmod 700 "$dir/munge"
key="$dir/munge/munge.key"
if [ ! -s "$key" ]; then
    dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
    chmod 400 "$key"
fi
socket="$dir/run/munge.socket"
munged --force --key-file="$key" --socket="$socket" --pid-file="$dir/run/munged.pid" \
    --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"

host="$(hostname -s)"
cat >"$dir/slurm.conf" <<EOF
# Written by scripts/slurm-local.sh: one node, this machine.
ClusterName=recontrol-local
SlurmctldHost=$host
SlurmUser=$(id -un)
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SchedulerParameters=sched_interval=1
MinJobAge=2
NodeName=$host CPUs=$(nproc) State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$dir/slurm.conf"
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 120); do
    state="$(sinfo -h -o %T 2>/dev/null | head -1 || true)"
    if [ "$state" = idle ]; then
        echo "export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.5
done
echo "slurm-local: the node did not come up (state: ${state:-none}); logs in $dir/log" >&2
stop
exit 1
