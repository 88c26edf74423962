#!/usr/bin/env bash
# Start a real single-node SLURM cluster on this machine for the SLURM tests (pytest -m slurm).
#
#   bash tests/slurm/start_slurm.sh          # as root; idempotent: does only what is missing
#   bash tests/slurm/start_slurm.sh --stop   # stop the daemons this script starts (by pid file)
#
# What it does, each step skipped when already done:
#   1. apt-get install slurm-wlm + munge (Debian packages) when slurmctld/slurmd/munged are missing;
#   2. a munge key (mungekey --create) and munged --force running as user munge;
#   3. /etc/slurm/slurm.conf and cgroup.conf for a machine without systemd or usable cgroups:
#      proctrack/linuxproc, task/none, select/cons_tres, cgroup/v1 (never loaded), the node line
#      from `slurmd -C`, SlurmUser=root, JobRequeue=1, no accounting database (use scontrol, not
#      sacct), scheduling every 2 s and requeued jobs startable again after 10 s (cred_expire);
#      daemons already running with an older config are restarted;
#   4. slurmctld, then slurmd, and waits until `sinfo` shows the node idle.
# Logs: /var/log/slurm/slurmctld.log, /var/log/slurm/slurmd.log, /var/log/munge/munged.log.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
WAIT_S="${SLURM_START_TIMEOUT:-90}"

log() { echo "start_slurm: $*"; }

stop_pidfile() {  # stop_pidfile FILE: TERM the process named in FILE and wait for it to go
    local file=$1 pid
    [[ -s $file ]] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
    rm -f "$file"
}

running() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

if [[ ${1:-} == --stop ]]; then
    stop_pidfile "$SLURMD_PID"
    stop_pidfile "$CTLD_PID"
    stop_pidfile "$MUNGE_PID"
    log "stopped"
    exit 0
fi

[[ $(id -u) == 0 ]] || { echo "start_slurm: must run as root" >&2; exit 1; }

# 1. packages -----------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
        || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
    log "installing slurm-wlm and munge"
    t0=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
    log "installed in $((SECONDS - t0)) s"
fi

# the node's name must resolve (MASTER_ADDR is the first node's name from scontrol)
HOST=$(hostname -s)
if ! getent hosts "$HOST" >/dev/null; then
    echo "127.0.0.1 $HOST" >>/etc/hosts
fi

# 2. munge ----------------------------------------------------------------------------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
fi
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
    munge -n | unmunge >/dev/null
fi

# 3. configuration ----------------------------------------------------------------------------------
install -d -m 0755 "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
NODE_LINE=$(slurmd -C | head -n 1)  # NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..
NEW_CONF=$(cat <<EOF
# Written by tests/slurm/start_slurm.sh: a single-node cluster without systemd or cgroups.
ClusterName=aclip
SlurmctldHost=$HOST(127.0.0.1)
AuthType=auth/munge
AuthInfo=cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
MinJobAge=600
KillWait=10
$NODE_LINE NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)
NEW_CGROUP="CgroupPlugin=cgroup/v1"
changed=0
if [[ ! -f $CONF ]] || [[ $(cat "$CONF") != "$NEW_CONF" ]]; then
    printf '%s\n' "$NEW_CONF" >"$CONF"
    changed=1
fi
if [[ ! -f $CONF_DIR/cgroup.conf ]] || [[ $(cat "$CONF_DIR/cgroup.conf") != "$NEW_CGROUP" ]]; then
    printf '%s\n' "$NEW_CGROUP" >"$CONF_DIR/cgroup.conf"
fi
if ((changed)); then
    log "wrote $CONF"
    stop_pidfile "$SLURMD_PID"
    stop_pidfile "$CTLD_PID"
fi

# 4. daemons ----------------------------------------------------------------------------------------
t0=$SECONDS
if ! running "$CTLD_PID"; then
    log "starting slurmctld"
    slurmctld
fi
for _ in $(seq $((WAIT_S * 2))); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.5; done
if ! running "$SLURMD_PID"; then
    log "starting slurmd"
    slurmd
fi

state=""
for _ in $(seq $((WAIT_S * 2))); do
    state=$(sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n 1 || true)
    case $state in
        idle|mixed|allocated|completing) break ;;
        down*|drain*|fail*) scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.5
done
case $state in
    idle|mixed|allocated|completing)
        log "node $HOST is $state ($((SECONDS - t0)) s)"
        sinfo ;;
    *)
        echo "start_slurm: node $HOST did not come up (state '${state:-none}'); see" \
            "/var/log/slurm/slurmctld.log and slurmd.log" >&2
        tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
        exit 1 ;;
esac
