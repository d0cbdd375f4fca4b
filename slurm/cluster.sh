#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for qlaunch's tests and for trying qlaunch
# without a cluster:
#
#   slurm/cluster.sh up [--nodes N]
#                             install slurm-wlm + munge if missing, write the config, start
#                             munged, slurmctld and slurmd, wait until the node takes jobs.
#                             --nodes N (N >= 2) adds N more nodes, qlnode1..N, each a slurmd
#                             in its own network namespace and hostname with its own address
#                             on a private bridge (10.77.0.0/24: this machine's own test hosts),
#                             in partitions `multi` (preemptible by requeue) and `multi-high`
#                             (takes nodes from `multi` jobs): real multi-node jobs on one machine
#   slurm/cluster.sh status   daemons, node and partitions, queue
#   slurm/cluster.sh down     stop the daemons (jobs are cancelled first)
#
# Accounting: a MariaDB server of its own (data, socket and port 127.0.0.1:$DB_PORT under the
# state dir, not the system's) and slurmdbd, so sacct and sacctmgr answer as on a real cluster:
# cluster qlaunch-test, account qlaunch, user root (and $SUDO_USER) in it, limits enforced
# (AccountingStorageEnforce=associations,limits,qos): `sacctmgr -i modify user root set
# MaxSubmitJobs=5` is a real per-user limit.
#
# Everything it writes lives under $QLAUNCH_SLURM_DIR (default /var/lib/qlaunch-slurm), except
# a /usr/sbin/policy-rc.d for the length of apt-get install (where none was there) and
# symlinks in /etc/slurm that point there: sbatch/squeue/scontrol read /etc/slurm/slurm.conf, so
# the plain commands work with no SLURM_CONF in anyone's environment. It refuses to touch an
# /etc/slurm/slurm.conf it did not write. Needs root (CI runs it as root on a fresh machine).
#
# The node: CPUs and memory as `slurmd -C` reports this machine, 2 placeholder `gpu:t4` GRES
# (jobs that ask for --gres=gpu:t4:N can be scheduled; nothing uses a real GPU), partitions
# `normal` (default, low priority, preemptible by requeue) and `high` (takes the node from
# `normal` jobs). Jobs run as the submitting user, root here.
set -euo pipefail

STATE_DIR=${QLAUNCH_SLURM_DIR:-/var/lib/qlaunch-slurm}
ETC_SLURM=/etc/slurm
MARKER="# Written by qlaunch slurm/cluster.sh"
CLUSTER_NAME=qlaunch-test
GPU_COUNT=2
# A preempted job keeps its node this long after SIGTERM (and USR1, see SlurmctldParameters):
# enough for the trainer to save a checkpoint.
GRACE_TIME=60
# A requeued job may start again only after cred_expire + 1 seconds (Slurm's default is 120);
# 10 keeps the preemption tests short while staying well above the time a step needs to launch.
CRED_EXPIRE=10
# Multi-node mode (--nodes): the bridge, its subnet and the node names.
EXTRA_NODES=0
BRIDGE=qlbr0
SUBNET=10.77.0
NODE_PREFIX=qlnode
HOSTS_MARK="# qlaunch-slurm test node"
# Accounting: MariaDB on this port (127.0.0.1 only), slurmdbd on Slurm's usual one.
DB_PORT=${QLAUNCH_SLURM_DB_PORT:-16033}
DBD_PORT=6819
ACCOUNT=qlaunch
# Every wait below gives up after this many seconds, naming the log to read.
WAIT_SECONDS=90

log() { printf 'cluster.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() {
    [ "$(id -u)" -eq 0 ] || die "run as root (it installs packages and starts slurmctld/slurmd)"
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null \
        && command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null \
        && command -v mariadb-install-db >/dev/null; then
        return
    fi
    log "installing slurm-wlm, slurmdbd, mariadb-server and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    # The packages' own services are not wanted (this script starts its own daemons): where
    # invoke-rc.d would start them, policy-rc.d says no for the length of the install.
    local policy=/usr/sbin/policy-rc.d placed=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\n# %s\nexit 101\n' "$MARKER (apt-get install only)" >"$policy"
        chmod 755 "$policy"
        placed=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT  # also if the install is interrupted
    fi
    local status=0
    apt-get install -y -q --no-install-recommends slurm-wlm slurmdbd mariadb-server munge >/dev/null || status=$?
    if [ "$placed" = 1 ]; then
        rm -f "$policy"
        trap - EXIT
    fi
    [ "$status" -eq 0 ] || die "apt-get install failed (exit $status)"
}

pid_alive() {  # pid_alive PIDFILE
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

# slurmd -C prints the node line Slurm itself would accept (CPUs, sockets, cores, memory).
node_hardware() {
    slurmd -C | head -n 1 | tr ' ' '\n' \
        | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore|RealMemory)=' \
        | tr '\n' ' '
}

write_config() {
    local host hw conf
    host=$(hostname -s)
    hw=$(node_hardware)
    mkdir -p "$STATE_DIR"/{etc,log,run,spool/slurmctld,spool/slurmd,dev,munge}
    # Other users reach munged through its socket in here (the key itself stays 0600).
    chmod 755 "$STATE_DIR" "$STATE_DIR/munge"
    # gres.conf File= entries must exist and match the count. Placeholders are enough for
    # scheduling (no job here touches a GPU); character devices (/dev/null's numbers) keep
    # slurmd from complaining, plain files where mknod is not allowed.
    local i
    for ((i = 0; i < GPU_COUNT; i++)); do
        [ -e "$STATE_DIR/dev/nvidia$i" ] \
            || mknod "$STATE_DIR/dev/nvidia$i" c 1 3 2>/dev/null \
            || touch "$STATE_DIR/dev/nvidia$i"
    done

    local ctld_addr=127.0.0.1 extra_nodes="" extra_gres="" names
    if ((EXTRA_NODES >= 2)); then
        # The namespaced nodes reach slurmctld (and each other) over the bridge.
        ctld_addr=$SUBNET.1
        names="$NODE_PREFIX[1-$EXTRA_NODES]"
        for ((i = 1; i <= EXTRA_NODES; i++)); do
            extra_nodes+="NodeName=$NODE_PREFIX$i NodeAddr=$SUBNET.$((10 + i)) ${hw}Gres=gpu:t4:$GPU_COUNT State=UNKNOWN"$'\n'
        done
        extra_nodes+="PartitionName=multi Nodes=$names PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_TIME MaxTime=INFINITE State=UP"$'\n'
        extra_nodes+="PartitionName=multi-high Nodes=$names PriorityTier=100 PreemptMode=OFF MaxTime=INFINITE State=UP"
        extra_gres=$'\n'"NodeName=$names Name=gpu Type=t4 File=$STATE_DIR/dev/nvidia[0-$((GPU_COUNT - 1))]"
    fi
    conf=$(cat <<EOF
$MARKER: edits are overwritten by the next \`up\`.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$host($ctld_addr)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE_DIR/munge/munge.socket,cred_expire=$CRED_EXPIRE
StateSaveLocation=$STATE_DIR/spool/slurmctld
# %n: a spool, pid file and log per node (several slurmd run on this machine with --nodes).
SlurmdSpoolDir=$STATE_DIR/spool/slurmd-%n
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in containers/VMs without systemd: track processes through /proc.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# slurmdbd (below, with its own MariaDB): sacct, sacctmgr, and association/QOS limits enforced.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$ctld_addr
AccountingStoragePort=$DBD_PORT
AccountingStorageEnforce=associations,limits,qos
# Clients reach slurmdbd through the munged named here (AuthInfo's socket is not used for it).
AccountingStoragePass=$STATE_DIR/munge/munge.socket
JobCompType=jobcomp/none
MailProg=/bin/true
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SchedulerType=sched/backfill
# Pending jobs (e.g. a requeued one whose BeginTime just passed) are looked at every few
# seconds instead of every minute.
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1000
GresTypes=gpu
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
# Send the job's --signal (qlaunch: B:USR1) at preemption too, not only before its time limit.
SlurmctldParameters=preempt_send_user_signal
KillWait=30
# Finished jobs stay visible to squeue for an hour (sacct keeps them after that).
MinJobAge=3600
# Array indices 0-99 (Slurm's default is 1001): qlaunch's tests see a grid cut into several arrays.
MaxArraySize=100
NodeName=$host NodeAddr=127.0.0.1 ${hw}Gres=gpu:t4:$GPU_COUNT State=UNKNOWN
PartitionName=normal Nodes=$host Default=YES PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_TIME MaxTime=INFINITE State=UP
PartitionName=high Nodes=$host PriorityTier=100 PreemptMode=OFF MaxTime=INFINITE State=UP
$extra_nodes
EOF
)
    local gres="$MARKER
AutoDetect=off
NodeName=$host Name=gpu Type=t4 File=$STATE_DIR/dev/nvidia[0-$((GPU_COUNT - 1))]$extra_gres"

    CONFIG_CHANGED=0
    if [ ! -f "$STATE_DIR/etc/slurm.conf" ] || [ "$(cat "$STATE_DIR/etc/slurm.conf")" != "$conf" ]; then
        CONFIG_CHANGED=1
    fi
    printf '%s\n' "$conf" >"$STATE_DIR/etc/slurm.conf"
    printf '%s\n' "$gres" >"$STATE_DIR/etc/gres.conf"

    mkdir -p "$ETC_SLURM"
    local name target
    for name in slurm.conf gres.conf; do
        target="$ETC_SLURM/$name"
        if [ -e "$target" ] && [ "$(readlink -f "$target")" != "$STATE_DIR/etc/$name" ]; then
            die "$target exists and was not written by this script (a real Slurm install?); not touching it"
        fi
        ln -sfn "$STATE_DIR/etc/$name" "$target"
    done
}

# ---- accounting: MariaDB + slurmdbd --------------------------------------------------------
db_dir() { echo "$STATE_DIR/mariadb"; }

db_client() {  # db_client SQL: as MariaDB's root, through its socket (root logs in by socket)
    mariadb --no-defaults --socket="$(db_dir)/mysqld.sock" --user=root --batch --execute="$1"
}

write_dbd_config() {
    local host dir conf pass
    host=$(hostname -s)
    dir=$(db_dir)
    mkdir -p "$dir"
    if [ ! -s "$dir/slurm.password" ]; then
        (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/slurm.password")
    fi
    pass=$(cat "$dir/slurm.password")
    conf=$(cat <<EOF
$MARKER: edits are overwritten by the next \`up\`.
AuthType=auth/munge
AuthInfo=socket=$STATE_DIR/munge/munge.socket
DbdHost=$host
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$STATE_DIR/log/slurmdbd.log
PidFile=$STATE_DIR/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$pass
StorageLoc=slurm_acct_db
EOF
)
    DBD_CONFIG_CHANGED=0
    if [ ! -f "$STATE_DIR/etc/slurmdbd.conf" ] || [ "$(cat "$STATE_DIR/etc/slurmdbd.conf")" != "$conf" ]; then
        DBD_CONFIG_CHANGED=1
    fi
    # slurmdbd refuses a config others can read (it holds the database password).
    (umask 077 && printf '%s\n' "$conf" >"$STATE_DIR/etc/slurmdbd.conf")
    chmod 600 "$STATE_DIR/etc/slurmdbd.conf"
    local target="$ETC_SLURM/slurmdbd.conf"
    if [ -e "$target" ] && [ "$(readlink -f "$target")" != "$STATE_DIR/etc/slurmdbd.conf" ]; then
        die "$target exists and was not written by this script (a real Slurm install?); not touching it"
    fi
    ln -sfn "$STATE_DIR/etc/slurmdbd.conf" "$target"
}

start_mariadb() {
    local dir i
    dir=$(db_dir)
    pid_alive "$dir/mariadb.pid" && return 0
    mkdir -p "$dir/data"
    chown mysql:mysql "$dir" "$dir/data"
    if [ ! -d "$dir/data/mysql" ]; then
        log "initialising the accounting database (MariaDB) in $dir/data"
        mariadb-install-db --no-defaults --user=mysql --datadir="$dir/data" \
            --auth-root-authentication-method=socket --skip-test-db \
            >"$STATE_DIR/log/mariadb-install.log" 2>&1 \
            || die "mariadb-install-db failed; see $STATE_DIR/log/mariadb-install.log"
    fi
    # Its own server, not the system's: own data, socket, pid file, and a port on 127.0.0.1 only.
    setsid mariadbd --no-defaults --user=mysql --datadir="$dir/data" \
        --socket="$dir/mysqld.sock" --pid-file="$dir/mariadb.pid" \
        --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve \
        --innodb-buffer-pool-size=64M --log-error="$STATE_DIR/log/mariadb.log" \
        </dev/null >/dev/null 2>&1 &
    for ((i = 0; i < WAIT_SECONDS * 2; i++)); do
        if db_client "SELECT 1" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    die "MariaDB did not answer within $WAIT_SECONDS s; see $STATE_DIR/log/mariadb.log"
}

setup_database() {
    local pass
    pass=$(cat "$(db_dir)/slurm.password")
    # Idempotent: the user gets the current password each time.
    db_client "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;" >/dev/null || die "could not set up the slurm_acct_db database; see $STATE_DIR/log/mariadb.log"
}

start_slurmdbd() {
    if pid_alive "$STATE_DIR/run/slurmdbd.pid" && [ "$DBD_CONFIG_CHANGED" = 1 ]; then
        log "slurmdbd.conf changed: restarting slurmdbd"
        stop_pidfile slurmdbd
    fi
    if ! pid_alive "$STATE_DIR/run/slurmdbd.pid"; then
        slurmdbd || die "slurmdbd did not start; see $STATE_DIR/log/slurmdbd.log"
    fi
    # It creates its tables on first start: wait until it answers sacctmgr.
    local deadline=$((SECONDS + WAIT_SECONDS))
    while ((SECONDS < deadline)); do
        if timeout 10 sacctmgr --noheader --parsable2 show cluster format=Cluster >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    die "slurmdbd did not answer sacctmgr within $WAIT_SECONDS s; see $STATE_DIR/log/slurmdbd.log"
}

sacctmgr_lists() {  # sacctmgr_lists ARGS...: whether `sacctmgr show ARGS` lists anything
    [ -n "$(timeout 30 sacctmgr --noheader --parsable2 show "$@" 2>/dev/null)" ]
}

# The cluster, an account and its users (with AccountingStorageEnforce=associations a user
# without an association may not submit). Idempotent: only what is missing is added.
setup_associations() {
    local user
    sacctmgr_lists cluster "$CLUSTER_NAME" format=Cluster \
        || timeout 30 sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null \
        || die "sacctmgr add cluster $CLUSTER_NAME failed"
    sacctmgr_lists account "$ACCOUNT" format=Account \
        || timeout 30 sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER_NAME" \
            description=qlaunch-tests organization=qlaunch >/dev/null \
        || die "sacctmgr add account $ACCOUNT failed"
    for user in root ${SUDO_USER:-}; do
        sacctmgr_lists assoc cluster="$CLUSTER_NAME" account="$ACCOUNT" user="$user" format=User \
            || timeout 30 sacctmgr -i add user "$user" account="$ACCOUNT" defaultaccount="$ACCOUNT" \
                cluster="$CLUSTER_NAME" >/dev/null \
            || die "sacctmgr add user $user failed"
    done
}

start_accounting() {
    start_mariadb
    setup_database
    start_slurmdbd
    setup_associations
}

start_munge() {
    if pid_alive "$STATE_DIR/run/munged.pid"; then return; fi
    if [ ! -s "$STATE_DIR/munge/munge.key" ]; then
        # 1 KiB of random bytes is what mungekey writes too.
        (umask 077 && dd if=/dev/urandom of="$STATE_DIR/munge/munge.key" bs=1024 count=1 status=none)
    fi
    # munged checks that its folders are not writable by others; the state dir may sit in a
    # world-writable /tmp, so let the sticky bit there count as safe (--force).
    munged --force \
        --key-file="$STATE_DIR/munge/munge.key" \
        --socket="$STATE_DIR/munge/munge.socket" \
        --pid-file="$STATE_DIR/run/munged.pid" \
        --seed-file="$STATE_DIR/munge/munged.seed" \
        --log-file="$STATE_DIR/log/munged.log"
}

stop_slurmds() {
    local file
    for file in "$STATE_DIR"/run/slurmd-*.pid "$STATE_DIR"/run/slurmd.pid; do
        [ -e "$file" ] && stop_pidfile "$(basename "$file" .pid)"
    done
    return 0
}

start_slurm() {
    local host i
    host=$(hostname -s)
    if pid_alive "$STATE_DIR/run/slurmctld.pid" && [ "$CONFIG_CHANGED" = 1 ]; then
        # Added or removed nodes need slurmctld and slurmd restarted (queued jobs survive it).
        log "configuration changed: restarting slurmctld and slurmd"
        stop_pidfile slurmctld
        stop_slurmds
    fi
    if ! pid_alive "$STATE_DIR/run/slurmctld.pid"; then
        slurmctld -f "$STATE_DIR/etc/slurm.conf"
    fi
    if ! pid_alive "$STATE_DIR/run/slurmd-$host.pid"; then
        mkdir -p "$STATE_DIR/spool/slurmd-$host"
        slurmd -f "$STATE_DIR/etc/slurm.conf"
    fi
    for ((i = 1; i <= EXTRA_NODES; i++)); do
        pid_alive "$STATE_DIR/run/slurmd-$NODE_PREFIX$i.pid" && continue
        # Its own network namespace (its address) and UTS namespace (its hostname, which srun
        # and the job's `hostname` use); the filesystem, munge socket and venv are shared.
        # nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup tree slurmd reads.
        mkdir -p "$STATE_DIR/spool/slurmd-$NODE_PREFIX$i"
        nsenter --net="/run/netns/$NODE_PREFIX$i" unshare --uts sh -c \
            'hostname "$1" && exec slurmd -N "$1" -f "$2"' slurmd "$NODE_PREFIX$i" "$STATE_DIR/etc/slurm.conf" \
            || die "slurmd of $NODE_PREFIX$i did not start; see $STATE_DIR/log/slurmd-$NODE_PREFIX$i.log"
    done
}

# The bridge in this namespace (slurmctld at $SUBNET.1) and a veth + namespace per node.
setup_network() {
    ((EXTRA_NODES >= 2)) || return 0
    local i name addr
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
        ip addr add "$SUBNET.1/24" dev "$BRIDGE"
    fi
    ip link set "$BRIDGE" up
    # Docker sets the FORWARD policy to DROP, and with br_netfilter loaded that applies to
    # traffic between two ports of a bridge too: let the test nodes talk to each other.
    if command -v iptables >/dev/null && ! iptables -C FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT 2>/dev/null; then
        iptables -I FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT 2>/dev/null || true
    fi
    for ((i = 1; i <= EXTRA_NODES; i++)); do
        name=$NODE_PREFIX$i
        addr=$SUBNET.$((10 + i))
        if ! ip netns list | grep -qw "$name"; then
            ip netns add "$name"
            ip link add "ql-$name" type veth peer name eth0 netns "$name"
            ip link set "ql-$name" master "$BRIDGE" up
            ip -n "$name" addr add "$addr/24" dev eth0
            ip -n "$name" link set eth0 up
            ip -n "$name" link set lo up
            ip -n "$name" route add default via "$SUBNET.1"
        fi
        # Every node (and this, the login node) finds the others by name, as on a cluster.
        grep -q "^$addr $name " /etc/hosts || echo "$addr $name $HOSTS_MARK" >>/etc/hosts
    done
}

teardown_network() {
    local name kept
    for name in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$NODE_PREFIX" || true); do
        ip netns del "$name" 2>/dev/null || true
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    if command -v iptables >/dev/null; then
        iptables -D FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT 2>/dev/null || true
    fi
    if grep -q "$HOSTS_MARK" /etc/hosts; then
        # /etc/hosts may be a bind mount (containers): rewrite it in place, never replace it.
        kept=$(grep -v "$HOSTS_MARK" /etc/hosts)
        printf '%s\n' "$kept" >/etc/hosts
    fi
}

wait_node() {  # wait_node NAME
    local state deadline=$((SECONDS + 90))
    while ((SECONDS < deadline)); do
        state=$(sinfo --noheader --node="$1" --format=%T 2>/dev/null | head -n 1 || true)
        case "$state" in
            idle* | mixed* | allocated* | completing*)
                log "ready: node $1 is $state"
                return
                ;;
            down* | drain* | fail*)
                scontrol update nodename="$1" state=resume 2>/dev/null || true
                ;;
        esac
        sleep 1
    done
    die "node $1 did not come up within 90 s; see $STATE_DIR/log/"
}

wait_ready() {
    local i
    wait_node "$(hostname -s)"
    for ((i = 1; i <= EXTRA_NODES; i++)); do wait_node "$NODE_PREFIX$i"; done
}

stop_pidfile() {  # stop_pidfile NAME
    local file="$STATE_DIR/run/$1.pid" pid i
    pid_alive "$file" || return 0
    pid=$(cat "$file")
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "$1 (pid $pid) did not stop on SIGTERM; sending SIGKILL"
    kill -9 "$pid" 2>/dev/null || true
}

stop_mariadb() {
    local file pid i
    file="$(db_dir)/mariadb.pid"
    pid_alive "$file" || return 0
    pid=$(cat "$file")
    kill "$pid" 2>/dev/null || true
    # A clean InnoDB shutdown takes a few seconds; SIGKILL only past the bound.
    for ((i = 0; i < WAIT_SECONDS * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "mariadbd (pid $pid) did not stop on SIGTERM; sending SIGKILL"
    kill -9 "$pid" 2>/dev/null || true
}

cmd_up() {
    need_root
    install_packages
    setup_network
    write_config
    write_dbd_config
    start_munge
    start_accounting
    start_slurm
    wait_ready
}

cmd_down() {
    need_root
    if pid_alive "$STATE_DIR/run/slurmctld.pid"; then
        local jobs
        jobs=$(squeue --noheader --format=%i 2>/dev/null || true)
        # shellcheck disable=SC2086 # one id per word
        [ -z "$jobs" ] || scancel $jobs 2>/dev/null || true
    fi
    stop_slurmds
    stop_pidfile slurmctld
    stop_pidfile slurmdbd
    stop_mariadb
    stop_pidfile munged
    teardown_network
    # Job steps outlive slurmd by design; end the ones this cluster started.
    local pid
    for pid in $(pgrep -x slurmstepd || true); do
        if tr '\0' ' ' <"/proc/$pid/environ" 2>/dev/null | grep -q "SLURM_CONF=$STATE_DIR/"; then
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    log "stopped (state kept in $STATE_DIR)"
}

cmd_status() {
    local name
    if pid_alive "$(db_dir)/mariadb.pid"; then
        echo "mariadbd: running (pid $(cat "$(db_dir)/mariadb.pid"))"
    else
        echo "mariadbd: stopped"
    fi
    for name in munged slurmdbd slurmctld $(cd "$STATE_DIR/run" 2>/dev/null && ls slurmd-*.pid 2>/dev/null | sed 's/[.]pid$//'); do
        if pid_alive "$STATE_DIR/run/$name.pid"; then
            echo "$name: running (pid $(cat "$STATE_DIR/run/$name.pid"))"
        else
            echo "$name: stopped"
        fi
    done
    if pid_alive "$STATE_DIR/run/slurmctld.pid"; then
        sinfo
        squeue --states=all
    else
        return 1
    fi
}

command=${1:-}
[ $# -eq 0 ] || shift
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes)
            [ "${2:-}" -ge 1 ] 2>/dev/null || die "--nodes takes a number: 1 (this machine), or 2 and more"
            EXTRA_NODES=$2
            ((EXTRA_NODES >= 2)) || EXTRA_NODES=0
            shift 2
            ;;
        *) die "unknown option $1 (usage: $0 up [--nodes N] | down | status)" ;;
    esac
done

case "$command" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 up [--nodes N] | down | status" >&2
        exit 2
        ;;
esac
