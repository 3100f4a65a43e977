"""python -m local_stack up|down|status [--dir D]

``up`` starts the Kafka-protocol broker and Redis (with RedisTimeSeries) detached, so they outlive
this command, and prints ``KAFKA_BOOTSTRAP_SERVERS=...`` and ``REDIS_URL=...`` on stdout
(usable as ``export $(python -m local_stack up)``); with ``--redis-users`` Redis requires the
pipeline's users and ``REDIS_URL`` is the processor's, next to ``REDIS_READER_URL`` and
``REDIS_ADMIN_URL``.  A port that is taken stops ``up`` with one
line naming it, unless ``--any-port-if-taken NAME`` lets that server take a free port instead
(and say so).
``down`` stops them via the pid files.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from pathlib import Path

from local_stack import services as s
from packet_records.security import redis_url

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


def redis_passwords(workdir: str) -> dict[str, str]:
    """The Redis users' passwords of this workdir: made once, kept in redis.users (0600)."""
    path = Path(workdir) / "redis.users"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        passwords = {user: secrets.token_hex(16) for user in ("admin", "processor", "grafana")}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(json.dumps(passwords))
        return passwords


def user_urls(url: str, passwords: dict[str, str]) -> list[str]:
    """REDIS_URL (the processor's), REDIS_READER_URL (read only), REDIS_ADMIN_URL lines."""
    host_port = url.split("//", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    return [f"{name}={redis_url(user, passwords[user], host, int(port), 0)}"
            for name, user in (("REDIS_URL", "processor"), ("REDIS_READER_URL", "grafana"),
                               ("REDIS_ADMIN_URL", "admin"))]


def up(args) -> int:
    ports = {"kafka": args.kafka_port or None, "redis": args.redis_port or None}
    passwords = redis_passwords(args.dir) if args.redis_users else None
    starters = {"kafka": s.start_kafka,
                "redis": lambda *a, **k: s.start_redis(*a, passwords=passwords, **k)}
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
            if name == "redis" and passwords:
                lines += user_urls(svc.url, passwords)
            else:
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
            c.add_argument("--redis-users", action="store_true",
                           help="start Redis with the pipeline's ACL users (processor, "
                                "grafana reader, admin; passwords made once and kept in "
                                "<dir>/redis.users) and print their URLs")
            c.add_argument("--any-port-if-taken", action="append", default=[],
                           choices=list(ENV_NAMES), metavar="NAME",
                           help="kafka or redis (repeatable): when its port is taken, use a "
                                "free one (and say so)")
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
