#!/usr/bin/env bash
# A throw-away one-node SLURM cluster on loopback, for tests and for trying the sbatch scripts.
#
#   slurm/testing/local_cluster.sh start DIR [CPUS]   install slurm-wlm + munge if missing (apt, root),
#                                                     write DIR/slurm.conf, start munged, slurmctld, slurmd
#   slurm/testing/local_cluster.sh stop DIR           cancel DIR's jobs, stop exactly the daemons started
#                                                     for DIR (their pid files), nothing else
#   export SLURM_CONF=DIR/slurm.conf                  then sbatch/squeue/scontrol talk to this cluster
#
# Everything (state, spool, logs, munge key and socket) lives under DIR; ports are picked free for
# each start, so several clusters (or test runs) never meet. The node declares CPUS (default 16)
# CPUs whatever the machine has (SlurmdParameters=config_overrides), so several jobs run at once.
# Processes are tracked with proctrack/linuxproc and task/none: no cgroups needed (containers, CI).
set -euo pipefail

die() { echo "local_cluster.sh: $*" >&2; exit 2; }

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

install_if_missing() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurm-wlm)
    command -v munged >/dev/null || missing+=(munge)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    [[ $(id -u) -eq 0 ]] || die "${missing[*]} not installed and not root: apt-get install -y slurm-wlm munge"
    echo "local_cluster.sh: installing ${missing[*]} (apt-get)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge >&2
    # Debian starts the packaged services on install where systemd runs; they are not ours and use
    # the default ports, and this cluster does not need them.
}

wait_for() {  # wait_for SECONDS COMMAND...: until COMMAND succeeds; fails after SECONDS
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

start() {
    local dir=$1 cpus=${2:-16}
    [[ $(id -u) -eq 0 ]] || die "must run as root (slurmd starts jobs as their users)"
    install_if_missing
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    [[ -e $dir/slurm.conf ]] && die "$dir/slurm.conf exists: stop that cluster first or use a new DIR"
    mkdir -p "$dir"/{munge,state,spool,log}
    chmod 700 "$dir/munge"
    head -c 1024 /dev/urandom >"$dir/munge/munge.key"
    chmod 400 "$dir/munge/munge.key"
    local ctld_port slurmd_port
    ctld_port=$(free_port)
    slurmd_port=$(free_port)
    while [[ $slurmd_port == "$ctld_port" ]]; do slurmd_port=$(free_port); done
    cat >"$dir/slurm.conf" <<EOF
# written by slurm/testing/local_cluster.sh: a one-node test cluster on loopback
ClusterName=bolttest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.txt
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
DependencyParameters=kill_invalid_depend
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=3600
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=localhost NodeAddr=127.0.0.1 NodeHostname=localhost CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF=$dir/slurm.conf
    # from here on, `stop DIR` finds every daemon through DIR's pid files
    munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"
    if ! slurmctld -f "$SLURM_CONF" -c -i || ! slurmd -f "$SLURM_CONF" -N localhost || ! wait_for 60 idle_node; then
        echo "local_cluster.sh: SLURM did not come up; logs:" >&2
        tail -n 20 "$dir"/log/*.log >&2 || true
        stop "$dir" || true
        die "SLURM did not start (see $dir/log)"
    fi
    echo "$SLURM_CONF"
}

idle_node() {
    local state
    state=$(sinfo -h -N -o %t 2>/dev/null | head -n 1)
    [[ $state == idle* || $state == mix* || $state == alloc* ]]
}

stop_pidfile() {  # stop the daemon whose pid file this is, only if that process still runs
    local file=$1 pid
    [[ -s $file ]] || return 0
    pid=$(<"$file")
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid"
    for _ in $(seq 1 40); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.25
    done
    kill -KILL "$pid" 2>/dev/null || true
}

stop() {
    local dir=$1
    [[ -e $dir/slurm.conf ]] || die "$dir/slurm.conf not found: no cluster there"
    export SLURM_CONF=$dir/slurm.conf
    if [[ -s $dir/slurmctld.pid ]] && kill -0 "$(<"$dir/slurmctld.pid")" 2>/dev/null; then
        # Jobs first, so that slurmstepd and the job processes end before their daemons do.
        scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
        wait_for 30 no_jobs || echo "local_cluster.sh: jobs still listed after scancel" >&2
    fi
    stop_pidfile "$dir/slurmd.pid"
    stop_pidfile "$dir/slurmctld.pid"
    stop_pidfile "$dir/munge/munged.pid"
}

no_jobs() {
    [[ -z $(squeue -h -t PD,R,CG,S,CF -o %i 2>/dev/null) ]]
}

case ${1:-} in
    start) [[ $# -ge 2 ]] || die "usage: $0 start DIR [CPUS]"; start "$2" "${3:-16}" ;;
    stop) [[ $# -eq 2 ]] || die "usage: $0 stop DIR"; stop "$2" ;;
    *) die "usage: $0 start DIR [CPUS] | stop DIR" ;;
esac
