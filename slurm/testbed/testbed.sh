#!/usr/bin/env bash
# A real Slurm cluster on this one machine, for tests: munge, slurmctld on the host,
# and one slurmd per node, each node in its own network namespace (own address on a
# bridge, own hostname, own /etc/hosts view). Root only.
#
#   slurm/testbed/testbed.sh up [-n NODES] [-c CPUS]   bring it up (2 nodes x 1 CPU by default)
#   slurm/testbed/testbed.sh down                      stop everything, remove every trace
#   slurm/testbed/testbed.sh status                    exit 0 when up and every node is usable
#   slurm/testbed/testbed.sh env                       print `export SLURM_CONF=...` for clients
#
# `up` is idempotent: a healthy cluster of the requested shape is left alone, anything
# else is torn down first. Traffic stays on loopback and the private bridge subnet.
# Environment: SG_TESTBED_SUBNET (first three octets of the /24, default 10.77.0),
# SG_TESTBED_CTLD_PORT (slurmctld's port on the host, default 6817).
set -euo pipefail

# One test bed per machine: namespace, bridge and node names are global, so the state folder is fixed.
STATE=/run/scratchgpt-testbed
NODE_PREFIX=sgnode               # Slurm node name, network namespace and hostname
BRIDGE=sgtb-br0
NODE_IF=sgtb0                    # the interface name inside every node (GLOO/NCCL_SOCKET_IFNAME)
SUBNET=${SG_TESTBED_SUBNET:-10.77.0}   # a /24 used only on the bridge and inside our namespaces
CTLD_ADDR=$SUBNET.1
CTLD_PORT=${SG_TESTBED_CTLD_PORT:-6817}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONF=$STATE/etc/slurm.conf

log() { echo "testbed: $*" >&2; }
die() { log "error: $*"; exit 1; }

node_addr() { echo "$SUBNET.$((10 + $1))"; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (it creates network namespaces and starts daemons)"; }

need_tools() {
    local missing=()
    for tool in munged mungekey slurmctld slurmd scontrol sinfo squeue scancel ip ss nsenter unshare flock; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    [ ${#missing[@]} = 0 ] || die "missing ${missing[*]}: apt-get install -y slurm-wlm munge"
}

# Our namespaces, whatever their number: a leftover of an earlier run with more nodes counts too.
our_netns() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${NODE_PREFIX}[0-9]+$" || true; }

# A pid from a pid file, only while that process is still the daemon we started
# (a stale pid file must never make us signal an unrelated process).
live_pid() {
    local file=$1 exe=$2 pid
    [ -f "$file" ] || return 1
    pid=$(cat "$file" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    # Compare real paths: Debian installs the daemons as alternatives (slurmctld -> slurmctld-wlm).
    [ "$(readlink -f "/proc/$pid/exe" 2>/dev/null)" = "$(readlink -f "$(command -v "$exe")")" ] || return 1
    echo "$pid"
}

running() {  # a zombie has finished: some inits (containers, micro-VMs) are slow to reap them
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    [ "$(echo "${stat##*) }" | cut -d' ' -f1)" != Z ]
}

stop_pids() {  # TERM, then KILL whatever is left after 3 s
    [ $# = 0 ] && return 0
    kill -TERM "$@" 2>/dev/null || true
    for _ in $(seq 30); do
        local alive=()
        for p in "$@"; do running "$p" && alive+=("$p"); done
        [ ${#alive[@]} = 0 ] && return 0
        sleep 0.1
    done
    kill -KILL "$@" 2>/dev/null || true
}

slurm_env() { export SLURM_CONF=$CONF; }

nodes_state() {  # "name state" per node, as the controller sees them
    slurm_env
    timeout 10 sinfo -h -N -o '%N %t' 2>/dev/null | sort -u
}

healthy() {  # healthy N: up with exactly N nodes, all usable
    local want=$1 states
    [ -f "$CONF" ] || return 1
    live_pid "$STATE/run/munged.pid" munged >/dev/null || return 1
    live_pid "$STATE/run/slurmctld.pid" slurmctld >/dev/null || return 1
    slurm_env
    timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP' || return 1
    states=$(nodes_state) || return 1
    [ "$(echo "$states" | grep -c .)" = "$want" ] || return 1
    ! echo "$states" | awk '{print $2}' | grep -qvE '^(idle|alloc|mix|comp)$'
}

cmd_down() {
    need_root
    if [ -f "$CONF" ] && live_pid "$STATE/run/slurmctld.pid" slurmctld >/dev/null; then
        slurm_env
        # Cancel jobs first so that their steps stop cleanly; what survives is killed below.
        timeout 10 scancel --quiet --user=root 2>/dev/null || true
    fi
    # Every process in a node's namespace is ours (slurmd, slurmstepd, job steps), and so are the
    # two host daemons of the pid files. Stopped all at once: each takes a second or two on TERM.
    local ns pid pids=()
    for ns in $(our_netns); do
        mapfile -t -O "${#pids[@]}" pids < <(ip netns pids "$ns" 2>/dev/null)
    done
    for daemon in slurmctld munged; do
        if pid=$(live_pid "$STATE/run/$daemon.pid" "$daemon"); then pids+=("$pid"); fi
    done
    stop_pids "${pids[@]}"
    for ns in $(our_netns); do ip netns delete "$ns" 2>/dev/null || true; done
    # Deleting a namespace deletes its veth end and with it the host end; the bridge is ours alone.
    ip link show "$BRIDGE" >/dev/null 2>&1 && ip link delete "$BRIDGE"
    rm -rf "$STATE"
    log "down"
}

render_conf() {
    local nodes=$1 cpus=$2 host=$3
    # The nodes share this machine's memory: each gets its share, so that `--mem` requests up to it run.
    local mem_mb
    mem_mb=$(awk -v n="$nodes" '/^MemTotal:/ {m = int($2 / 1024 / n); print (m > 0 ? m : 1)}' /proc/meminfo)
    mkdir -p "$STATE/etc"
    sed -e "s|@CTLD_HOST@|$host|g" -e "s|@CTLD_ADDR@|$CTLD_ADDR|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
        -e "s|@STATE@|$STATE|g" "$HERE/slurm.conf.in" >"$CONF"
    {
        echo
        for i in $(seq "$nodes"); do
            echo "NodeName=$NODE_PREFIX$i NodeAddr=$(node_addr "$i") NodeHostname=$NODE_PREFIX$i" \
                "CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=$NODE_PREFIX[1-$nodes] Default=YES MaxTime=INFINITE State=UP"
    } >>"$CONF"
    # The /etc/hosts the nodes see (bind-mounted in their mount namespace; the host's file is untouched):
    # node names resolve to bridge addresses, and the controller's name to the bridge, not to loopback.
    {
        echo "127.0.0.1 localhost"
        echo "$CTLD_ADDR $host"
        for i in $(seq "$nodes"); do echo "$(node_addr "$i") $NODE_PREFIX$i"; done
    } >"$STATE/etc/hosts"
}

start_munge() {
    # A private key and socket: no clash with a munged the machine may already run.
    # munged insists on a secret key folder and a socket folder that everyone can enter.
    mkdir -p "$STATE/munge-key" "$STATE/munge"
    chmod 0700 "$STATE/munge-key"
    chmod 0755 "$STATE/munge"
    mungekey --create --keyfile="$STATE/munge-key/munge.key" 2>/dev/null
    munged --socket="$STATE/munge/munge.socket" --key-file="$STATE/munge-key/munge.key" \
        --pid-file="$STATE/run/munged.pid" --log-file="$STATE/log/munged.log" \
        --seed-file="$STATE/munge-key/munged.seed" 9<&-
}

start_network() {
    local nodes=$1
    ip link add "$BRIDGE" type bridge
    ip addr add "$CTLD_ADDR/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for i in $(seq "$nodes"); do
        local ns=$NODE_PREFIX$i
        ip netns add "$ns"
        ip link add "sgtb-h$i" type veth peer name "$NODE_IF" netns "$ns"
        ip link set "sgtb-h$i" master "$BRIDGE"
        ip link set "sgtb-h$i" up
        ip -n "$ns" addr add "$(node_addr "$i")/24" dev "$NODE_IF"
        ip -n "$ns" link set "$NODE_IF" up
        ip -n "$ns" link set lo up
    done
}

start_slurmd() {
    local i=$1 ns=$NODE_PREFIX$1
    mkdir -p "$STATE/spool/$ns"
    # nsenter --net keeps the host's mounts (cgroups included), unlike `ip netns exec`;
    # unshare gives the node its own hostname and its own view of /etc/hosts.
    SLURM_CONF=$CONF nsenter --net="/run/netns/$ns" \
        unshare --uts --mount --propagation slave \
        sh -c 'hostname "$1" && mount --bind "$2" /etc/hosts && exec slurmd -N "$1" -f "$3"' \
        sh "$ns" "$STATE/etc/hosts" "$CONF" 9<&-
}

check_port_free() {
    # A controller left over from elsewhere would answer our clients with its own cluster.
    local holder
    holder=$(ss -Hltnp "sport = :$CTLD_PORT" 2>/dev/null | grep -o 'users:.*' || true)
    [ -z "$holder" ] || die "port $CTLD_PORT is taken ($holder): stop that process or set SG_TESTBED_CTLD_PORT"
}

check_subnet_free() {
    # Our bridge is gone after cmd_down: any route into the subnet now belongs to someone else.
    local taken
    taken=$(ip -4 route show to match "$CTLD_ADDR" 2>/dev/null | grep -v '^default' || true)
    [ -z "$taken" ] || die "$SUBNET.0/24 is already routed here ($taken): set SG_TESTBED_SUBNET to another /24 prefix"
}

hint_firewall() {
    # With br_netfilter loaded, bridged traffic between the nodes passes the host's iptables FORWARD chain
    # (Docker hosts set it to DROP), and node -> controller traffic passes INPUT.
    if [ "$(cat /proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null)" = 1 ] &&
        iptables -S 2>/dev/null | grep -qE -- '^-P (FORWARD|INPUT) DROP|^-A (FORWARD|INPUT)'; then
        log "hint: net.bridge.bridge-nf-call-iptables=1 here: make sure the firewall accepts traffic on $BRIDGE"
    fi
}

dump_logs() {
    for f in "$STATE"/log/*.log; do
        [ -f "$f" ] || continue
        log "---- $f (last 20 lines)"
        tail -n 20 "$f" >&2
    done
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...
    local secs=$1 what=$2
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@"; do
        [ $SECONDS -lt $deadline ] || { log "timed out after ${secs}s waiting for $what"; return 1; }
        sleep 0.2
    done
}

all_idle() {
    local want=$1 states
    states=$(nodes_state) || return 1
    [ "$(echo "$states" | awk '$2 == "idle"' | grep -c .)" = "$want" ]
}

cmd_up() {
    local nodes=2 cpus=1
    while [ $# -gt 0 ]; do
        case $1 in
            -n|--nodes) nodes=$2; shift 2 ;;
            -c|--cpus) cpus=$2; shift 2 ;;
            *) die "unknown option $1 (use -n NODES, -c CPUS)" ;;
        esac
    done
    [[ $nodes =~ ^[0-9]+$ ]] && [ "$nodes" -ge 1 ] && [ "$nodes" -le 200 ] || die "-n: 1..200 nodes, got $nodes"
    [[ $cpus =~ ^[0-9]+$ ]] && [ "$cpus" -ge 1 ] || die "-c: CPUs per node must be >= 1, got $cpus"
    [[ $SUBNET =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "SG_TESTBED_SUBNET=$SUBNET: want three octets, e.g. 10.77.0"
    [[ $CTLD_PORT =~ ^[0-9]+$ ]] && [ "$CTLD_PORT" -ge 1 ] && [ "$CTLD_PORT" -le 65535 ] ||
        die "SG_TESTBED_CTLD_PORT=$CTLD_PORT is not a TCP port"
    need_root
    need_tools
    if healthy "$nodes" && grep -q "CPUs=$cpus " "$CONF"; then
        log "already up: $nodes nodes"
        cmd_env
        return 0
    fi
    cmd_down 2>/dev/null
    check_port_free
    check_subnet_free
    local start=$EPOCHREALTIME host
    host=$(hostname -s)
    mkdir -p "$STATE/run" "$STATE/log" "$STATE/ctld" "$STATE/spool"
    chmod 0755 "$STATE"
    render_conf "$nodes" "$cpus" "$host"
    # Under `set -e` any failing step exits; the trap then shows the logs and removes the half-built cluster.
    trap bringup_failed EXIT
    start_munge
    start_network "$nodes"
    SLURM_CONF=$CONF slurmctld -c -f "$CONF" 9<&-
    wait_for 30 "slurmctld" ctld_up
    for i in $(seq "$nodes"); do start_slurmd "$i"; done
    wait_for 60 "all $nodes nodes idle" all_idle "$nodes"
    trap - EXIT
    log "up: $nodes nodes x $cpus CPU in $(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.1f", b - a}')s" \
        "(state in $STATE)"
    cmd_env
}

bringup_failed() {
    trap - EXIT
    dump_logs
    nodes_state >&2 || true
    hint_firewall
    cmd_down
    log "error: bring-up failed (logs above)"
    exit 1
}

ctld_up() { SLURM_CONF=$CONF timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; }

cmd_env() { echo "export SLURM_CONF=$CONF"; }

cmd_status() {
    [ -f "$CONF" ] || { log "down"; return 1; }
    slurm_env
    timeout 10 scontrol ping || return 1
    timeout 10 sinfo -N || return 1
    local n
    n=$(grep -c '^NodeName=' "$CONF")
    healthy "$n"
}

# One up/down at a time on this machine. The lock is on this script (nothing left behind); the
# daemons are started with fd 9 closed, or they would hold the lock for as long as they run.
serialize() {
    exec 9<"${BASH_SOURCE[0]}"
    flock -w 180 9 || die "another testbed.sh up/down still runs after 180 s"
}

case ${1:-} in
    up) shift; serialize; cmd_up "$@" ;;
    down) serialize; cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) echo "usage: $0 up [-n NODES] [-c CPUS] | down | status | env" >&2; exit 2 ;;
esac
