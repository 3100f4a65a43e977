"""python -m local_stack up|down|status [--dir D]

``up`` starts the Kafka-protocol broker and Redis (with RedisTimeSeries) detached, so they outlive
this command, and prints ``KAFKA_BOOTSTRAP_SERVERS=...`` and ``REDIS_URL=...`` on stdout
(usable as ``export $(python -m local_stack up)``).  ``down`` stops them via the pid files.
"""

from __future__ import annotations

import argparse
import sys

from local_stack import services as s

ENV_NAMES = {"kafka": "KAFKA_BOOTSTRAP_SERVERS", "redis": "REDIS_URL"}


def up(args) -> int:
    ports = {"kafka": args.kafka_port or None, "redis": args.redis_port or None}
    starters = {"kafka": s.start_kafka, "redis": s.start_redis}
    started, lines = [], []
    try:
        for name, start in starters.items():
            svc = s.recorded(name, args.dir)
            if svc is not None:
                print(f"{name}: already running (pid {svc.pid})", file=sys.stderr)
            else:
                svc = start(ports[name], args.dir, detach=True)
                started.append(svc)
                print(f"{name}: started (pid {svc.pid}, log {svc.log_path})", file=sys.stderr)
            lines.append(f"{ENV_NAMES[name]}={svc.url}")
    except s.ServiceError as e:
        for svc in started:  # all or nothing
            svc.stop()
        print(f"local_stack: {e}", file=sys.stderr)
        return 1
    print("\n".join(lines))  # only on success, so `export $(...)` never gets half a stack
    return 0


def down(args) -> int:
    for name in ENV_NAMES:
        stopped = s.stop_recorded(name, args.dir)
        print(f"{name}: {'stopped' if stopped else 'not running'}")
    return 0


def status(args) -> int:
    running = 0
    for name, env_name in ENV_NAMES.items():
        svc = s.recorded(name, args.dir)
        if svc is None:
            print(f"{name}: not running")
        else:
            running += 1
            print(f"{name}: running pid {svc.pid} {env_name}={svc.url}")
    return 0 if running == len(ENV_NAMES) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m local_stack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn in (("up", up), ("down", down), ("status", status)):
        c = sub.add_parser(name)
        c.add_argument(
            "--dir",
            default=str(s.DEFAULT_WORKDIR),
            help="where pid files, logs and data go (default: %(default)s)",
        )
        c.set_defaults(fn=fn)
        if name == "up":
            c.add_argument("--kafka-port", type=int, default=9092, help="0 = any free port")
            c.add_argument("--redis-port", type=int, default=6379, help="0 = any free port")
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
