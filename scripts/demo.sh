#!/usr/bin/env bash
# `make demo`: the pipeline as local processes, where there is no Docker engine.
# Starts the embedded Kafka-protocol broker and Redis Stack (python -m local_stack), the flow
# processor, live capture on $IFACE (default lo), and the traffic generator in mix mode, then
# prints the per-second figures from Redis. `make demo-down` (or Ctrl-C) stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
RUN=.run
mkdir -p "$RUN"

start_bg() {  # name, command...: run detached, pid in .run/<name>.pid, log in .run/<name>.log
    local name=$1; shift
    nohup "$@" >"$RUN/$name.log" 2>&1 &
    echo $! >"$RUN/$name.pid"
    echo "demo: started $name (pid $!, log $RUN/$name.log)"
}

stop_bg() {
    local f
    for f in "$RUN"/generator.pid "$RUN"/capture.pid "$RUN"/processor.pid; do
        [ -f "$f" ] || continue
        kill "$(cat "$f")" 2>/dev/null || true
        rm -f "$f"
    done
    sleep 1
    $PY -m local_stack down --dir "$RUN" || true
}

case "${1:-up}" in
  up)
    eval "$($PY -m local_stack up --dir "$RUN" | sed 's/^/export /')"
    export IFACE="${IFACE:-lo}"
    kport=${KAFKA_BOOTSTRAP_SERVERS##*:}; rport=${REDIS_URL##*:}; rport=${rport%%/*}
    # do not capture the pipeline's own broker and Redis traffic
    export BPF_FILTER="${BPF_FILTER:-not (tcp port $kport or tcp port $rport)}"
    start_bg processor $PY -m flow_processor
    start_bg capture $PY -m capture
    MODE=mix RATE_PER_SECOND="${RATE_PER_SECOND:-500}" start_bg generator $PY -m traffic_generator
    trap 'echo; stop_bg; exit 0' INT TERM
    echo "demo: Ctrl-C stops everything. Redis: $REDIS_URL"
    while true; do
        sleep 5
        $PY - <<'PY' || true
import os, redis
r = redis.Redis.from_url(os.environ["REDIS_URL"], decode_responses=True)
def last(key):
    try:
        return r.execute_command("TS.GET", key) or [0, 0]
    except redis.ResponseError:
        return [0, 0]
ts, bps = last("ts:global:bps")
_, pps = last("ts:global:pps")
protos = {p: last(f"ts:protocol:{p}:pps")[1] for p in ("TCP", "UDP", "ICMP", "ICMPV6", "OTHER")}
top = r.zrevrange("flows:top:bytes", 0, 2, withscores=True)
talkers = []
for fid, score in top:
    m = r.hgetall(f"flow:{fid}:meta")
    talkers.append(f"{m.get('src')}:{m.get('sport')}->{m.get('dst')}:{m.get('dport')} {int(score)}B")
print(f"second {int(ts) // 1000}: {float(bps) * 8 / 1e6:.2f} Mbit/s {float(pps):.0f} pkt/s "
      f"{protos} top: {talkers}")
PY
    done
    ;;
  down) stop_bg ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
