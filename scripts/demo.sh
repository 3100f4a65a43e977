#!/usr/bin/env bash
# `make demo`: the pipeline as local processes, where there is no Docker engine.
# Starts the embedded Kafka-protocol broker and Redis Stack (python -m local_stack), the flow
# processor, live capture on $IFACE (default lo) and the traffic generator in mix mode (DNS,
# HTTP, TLS), then shows the live view (python -m dpi_top) in this terminal.
# Ctrl-C here, or `make demo-down` from anywhere, stops every process it started.
#
# Settings (environment): IFACE (default lo), BPF_FILTER, RATE_PER_SECOND (default 500),
# KAFKA_PORT / REDIS_PORT (default 9092 / 6379; when one is taken and was not chosen, a free
# port is used and named), DEMO_RUN_DIR (default .run): pids and logs, <name>.pid, <name>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
RUN=${DEMO_RUN_DIR:-.run}
STOPPING="$RUN/demo-down"  # written by `down`: the view ending then is no crash
# name -> python module; the order services start in (view last, stopped first)
NAMES=(processor capture generator)
declare -A MODULE=([processor]=flow_processor [capture]=capture [generator]=traffic_generator
                   [view]=dpi_top)

say() { echo "demo: $*" >&2; }

# The pid recorded for a name, if that process still runs that module (never a recycled pid).
running_pid() {
    local f="$RUN/$1.pid" pid cmd
    [ -f "$f" ] || return 1
    pid=$(cat "$f" 2>/dev/null) || return 1
    [ -n "$pid" ] && alive "$pid" || return 1
    cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    [[ "$cmd " == *" -m ${MODULE[$1]} "* ]]
}

alive() {  # the process exists and is not a zombie
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

start_bg() {  # name, command...: own session (no terminal signals), pid and log in .run
    local name=$1; shift
    setsid "$@" </dev/null >"$RUN/$name.log" 2>&1 &
    echo $! >"$RUN/$name.pid"
}

stop_all() {  # SIGTERM to the view and every service, SIGKILL after 10 s, then the stack
    local name pids=() deadline
    for name in view generator capture processor; do
        if running_pid "$name"; then
            pids+=("$(cat "$RUN/$name.pid")")
            kill -TERM "${pids[-1]}" 2>/dev/null || true
        fi
    done
    deadline=$((SECONDS + 10))
    for pid in "${pids[@]}"; do
        while alive "$pid"; do
            if [ $SECONDS -ge $deadline ]; then
                say "pid $pid did not stop after SIGTERM; killing it"
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.1
        done
    done
    for name in view "${NAMES[@]}"; do rm -f "$RUN/$name.pid"; done
    "$PY" -m local_stack down --dir "$RUN" >/dev/null || true
}

up() {
    # Live capture opens an AF_PACKET socket: root, or CAP_NET_RAW on the interpreter.
    if ! "$PY" -c 'import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW).close()' \
            2>/dev/null; then
        say "live capture needs root (a packet capture socket, CAP_NET_RAW): run it as root, e.g. sudo make demo"
        exit 1
    fi
    mkdir -p "$RUN"
    local name
    for name in view "${NAMES[@]}"; do
        if running_pid "$name"; then
            say "already running ($name pid $(cat "$RUN/$name.pid")); \`make demo-down\` stops it"
            exit 1
        fi
    done
    rm -f "$STOPPING"
    trap 'stop_all; echo >&2; say "stopped"; exit 0' INT TERM HUP

    # local_stack reads KAFKA_PORT / REDIS_PORT: a port chosen there must be free, a default
    # one that is taken gives way to a free port (and local_stack says which)
    local fallback=() stack
    [ -n "${KAFKA_PORT:-}" ] || fallback+=(--any-port-if-taken kafka)
    [ -n "${REDIS_PORT:-}" ] || fallback+=(--any-port-if-taken redis)
    if ! stack=$("$PY" -m local_stack up --dir "$RUN" --redis-users "${fallback[@]}"); then
        say "the broker and Redis did not start (the line above says why)"
        exit 1
    fi
    eval "$(sed 's/^/export /' <<<"$stack")"
    export IFACE="${IFACE:-lo}"
    local kport=${KAFKA_BOOTSTRAP_SERVERS##*:} rport=${REDIS_URL##*:}
    rport=${rport%%/*}
    local redis_at=${REDIS_URL##*@}
    # do not capture the pipeline's own broker and Redis traffic
    export BPF_FILTER="${BPF_FILTER:-not (tcp port $kport or tcp port $rport)}"

    start_bg processor "$PY" -m flow_processor
    start_bg capture "$PY" -m capture
    MODE=mix RATE_PER_SECOND="${RATE_PER_SECOND:-500}" start_bg generator "$PY" -m traffic_generator
    say "broker $KAFKA_BOOTSTRAP_SERVERS, Redis redis://$redis_at (users and passwords in $RUN/redis.users), capture on $IFACE; logs in $RUN/"
    say "Ctrl-C or \`make demo-down\` stops everything"

    local watch=()
    for name in "${NAMES[@]}"; do watch+=(--watch "$name"); done
    "$PY" -m dpi_top --redis-url "$REDIS_READER_URL" --run-dir "$RUN" "${watch[@]}" &
    echo $! >"$RUN/view.pid"
    wait $! || true
    if [ -f "$STOPPING" ]; then
        say "stopped by \`make demo-down\`"
        exit 0
    fi
    say "the view ended; stopping"  # it crashed, or was killed by hand
    stop_all
    say "stopped"
}

down() {
    mkdir -p "$RUN"
    : >"$STOPPING"
    stop_all
    say "stopped (nothing left running from $RUN)"
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
