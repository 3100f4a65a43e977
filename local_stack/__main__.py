"""python -m local_stack up|down|status [--dir D]

``up`` starts the Kafka-protocol broker and Redis (with RedisTimeSeries) detached, so they outlive
this command, and prints ``KAFKA_BOOTSTRAP_SERVERS=...`` and ``REDIS_URL=...`` on stdout
(usable as ``export $(python -m local_stack up)``).  A port that is taken stops ``up`` with one
line naming it, unless ``--any-port-if-taken NAME`` lets that server take a free port instead
(and say so).
``down`` stops them via the pid files.
"""

from __future__ import annotations

import argparse
import os
import sys

from local_stack import services as s

ENV_NAMES = {"kafka": "KAFKA_BOOTSTRAP_SERVERS", "redis": "REDIS_URL"}


OPTIONS = {"kafka": "KAFKA_PORT=N or --kafka-port N", "redis": "REDIS_PORT=N or --redis-port N"}


def choose_port(name: str, port: int | None, any_if_taken: bool) -> int | None:
    """The port to start `name` on (None: any free one); ServiceError when it is taken."""
    if not port or s.port_free(port):
        return port
    if any_if_taken:
        print(f"{name}: port {port} on 127.0.0.1 is taken; using a free port instead "
              f"({OPTIONS[name]} chooses one)", file=sys.stderr)
        return None
    raise s.ServiceError(f"{name}: port {port} on 127.0.0.1 is taken by another program; "
                         f"choose another with {OPTIONS[name]} (0: any free port)")


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
                port = choose_port(name, ports[name], name in args.any_port_if_taken)
                svc = start(port, args.dir, detach=True)
                started.append(svc)
                print(f"{name}: started (pid {svc.pid}, log {svc.log_path})", file=sys.stderr)
            lines.append(f"{ENV_NAMES[name]}={svc.url}")
    except (s.ServiceError, KeyboardInterrupt) as e:
        for svc in started:  # all or nothing
            svc.stop()
        print(f"local_stack: {e or 'interrupted'}", file=sys.stderr)
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
            c.add_argument("--kafka-port", type=int,
                           default=os.environ.get("KAFKA_PORT") or "9092",
                           help="default $KAFKA_PORT or %(default)s; 0 = any free port")
            c.add_argument("--redis-port", type=int,
                           default=os.environ.get("REDIS_PORT") or "6379",
                           help="default $REDIS_PORT or %(default)s; 0 = any free port")
            c.add_argument("--any-port-if-taken", action="append", default=[],
                           choices=list(ENV_NAMES), metavar="NAME",
                           help="kafka or redis (repeatable): when its port is taken, use a "
                                "free one (and say so)")
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
