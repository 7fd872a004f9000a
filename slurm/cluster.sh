#!/usr/bin/env bash
# A real single-node SLURM cluster on localhost (munged + slurmctld + slurmd), private to one folder.
#
# For laptops and CI: it lets sbatch, squeue, submitit and the ickd launcher run real jobs, real
# requeues and real partition-priority preemption without a site cluster. It is NOT a production
# set-up: everything runs as root, there is no cgroup confinement and the GPUs are fake.
#
# Usage:
#   slurm/cluster.sh start  [--dir DIR] [--accounting]   start (idempotent); prints the export line
#   slurm/cluster.sh status [--dir DIR]                  sinfo + squeue, or "not running" (exit 1)
#   slurm/cluster.sh env    [--dir DIR]                  print `export SLURM_CONF=DIR/slurm.conf`
#   slurm/cluster.sh stop   [--dir DIR] [--purge]        cancel jobs, stop daemons; --purge deletes DIR
#   DIR defaults to ${ICKD_SLURM_DIR:-/tmp/ickd-slurm}. `start` on a running cluster only prints the
#   export line; a (re)start wipes SLURM's state, so old jobs never come back. `stop` keeps DIR (logs
#   in DIR/log) unless --purge. --accounting adds slurmdbd + a private MariaDB so `sacct` works, when
#   installed (apt-get install slurmdbd mariadb-server); without them it says so and goes on.
#   Tunables (env): ICKD_SLURM_GRACE_TIME (15 s), ICKD_SLURM_CRED_EXPIRE (10 s),
#   ICKD_SLURM_START_TIMEOUT (30 s).
#
# Use it with sbatch/submitit:
#   eval "$(slurm/cluster.sh start)"        # or: export SLURM_CONF=/tmp/ickd-slurm/slurm.conf
#   sbatch --wrap 'hostname'; squeue
#   python -c 'import submitit; ex = submitit.AutoExecutor("logs"); ...'   # finds SLURM via SLURM_CONF
#
# The cluster: one node `localhost` with all CPUs, memory minus a margin and two fake GPUs
# (gres gpu:2 backed by private character devices, so jobs get CUDA_VISIBLE_DEVICES); partition
# `debug` (default) and `urgent` (PriorityTier=10): an urgent job preempts (requeues) debug jobs and
# the preempted job first receives its --signal (e.g. --signal=USR2@90, as submitit asks).
# Everything (config, munge key and socket, state, spool, pid files, logs) lives under DIR, and the
# controller/node ports are picked free at start, so two clusters in two folders can coexist.
# Needs root (slurmd launches jobs as their user) and:
#   apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
set -euo pipefail

APT_CMD="apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
APT_ACCT_CMD="apt-get install -y --no-install-recommends slurmdbd mariadb-server"
START_TIMEOUT=${ICKD_SLURM_START_TIMEOUT:-30}
# Credential lifetime; also the delay before a requeued job may start again (SLURM holds it until
# cred_expire + 1 s have passed), so a small value keeps preemption tests fast.
CRED_EXPIRE=${ICKD_SLURM_CRED_EXPIRE:-10}
MARKER=.ickd-slurm-cluster   # only a folder holding this file is ever deleted by --purge

die() { echo "cluster.sh: $*" >&2; exit 1; }

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit "${1:-2}"
}

CMD=${1:-}
[ -n "$CMD" ] || usage 2
shift
DIR=${ICKD_SLURM_DIR:-/tmp/ickd-slurm}
PURGE=0
ACCOUNTING=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) [ $# -ge 2 ] || die "--dir needs a folder"; DIR=$2; shift 2 ;;
        --dir=*) DIR=${1#--dir=}; shift ;;
        --purge) PURGE=1; shift ;;
        --accounting) ACCOUNTING=1; shift ;;
        -h|--help) usage 0 ;;
        *) die "unknown argument '$1' (see: $0 --help)" ;;
    esac
done
if [ "$CMD" = start ]; then
    mkdir -p "$DIR" 2>/dev/null || die "cannot create folder $DIR"
elif [ ! -d "$DIR" ]; then
    case "$CMD" in
        status) echo "not running ($DIR does not exist)"; exit 1 ;;
        stop) exit 0 ;;
        env) die "no cluster configured in $DIR; run: $0 start --dir $DIR" ;;
    esac
fi
[ ! -d "$DIR" ] || DIR=$(cd "$DIR" && pwd -P)   # absolute: the paths go into slurm.conf
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

# ---------------------------------------------------------------- processes (by pid file only)
# A pid counts as ours only if it is alive and still runs the expected program (pid reuse).
pid_alive() {   # pidfile expected-comm
    local pid
    [ -s "$1" ] || return 1
    pid=$(tr -dc '0-9' <"$1")
    [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
    echo "$pid"
}

stop_pids() {   # pidfile:comm ...: TERM them all at once (each daemon takes ~2 s to exit), wait up to 10 s, then KILL
    local spec pid i left pids=()
    for spec in "$@"; do
        if pid=$(pid_alive "${spec%%:*}" "${spec##*:}"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid:${spec##*:}")
        fi
    done
    for i in $(seq 1 100); do
        left=0
        for spec in "${pids[@]}"; do [ -d "/proc/${spec%%:*}" ] && left=1; done
        [ "$left" = 0 ] && break
        sleep 0.1
    done
    for spec in "${pids[@]}"; do
        pid=${spec%%:*}
        [ -d "/proc/$pid" ] || continue
        echo "cluster.sh: ${spec#*:} (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
    done
    for spec in "$@"; do rm -f "${spec%%:*}"; done
}

MUNGE_PID=$DIR/run/munged.pid
CTLD_PID=$DIR/run/slurmctld.pid
SLURMD_PID=$DIR/run/slurmd.pid
DBD_PID=$DIR/run/slurmdbd.pid
DB_PID=$DIR/run/mariadbd.pid

running() {
    pid_alive "$MUNGE_PID" munged >/dev/null && pid_alive "$CTLD_PID" slurmctld >/dev/null &&
        pid_alive "$SLURMD_PID" slurmd >/dev/null
}

print_env() { echo "export SLURM_CONF=$CONF"; }

logs_tail() {
    local f
    for f in "$DIR"/log/munged.log "$DIR"/log/slurmctld.log "$DIR"/log/slurmd.log "$DIR"/log/*.out \
             "$DIR"/log/slurmdbd.log "$DIR"/log/mariadb.log; do
        [ -s "$f" ] || continue
        echo "----- tail $f" >&2
        tail -n 25 "$f" >&2
    done
}

check_binaries() {
    local b missing=()
    for b in munged mungekey slurmctld slurmd sinfo squeue sbatch scontrol scancel; do
        command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || missing+=("$b")
    done
    [ ${#missing[@]} -eq 0 ] || die "SLURM/munge programs not found: ${missing[*]}.
Install them (Debian/Ubuntu, as root):
  $APT_CMD"
    [ "$(id -u)" = 0 ] || die "must run as root (slurmd launches jobs as their user); try: sudo $0 start"
}
PATH=$PATH:/usr/sbin:/sbin

# ---------------------------------------------------------------- stop
cancel_jobs() {
    # Stopping slurmd leaves running jobs (slurmstepd) behind, so cancel through SLURM first and
    # wait for the node to finish them (KillWait + a margin).
    pid_alive "$CTLD_PID" slurmctld >/dev/null || return 0
    local ids i
    ids=$(timeout 10 squeue -h -o %i 2>/dev/null | tr '\n' ' ') || return 0
    [ -n "${ids// /}" ] || return 0
    # shellcheck disable=SC2086
    timeout 10 scancel $ids 2>/dev/null || true
    for i in $(seq 1 200); do
        [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null | head -1)" ] && return 0
        # A completing job needs slurmd; once squeue empties or times out we go on.
        sleep 0.1
    done
    echo "cluster.sh: jobs still listed 20 s after scancel; stopping anyway" >&2
}

do_stop() {
    cancel_jobs
    # SLURM daemons first: they talk to slurmdbd and munged while shutting down.
    stop_pids "$SLURMD_PID:slurmd" "$CTLD_PID:slurmctld"
    stop_pids "$DBD_PID:slurmdbd"
    stop_pids "$DB_PID:mariadbd" "$MUNGE_PID:munged"
}

# ---------------------------------------------------------------- start
free_ports() {  # N -> N distinct free TCP ports on 127.0.0.1, one per line
    if command -v python3 >/dev/null 2>&1 && python3 -c 'import socket' 2>/dev/null; then
        python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
for s in socks:
    print(s.getsockname()[1])
EOF
    else
        # Deterministic offset from the folder's name, skipping ports in use.
        local p n=0
        p=$(( 20000 + $(printf '%s' "$DIR" | cksum | cut -d' ' -f1) % 20000 ))
        while [ "$n" -lt "$1" ]; do
            if ! ss -Hltn "sport = :$p" 2>/dev/null | grep -q .; then echo "$p"; n=$((n + 1)); fi
            p=$((p + 1))
        done
    fi
}

write_atomic() {  # path (content on stdin)
    cat >"$1.tmp.$$" && mv -f "$1.tmp.$$" "$1"
}

write_conf() {
    local ctld_port=$1 slurmd_port=$2 dbd_port=${3:-}
    local cpus mem_mb topo hw
    # The node's CPUs and topology as slurmd itself detects them (a configured count above that, or a
    # different socket/core/thread split, drains the node); `nproc` alone would honour OMP_NUM_THREADS.
    hw=$(slurmd -C 2>/dev/null | head -1)
    cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
    if [ -n "$cpus" ]; then
        topo="CPUs=$cpus $(grep -o 'Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*' <<<"$hw" || true)"
    else
        cpus=$(OMP_NUM_THREADS='' OMP_THREAD_LIMIT='' nproc)
        topo="CPUs=$cpus"
    fi
    # Leave 10% (at least 512 MB) for the OS: slurmd drains a node whose RealMemory exceeds the real one.
    mem_mb=$(awk '/^MemTotal:/ {m=int($2/1024); r=int(m/10); if (r<512) r=512; print (m>r ? m-r : m)}' /proc/meminfo)
    local acct="AccountingStorageType=accounting_storage/none"
    if [ -n "$dbd_port" ]; then
        acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$dbd_port
# The munge socket for talking to slurmdbd (AuthInfo's socket is not used for that connection).
AccountingStoragePass=$DIR/munge/munge.socket
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
    fi
    write_atomic "$CONF" <<EOF
# Generated by slurm/cluster.sh: a private single-node cluster under $DIR (not for production).
ClusterName=ickdlocal
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=$CRED_EXPIRE
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$DIR/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
# Fast test turn-around: schedule often, forget finished jobs after a minute, kill 10 s after SIGTERM
# (time to checkpoint on SIGTERM). A preempted job is requeued GraceTime (debug partition) after its
# signal, or KillWait + MessageTimeout after the preemption started, whichever is later.
SchedulerParameters=bf_interval=2,sched_interval=2
MinJobAge=60
KillWait=10
MessageTimeout=10
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
# Partition-priority preemption: urgent jobs requeue debug jobs; the preempted job first gets its
# --signal (submitit: USR2) so it can checkpoint.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
$acct
JobCompType=jobcomp/none
MailProg=/bin/true
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 $topo RealMemory=$mem_mb Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES PriorityTier=1 MaxTime=INFINITE OverSubscribe=NO GraceTime=$GRACE_TIME State=UP
PartitionName=urgent Nodes=localhost Default=NO PriorityTier=10 MaxTime=INFINITE OverSubscribe=NO State=UP
EOF
    write_atomic "$DIR/gres.conf" <<EOF
# Two fake GPUs: distinct character devices (a Count-only line would drain the node).
AutoDetect=off
NodeName=localhost Name=gpu File=$DIR/dev/gpu0
NodeName=localhost Name=gpu File=$DIR/dev/gpu1
EOF
    # An empty private plugstack, so a site /etc/slurm/plugstack.conf never leaks in.
    : | write_atomic "$DIR/plugstack.conf"
}
# GraceTime of the debug partition: seconds between the preemption signal (the job's --signal, e.g.
# submitit's USR2) and SIGTERM + requeue; the job checkpoints meanwhile (submitit also requeues itself
# then, which frees the node at once). Without it signal and SIGTERM arrive within a millisecond.
# It costs no extra wall time up to KillWait + MessageTimeout (20 s): slurmctld waits that long after
# a preemption before it kills again, and checks expired grace times only at such passes.
GRACE_TIME=${ICKD_SLURM_GRACE_TIME:-15}

start_munge() {
    mkdir -p "$DIR/munge"
    chmod 755 "$DIR/munge"   # clients (any user's sbatch) must reach the socket; the key stays 0400
    if [ ! -s "$DIR/munge/munge.key" ]; then
        mungekey -c -k "$DIR/munge/munge.key" 2>/dev/null ||
            dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    fi
    chmod 400 "$DIR/munge/munge.key"
    rm -f "$DIR/munge/munge.socket" "$DIR/munge/munge.socket.lock"
    # --force: munged refuses to run as root without it; root is what this cluster runs as.
    munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$MUNGE_PID" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" \
        </dev/null >>"$DIR/log/munged.out" 2>&1 || { logs_tail; die "munged failed to start"; }
    local i
    for i in $(seq 1 50); do
        munge -n -S "$DIR/munge/munge.socket" </dev/null 2>/dev/null | unmunge -S "$DIR/munge/munge.socket" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    logs_tail
    die "munged did not answer on $DIR/munge/munge.socket"
}

start_accounting() {  # -> prints the slurmdbd port, or nothing when accounting is unavailable
    local mariadbd dbport dbdport i
    mariadbd=$(command -v mariadbd || command -v mysqld || true)
    if ! command -v slurmdbd >/dev/null 2>&1 || [ -z "$mariadbd" ] || ! command -v mariadb-install-db >/dev/null 2>&1; then
        echo "cluster.sh: --accounting: slurmdbd/mariadb not installed; continuing without sacct. Install with:" >&2
        echo "  $APT_ACCT_CMD" >&2
        return 0
    fi
    local ports
    ports=$(free_ports 2)
    dbport=$(sed -n 1p <<<"$ports"); dbdport=$(sed -n 2p <<<"$ports")
    mkdir -p "$DIR/db"
    rm -rf "$DIR/db/data"
    mariadb-install-db --no-defaults --user=root --datadir="$DIR/db/data" --auth-root-authentication-method=normal \
        >"$DIR/log/mariadb-install.log" 2>&1 || { tail -20 "$DIR/log/mariadb-install.log" >&2; echo "cluster.sh: mariadb-install-db failed; continuing without accounting" >&2; return 0; }
    "$mariadbd" --no-defaults --user=root --datadir="$DIR/db/data" --socket="$DIR/db/mysql.sock" \
        --port="$dbport" --bind-address=127.0.0.1 --pid-file="$DB_PID" --log-error="$DIR/log/mariadb.log" \
        --skip-log-bin --innodb-buffer-pool-size=64M --innodb-flush-log-at-trx-commit=0 \
        </dev/null >>"$DIR/log/mariadb.out" 2>&1 &
    for i in $(seq 1 100); do
        mariadb --no-defaults -S "$DIR/db/mysql.sock" -uroot -e 'select 1' >/dev/null 2>&1 && break
        sleep 0.2
    done
    mariadb --no-defaults -S "$DIR/db/mysql.sock" -uroot -e 'create database if not exists slurm_acct_db' \
        || { echo "cluster.sh: mariadb did not start (see $DIR/log/mariadb.log); continuing without accounting" >&2
             stop_pids "$DB_PID:mariadbd"; return 0; }
    write_atomic "$DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$dbdport
SlurmUser=root
PidFile=$DBD_PID
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StorageLoc=slurm_acct_db
StorageUser=root
StoragePort=$dbport
EOF
    chmod 600 "$DIR/slurmdbd.conf"
    # slurmdbd reaches MySQL by host/port; a root@localhost TCP login with no password works on a
    # fresh private datadir (unix_socket auth is for the socket only), so grant it explicitly.
    mariadb --no-defaults -S "$DIR/db/mysql.sock" -uroot -e \
        "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1'; GRANT ALL ON *.* TO 'root'@'127.0.0.1'; FLUSH PRIVILEGES;" >/dev/null 2>&1 || true
    # slurmdbd has no -f: it reads slurmdbd.conf beside $SLURM_CONF.
    SLURM_CONF=$CONF slurmdbd </dev/null >>"$DIR/log/slurmdbd.out" 2>&1 ||
        { echo "cluster.sh: slurmdbd failed (see $DIR/log/slurmdbd.out); continuing without accounting" >&2
          stop_pids "$DB_PID:mariadbd"; return 0; }
    for i in $(seq 1 50); do
        (exec 3<>"/dev/tcp/127.0.0.1/$dbdport") 2>/dev/null && { echo "$dbdport"; return 0; }
        sleep 0.2
    done
    echo "cluster.sh: slurmdbd did not listen on $dbdport (see $DIR/log/slurmdbd.log); continuing without accounting" >&2
    stop_pids "$DBD_PID:slurmdbd" "$DB_PID:mariadbd"
}

do_start() {
    check_binaries
    if running; then
        print_env
        return 0
    fi
    # Half-running (a daemon died): start from scratch.
    do_stop >/dev/null 2>&1 || true
    local t0 ctld_port slurmd_port dbd_port="" i state
    t0=$(date +%s.%N)
    # Unix sockets (munge, slurmstepd's in the spool) allow 107-byte paths.
    [ ${#DIR} -le 80 ] || die "folder path too long for unix sockets (${#DIR} > 80 chars): $DIR; use a shorter --dir"
    # Any failure below leaves no half-started daemons behind (the logs stay).
    trap 'do_stop >/dev/null 2>&1' EXIT
    touch "$DIR/$MARKER"
    mkdir -p "$DIR/run" "$DIR/log" "$DIR/dev"
    # A restarted cluster starts clean: no old jobs from the state save location or the spool.
    rm -rf "$DIR/state" "$DIR/spool"
    mkdir -p "$DIR/state" "$DIR/spool"
    for i in 0 1; do
        [ -c "$DIR/dev/gpu$i" ] || { rm -f "$DIR/dev/gpu$i"; mknod "$DIR/dev/gpu$i" c 1 3; }
    done
    start_munge
    if [ "$ACCOUNTING" = 1 ]; then
        dbd_port=$(start_accounting)
    fi
    local ports
    ports=$(free_ports 2) || die "could not pick free ports"
    ctld_port=$(sed -n 1p <<<"$ports"); slurmd_port=$(sed -n 2p <<<"$ports")
    [ -n "$ctld_port" ] && [ -n "$slurmd_port" ] || die "could not pick free ports"
    write_conf "$ctld_port" "$slurmd_port" "$dbd_port"
    slurmctld -f "$CONF" -i </dev/null >>"$DIR/log/slurmctld.out" 2>&1 || { logs_tail; die "slurmctld failed to start"; }
    slurmd -f "$CONF" -N localhost </dev/null >>"$DIR/log/slurmd.out" 2>&1 || { logs_tail; die "slurmd failed to start"; }
    local deadline=$(( $(date +%s) + START_TIMEOUT ))
    while :; do
        state=$(timeout 5 sinfo -h -N -n localhost -o %t 2>/dev/null | head -1 || true)
        [ "$state" = idle ] && break
        if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "cluster.sh: node not idle after ${START_TIMEOUT} s (state: '${state:-no answer}'); logs:" >&2
            logs_tail
            timeout 5 scontrol show node localhost >&2 2>/dev/null || true
            exit 1   # the EXIT trap stops the daemons
        fi
        sleep 0.2
    done
    trap - EXIT
    echo "cluster.sh: cluster ickdlocal up in $DIR in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b-a}') s (slurmctld port $ctld_port, slurmd port $slurmd_port)" >&2
    print_env
}

case "$CMD" in
    start)
        do_start ;;
    stop)
        do_stop
        if [ "$PURGE" = 1 ]; then
            if [ -e "$DIR/$MARKER" ]; then rm -rf "$DIR"
            else echo "cluster.sh: $DIR has no $MARKER file; not deleting it" >&2; fi
        fi ;;
    status)
        if ! running; then echo "not running ($DIR)"; exit 1; fi
        print_env
        sinfo
        squeue ;;
    env)
        [ -f "$CONF" ] || die "no cluster configured in $DIR; run: $0 start --dir $DIR"
        print_env ;;
    -h|--help|help) usage 0 ;;
    *) die "unknown command '$CMD' (start|stop|status|env)" ;;
esac
