#!/usr/bin/env bash
# A real Slurm cluster on this machine (one node, or several slurmd "nodes" on this host),
# for trying the Slurm path and for tests.
#
# Usage: scripts/local-slurm.sh start|restart|stop|status|env
#
#   start   start munged, MariaDB, slurmdbd, slurmctld and slurmd (idempotent: a running
#           cluster is left as it is, whatever its settings), then print the line to paste:
#           export SLURM_CONF=...
#   restart stop (cancelling every job) and start with the settings below
#   stop    cancel every job of this cluster and stop every daemon this script started
#   status  show the daemons and `sinfo`
#   env     print the export line only
#
# Everything lives under one folder (config, state, spool, logs, database, sockets):
#   HPCTRAIN_SLURM_DIR    default /tmp/hpctrain-slurm
#   HPCTRAIN_SLURM_PORT   first of four ports (slurmctld, slurmd, slurmdbd, MariaDB); default 16817,
#                         away from Slurm's 6817-6819 and MariaDB's 3306 so a site cluster is untouched
#   HPCTRAIN_SLURM_CPUS   CPUs the node declares; default 16 whatever the machine has. Declaring
#                         more CPUs than exist (SlurmdParameters=config_overrides) lets a few job
#                         array elements of 2 tasks each run side by side on a 2-core laptop or CI
#                         runner; the tasks then share the real cores. Use `nproc` for honest limits.
#   HPCTRAIN_SLURM_MAX_ARRAY  the cluster's MaxArraySize; default 100001 (Slurm's own default is 1001)
#   HPCTRAIN_SLURM_ACCOUNTING slurmdbd (default: MariaDB + slurmdbd, sacct works) or none
#                         (AccountingStorageType=accounting_storage/none, as on sites without sacct)
#   HPCTRAIN_SLURM_NODES  slurmd daemons on this host, one per node; default 1 (node "localhost").
#                         With 2 or more, nodes node1..nodeN listen on ports PORT+10.. and each has
#                         its own spool, log, pid file and TmpFS (PMIx makes its client folders
#                         there; a shared one makes the second node's step fail with EEXIST).
#
# Missing Debian packages (slurm-wlm munge slurmdbd mariadb-server) are installed with apt-get
# when running as root. The daemons run as root (Slurm) and as the munge and mysql users; no
# systemd and no cgroups are needed (proctrack/linuxproc, task/none).
set -euo pipefail

ROOT="${HPCTRAIN_SLURM_DIR:-/tmp/hpctrain-slurm}"
PORT="${HPCTRAIN_SLURM_PORT:-16817}"
CPUS="${HPCTRAIN_SLURM_CPUS:-16}"
MAX_ARRAY="${HPCTRAIN_SLURM_MAX_ARRAY:-100001}"
ACCOUNTING="${HPCTRAIN_SLURM_ACCOUNTING:-slurmdbd}"
NODES="${HPCTRAIN_SLURM_NODES:-1}"
case "$ACCOUNTING" in slurmdbd|none) ;; *) echo "local-slurm: error: HPCTRAIN_SLURM_ACCOUNTING=$ACCOUNTING; expected slurmdbd or none" >&2; exit 2 ;; esac
[[ "$MAX_ARRAY" =~ ^[0-9]+$ ]] || { echo "local-slurm: error: HPCTRAIN_SLURM_MAX_ARRAY=$MAX_ARRAY; expected a number" >&2; exit 2; }
[[ "$NODES" =~ ^[1-9][0-9]?$ ]] || { echo "local-slurm: error: HPCTRAIN_SLURM_NODES=$NODES; expected 1 to 99" >&2; exit 2; }
CLUSTER=hpctrain
PARTITION=debug
CTLD_PORT=$PORT
SLURMD_PORT=$((PORT + 1))
DBD_PORT=$((PORT + 2))
DB_PORT=$((PORT + 3))
ETC="$ROOT/etc"
RUN="$ROOT/run"
LOG="$ROOT/log"
MUNGE_DIR="$ROOT/munge"
DB_DIR="$ROOT/mysql"
DB_PASS=hpctrain-local
export SLURM_CONF="$ETC/slurm.conf"

log() { echo "local-slurm: $*" >&2; }
die() { log "error: $*"; exit 1; }

# ------------------------------------------------------------------ packages

ensure_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurm-wlm)
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmdbd >/dev/null || missing+=(slurmdbd)
    command -v mariadbd >/dev/null || command -v mysqld >/dev/null || missing+=(mariadb-server)
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "missing packages: ${missing[*]}; install them (apt-get install ${missing[*]}) or run as root"
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# ------------------------------------------------------------------ processes

pid_of() {  # pid from a pid file when that process is alive
    local file="$RUN/$1.pid" pid
    [ -s "$file" ] || return 1
    pid="$(tr -dc 0-9 <"$file")"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2; shift 2
    local i
    for ((i = 0; i < limit * 5; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    die "$what did not come up within ${limit}s; see the logs in $LOG"
}

# ------------------------------------------------------------------ munge

start_munge() {
    pid_of munged >/dev/null && return 0
    # Slurm's clients (sacctmgr in particular) reach munged only on its default socket, so the
    # one munged of this machine serves this cluster: a munged already running is used as it is.
    munge -n >/dev/null 2>&1 && { log "using the munged already running"; return 0; }
    mkdir -p "$MUNGE_DIR"
    if [ "$(id -u)" -eq 0 ]; then
        mkdir -p /run/munge
        chown munge:munge "$MUNGE_DIR" /run/munge
        chmod 755 /run/munge
        [ -s /etc/munge/munge.key ] || runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
        # munged writes its pid file into a folder it owns; it is copied to $RUN after.
        runuser -u munge -- munged --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
            --seed-file="$MUNGE_DIR/munged.seed" --key-file=/etc/munge/munge.key
    else
        die "munged is not running; start it (sudo systemctl start munge) or run this script as root"
    fi
    wait_for 10 munged test -s "$MUNGE_DIR/munged.pid"
    cp "$MUNGE_DIR/munged.pid" "$RUN/munged.pid"
    wait_for 10 munged munge -n
}

# ------------------------------------------------------------------ MariaDB (for slurmdbd / sacct)

mysql_root() { mariadb --socket="$DB_DIR/mysqld.sock" -u root "$@"; }

start_mariadb() {
    pid_of mariadbd >/dev/null && return 0
    local server; server="$(command -v mariadbd || command -v mysqld)"
    mkdir -p "$DB_DIR"
    # MariaDB runs as mysql and must own the folder of its data and socket.
    [ "$(id -u)" -eq 0 ] && chown mysql:mysql "$DB_DIR"
    local user=(); [ "$(id -u)" -eq 0 ] && user=(--user=mysql)
    if [ ! -d "$DB_DIR/data/mysql" ]; then
        mariadb-install-db "${user[@]}" --datadir="$DB_DIR/data" --skip-test-db \
            --auth-root-authentication-method=socket >"$LOG/mariadb-install.log" 2>&1 \
            || die "mariadb-install-db failed; see $LOG/mariadb-install.log"
    fi
    rm -f "$DB_DIR/mysqld.pid"
    # setsid: the server outlives this script and the terminal (or test session) that ran it.
    setsid -f "$server" --no-defaults "${user[@]}" --datadir="$DB_DIR/data" --socket="$DB_DIR/mysqld.sock" \
        --pid-file="$DB_DIR/mysqld.pid" --port="$DB_PORT" --bind-address=127.0.0.1 \
        --log-error="$DB_DIR/mariadb.log" --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 \
        </dev/null >/dev/null 2>&1
    wait_for 30 MariaDB mysql_root -e "SELECT 1"
    cp "$DB_DIR/mysqld.pid" "$RUN/mariadbd.pid"
    mysql_root -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
                   GRANT ALL ON hpctrain_slurm_acct.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
}

# ------------------------------------------------------------------ configuration

real_memory() {  # MB this node reports, as slurmd -C sees it
    env -u SLURM_CONF slurmd -C 2>/dev/null | tr ' ' '\n' | sed -n 's/^RealMemory=//p' | head -n1
}

node_names() {
    if [ "$NODES" -eq 1 ]; then echo localhost; else seq -f 'node%g' 1 "$NODES"; fi
}

node_lines() {  # the NodeName and PartitionName lines
    local host=$1 mem=$2 i names
    local shape="CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN"
    if [ "$NODES" -eq 1 ]; then
        echo "NodeName=localhost NodeHostname=$host NodeAddr=127.0.0.1 $shape"
    else
        for ((i = 1; i <= NODES; i++)); do
            echo "NodeName=node$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + 9 + i)) $shape"
        done
    fi
    names="$(node_names | paste -sd, -)"
    echo "PartitionName=$PARTITION Nodes=$names Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
}

accounting_lines() {
    if [ "$ACCOUNTING" = none ]; then
        echo "# No accounting: sacct has nothing to show (as on sites without slurmdbd)."
        echo "AccountingStorageType=accounting_storage/none"
    else
        echo "# Accounting through slurmdbd, so sacct works."
        echo "AccountingStorageType=accounting_storage/slurmdbd"
        echo "AccountingStorageHost=localhost"
        echo "AccountingStoragePort=$DBD_PORT"
    fi
}

write_configs() {  # into $1 (slurm.conf's folder)
    local dir=$1 host mem user
    host="$(hostname)"
    mem="$(real_memory)"; mem="${mem:-1024}"
    user="$(id -un)"
    mkdir -p "$dir" "$ROOT/state" "$ROOT/spool" "$ROOT/tmp"
    cat >"$dir/slurm.conf" <<EOF
# Written by scripts/local-slurm.sh: a test cluster of $NODES node(s) on this host, under $ROOT.
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
TmpFS=$ROOT/tmp/%n
SlurmctldDebug=info
SlurmdDebug=info
# No systemd, no cgroups: processes tracked by parent id, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
# Requeue on preemption and scontrol requeue; 15 s between SIGTERM and SIGKILL to save a checkpoint.
JobRequeue=1
KillWait=15
MinJobAge=600
MaxArraySize=$MAX_ARRAY
MaxJobCount=200000
SchedulerParameters=defer_batch
$(accounting_lines)
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# The node declares $CPUS CPUs whatever the machine has (see the header of local-slurm.sh).
SlurmdParameters=config_overrides
$(node_lines "$host" "$mem")
EOF
    cat >"$dir/slurmdbd.conf" <<EOF
# Written by scripts/local-slurm.sh
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=$user
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=hpctrain_slurm_acct
EOF
    chmod 600 "$dir/slurmdbd.conf"   # slurmdbd refuses a config others can read (it holds a password)
    cat >"$dir/env.sh" <<EOF
export SLURM_CONF=$ETC/slurm.conf
EOF
}

# ------------------------------------------------------------------ Slurm daemons

start_slurmdbd() {
    pid_of slurmdbd >/dev/null && return 0
    slurmdbd   # daemonizes; reads slurmdbd.conf from the folder of \$SLURM_CONF
    wait_for 30 slurmdbd sacctmgr -n list cluster
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
}

start_slurmctld() {
    pid_of slurmctld >/dev/null && return 0
    slurmctld
    wait_for 30 slurmctld scontrol ping
}

start_slurmd() {  # one slurmd per node, each with its own spool and TmpFS folder
    local node
    for node in $(node_names); do
        pid_of "slurmd-$node" >/dev/null && continue
        mkdir -p "$ROOT/spool/$node" "$ROOT/tmp/$node"
        slurmd -N "$node"
    done
    wait_for 30 "the nodes" node_ready
}

node_ready() {  # every node up
    [ "$(sinfo -h -N -o %t | grep -Ec '^(idle|mix|alloc)')" -ge "$NODES" ]
}

# ------------------------------------------------------------------ commands

print_env() { echo "export SLURM_CONF=$SLURM_CONF"; }

cmd_start() {
    ensure_packages
    mkdir -p "$ROOT" "$RUN" "$LOG"
    chmod 755 "$ROOT"
    if slurm_running; then
        # Another user of this cluster (a test session) may have started it with other settings:
        # leave it as it is; `restart` applies new ones.
        same_settings || log "running with other settings than these (see $SLURM_CONF); restart applies them"
        if all_running; then
            log "already running under $ROOT"
            print_env
            return 0
        fi
    fi
    write_configs "$ETC"
    start_munge
    if [ "$ACCOUNTING" = slurmdbd ]; then
        start_mariadb
        start_slurmdbd
    fi
    start_slurmctld
    start_slurmd
    local node
    for node in $(node_names); do
        scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
    done
    wait_for 30 "the nodes" node_ready
    log "cluster '$CLUSTER' up under $ROOT (partition $PARTITION, $NODES node(s) of $CPUS CPUs," \
        "MaxArraySize=$MAX_ARRAY, accounting $ACCOUNTING); to use it:"
    print_env
}

same_settings() {  # the running cluster's slurm.conf is the one these settings write
    local fresh="$ROOT/etc.check" same=0
    write_configs "$fresh"
    cmp -s "$fresh/slurm.conf" "$SLURM_CONF" || same=1
    rm -rf "$fresh"
    return $same
}

daemons() {  # the daemons these settings run, by pid file name
    if [ "$ACCOUNTING" = slurmdbd ]; then echo mariadbd slurmdbd; fi
    echo slurmctld
    node_names | sed 's/^/slurmd-/'
}

slurm_running() {
    pid_of slurmctld >/dev/null && [ -f "$SLURM_CONF" ] && scontrol ping >/dev/null 2>&1
}

written_daemons() {  # the daemons of the slurm.conf last written (the running cluster's), else daemons
    [ -f "$SLURM_CONF" ] || { daemons; return; }
    grep -q '^AccountingStorageType=accounting_storage/none' "$SLURM_CONF" || echo mariadbd slurmdbd
    echo slurmctld
    sed -n 's/^NodeName=\([^ ]*\) .*/slurmd-\1/p' "$SLURM_CONF"
}

all_running() {
    local d
    munge -n >/dev/null 2>&1 || return 1
    for d in $(written_daemons); do
        pid_of "$d" >/dev/null || return 1
    done
    slurm_running
}

stop_one() {
    local name=$1 pid i
    pid="$(pid_of "$name")" || { rm -f "$RUN/$name.pid"; return 0; }
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    rm -f "$RUN/$name.pid"
}

descendants() {  # the pids below $1, deepest last
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        echo "$child"
        descendants "$child"
    done
}

kill_leftover_steps() {
    # A step daemon outlives slurmd; ours are the ones holding files of $ROOT open.
    local pid
    for pid in $(pgrep -x slurmstepd 2>/dev/null); do
        if ls -l "/proc/$pid/fd" 2>/dev/null | grep -q -- "$ROOT/"; then
            # shellcheck disable=SC2046
            kill -9 $(descendants "$pid") "$pid" 2>/dev/null || true
        fi
    done
}

cmd_stop() {
    if [ -f "$SLURM_CONF" ] && scontrol ping >/dev/null 2>&1; then
        local jobs; jobs="$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')"
        if [ -n "${jobs// /}" ]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            # KillWait (15 s) bounds how long a job may take to end after SIGTERM.
            for _ in $(seq 1 100); do
                [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
                sleep 0.25
            done
        fi
    fi
    local pidfile
    for pidfile in "$RUN"/slurmd*.pid; do  # every node of the last start, whatever the settings now
        [ -e "$pidfile" ] && stop_one "$(basename "$pidfile" .pid)"
    done
    kill_leftover_steps
    stop_one slurmctld
    stop_one slurmdbd
    stop_one mariadbd
    stop_one munged
    log "stopped (files kept in $ROOT)"
}

cmd_status() {
    local d pid rc=0
    if munge -n >/dev/null 2>&1; then echo "munged: running"; else echo "munged: stopped"; rc=1; fi
    for d in $(written_daemons); do
        if pid="$(pid_of "$d")"; then echo "$d: running (pid $pid)"; else echo "$d: stopped"; rc=1; fi
    done
    if [ $rc -eq 0 ]; then
        sinfo
        print_env
    fi
    return $rc
}

case "${1:-}" in
    start) cmd_start ;;
    restart) cmd_stop; cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) print_env ;;
    *) echo "usage: $0 start|restart|stop|status|env" >&2; exit 2 ;;
esac
