#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for lmstack's Slurm tests and `.ci/run`.
#
#   .ci/slurm_cluster.sh start    # install slurm-wlm + munge if missing, start munged, slurmctld, slurmd
#   .ci/slurm_cluster.sh status   # sinfo, and the daemons' pids
#   .ci/slurm_cluster.sh stop     # stop the three daemons this script started
#
# Debian's slurm-wlm and munge, root-run daemons, one node with the machine's real CPUs and
# memory in a default partition `debug`, no cgroups (proctrack/linuxproc, task/none) and no
# accounting database, so it starts in seconds inside a container. `start` is idempotent.
# It writes /etc/slurm/slurm.conf; an existing one that this script did not write is left alone.
set -euo pipefail

PARTITION=${LMSTACK_SLURM_PARTITION:-debug}
CONF=/etc/slurm/slurm.conf
MARKER="# written by lmstack .ci/slurm_cluster.sh"
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm
RUN=/run/slurm

log() { echo "slurm_cluster: $*" >&2; }

need_root() {
    [[ $(id -u) == 0 ]] || { log "must run as root (it installs packages and starts daemons)"; exit 1; }
}

install_packages() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return
    log "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_config() {
    if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        log "$CONF exists and was not written by this script; using it as it is"
        return
    fi
    local node hardware wanted cpus memory
    node=$(hostname -s)
    wanted=$(mktemp)
    # the node's real CPUs, sockets, cores and memory, as slurmd itself detects them
    hardware=$(slurmd -C | head -1 | sed 's/^NodeName=[^ ]* //; s/ UpTime=.*//')
    cpus=$(sed -n 's/^CPUs=\([0-9]*\).*/\1/p' <<<"$hardware")
    memory=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$hardware")
    cat >"$wanted" <<EOF
$MARKER
ClusterName=lmstack
SlurmctldHost=$node
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job waits cred_expire seconds before it may start again (default 120)
AuthInfo=cred_expire=5
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
# no cgroups inside a container: track processes through /proc, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# schedule every second (defaults: 60 s, backfill 30 s), so tests do not wait for the scheduler
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# a job that asks no memory gets its CPUs' share, not the whole node (Slurm's default)
DefMemPerCPU=$((memory / cpus))
ReturnToService=2
JobRequeue=1
# seconds between SIGTERM and SIGKILL when a job is cancelled, requeued or times out
KillWait=10
# finished jobs stay visible to squeue/scontrol for 10 min (no accounting database to ask)
MinJobAge=600
SlurmdTimeout=60
InactiveLimit=0
NodeName=$node $hardware State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    if cmp -s "$wanted" "$CONF"; then rm -f "$wanted"; return; fi
    mkdir -p "$(dirname "$CONF")"
    mv "$wanted" "$CONF"
    chmod 0644 "$CONF"
    log "wrote $CONF"
    # daemons already up restart below with the new file
    stop_daemon slurmd "$RUN/slurmd.pid"
    stop_daemon slurmctld "$RUN/slurmctld.pid"
}

running() { [[ -f $1 ]] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

start_munge() {
    if running /run/munge/munged.pid; then return; fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
}

start_slurm() {
    mkdir -p "$STATE" "$SPOOL" "$LOGS" "$RUN"
    running "$RUN/slurmctld.pid" || slurmctld
    running "$RUN/slurmd.pid" || slurmd
}

wait_for_node() {
    local node
    node=$(hostname -s)
    for _ in $(seq 1 60); do
        state=$(sinfo -h -n "$node" -o %T 2>/dev/null | head -1 || true)
        case $state in
            idle* | mixed* | allocated*) log "node $node is $state"; return ;;
            down* | drain*) scontrol update NodeName="$node" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    log "node $node did not come up (state '${state:-none}'); see $LOGS/"
    exit 1
}

stop_daemon() {
    local name=$1 pidfile=$2
    if running "$pidfile"; then
        kill "$(cat "$pidfile")" 2>/dev/null || true
        for _ in $(seq 1 50); do running "$pidfile" || break; sleep 0.1; done
        log "stopped $name"
    fi
}

case ${1:-} in
    start)
        need_root
        install_packages
        write_config
        start_munge
        start_slurm
        wait_for_node
        ;;
    stop)
        need_root
        stop_daemon slurmd "$RUN/slurmd.pid"
        stop_daemon slurmctld "$RUN/slurmctld.pid"
        stop_daemon munged /run/munge/munged.pid
        ;;
    status)
        for pidfile in /run/munge/munged.pid "$RUN/slurmctld.pid" "$RUN/slurmd.pid"; do
            if running "$pidfile"; then echo "$(basename "$pidfile" .pid): pid $(cat "$pidfile")"
            else echo "$(basename "$pidfile" .pid): not running"; fi
        done
        sinfo 2>/dev/null || { echo "sinfo: no answer from slurmctld"; exit 1; }
        ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 2
        ;;
esac
