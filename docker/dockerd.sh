#!/bin/bash
# A Docker daemon for the container tests on a machine without systemd (CI, a fresh VM).
#
#   bash docker/dockerd.sh up       # installs docker.io + debootstrap with apt if missing; idempotent
#   bash docker/dockerd.sh status
#   bash docker/dockerd.sh down     # stops only the daemon this script started
#
# A daemon that already answers (systemd's, Docker Desktop's) is used as it is: `up` then does
# nothing. State and log live under /var/lib/qlaunch-docker.
set -euo pipefail

STATE=${QLAUNCH_DOCKERD_STATE:-/var/lib/qlaunch-docker}
PIDFILE=$STATE/dockerd.pid
LOG=$STATE/dockerd.log

answers() { docker info >/dev/null 2>&1; }

install_packages() {
    local missing=()
    command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "dockerd.sh: installing ${missing[*]} with apt"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

up() {
    if answers; then
        echo "dockerd.sh: a Docker daemon already answers ($(docker info --format '{{.ServerVersion}}, {{.Driver}}'))"
        return 0
    fi
    [ "$(id -u)" -eq 0 ] || { echo "dockerd.sh: starting dockerd needs root" >&2; exit 1; }
    install_packages
    mkdir -p "$STATE"
    # overlay2 where the kernel and the backing filesystem allow it; dockerd falls back to vfs.
    setsid dockerd --data-root "$STATE/data" --exec-root "$STATE/run" --pidfile "$PIDFILE" \
        >>"$LOG" 2>&1 </dev/null &
    for _ in $(seq 60); do
        answers && { echo "dockerd.sh: dockerd up ($(docker info --format '{{.ServerVersion}}, {{.Driver}}'))"; return 0; }
        sleep 1
    done
    echo "dockerd.sh: dockerd did not answer within 60 s; last lines of $LOG:" >&2
    tail -n 20 "$LOG" >&2
    exit 1
}

down() {
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        kill "$(cat "$PIDFILE")"
        echo "dockerd.sh: stopped dockerd $(cat "$PIDFILE")"
    else
        echo "dockerd.sh: no dockerd started by this script is running"
    fi
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) if answers; then docker info --format 'Docker {{.ServerVersion}}, storage {{.Driver}}, cgroup v{{.CgroupVersion}}'; else echo "no Docker daemon answers"; exit 1; fi ;;
    *) echo "usage: $0 up|status|down" >&2; exit 2 ;;
esac
