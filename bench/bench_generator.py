"""Benchmark of the traffic generator's pacing: `python bench/bench_generator.py [seconds]`.

For each target rate it runs `python -m traffic_generator` (udp mode) for a few seconds against
a UDP sink on 127.0.0.1 that counts datagrams in another process, then prints the rate the
sender achieved, the rate the sink received, and their error against the target. It prints;
it asserts nothing.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RATES = (1000, 5000, 20000, 50000, 100000, 200000)
PAYLOAD_SIZE = 1300
TOLERANCE = 0.02


def sink(sock: socket.socket, control) -> None:
    """Count datagrams until told to stop, then drain what is queued and report the count."""
    buffer = bytearray(65536)
    recv_into = sock.recv_into
    received = 0
    sock.settimeout(0.1)
    while not control.poll():
        try:
            while True:
                recv_into(buffer)
                received += 1
        except TimeoutError:
            pass
    control.recv()
    sock.setblocking(False)
    try:
        while True:
            recv_into(buffer)
            received += 1
    except BlockingIOError:
        pass
    control.send(received)


def run_once(rate: int, seconds: float) -> dict:
    """One generator run at `rate`; the sender's final line plus what the sink counted."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    ours, theirs = multiprocessing.Pipe()
    counter = multiprocessing.get_context("fork").Process(target=sink, args=(sock, theirs),
                                                          daemon=True)
    counter.start()
    sock.close()
    env = dict(os.environ, MODE="udp", RATE_PER_SECOND=str(rate), DURATION_S=str(seconds),
               COUNT="0", TARGET_HOST="127.0.0.1", TARGET_PORT=str(port),
               PAYLOAD_SIZE=str(PAYLOAD_SIZE), LOG_LEVEL="WARNING")
    done = subprocess.run([sys.executable, "-m", "traffic_generator"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=seconds + 60)
    ours.send("stop")
    received = ours.recv()
    counter.join()
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines or not lines[-1].startswith("final "):
        raise SystemExit(f"generator failed at {rate}/s (rc {done.returncode}): "
                         f"{done.stderr.strip()}")
    final = dict(item.split("=", 1) for item in lines[-1].split()[1:])
    secs = float(final["seconds"])
    return {"target": rate, "sent": int(final["sent"]), "errors": int(final["errors"]),
            "seconds": secs, "sent_rate": int(final["sent"]) / secs,
            "received": received, "received_rate": received / secs}


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    print(f"traffic_generator udp pacing: {PAYLOAD_SIZE}-byte datagrams to a loopback sink, "
          f"{seconds:g} s per rate, {os.cpu_count()} CPUs")
    header = (f"{'target/s':>9} {'sent/s':>10} {'sender err%':>11} {'received/s':>11} "
              f"{'recv err%':>9} {'lost%':>6} {'send errors':>11}")
    print(header)
    print("-" * len(header))
    held = None
    for rate in RATES:
        r = run_once(rate, seconds)
        sender_err = (r["sent_rate"] - rate) / rate * 100
        recv_err = (r["received_rate"] - rate) / rate * 100
        lost = (r["sent"] - r["received"]) / r["sent"] * 100 if r["sent"] else 0.0
        print(f"{rate:>9} {r['sent_rate']:>10.0f} {sender_err:>+11.2f} {r['received_rate']:>11.0f}"
              f" {recv_err:>+9.2f} {lost:>6.2f} {r['errors']:>11}", flush=True)
        if abs(sender_err) <= TOLERANCE * 100 and abs(recv_err) <= TOLERANCE * 100:
            held = rate
    print(f"highest rate held within {TOLERANCE:.0%} (sender and receiver): "
          f"{held if held is not None else 'none'}{'/s' if held else ''}")


if __name__ == "__main__":
    main()
