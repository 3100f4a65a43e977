"""Who may do what: Redis ACL users, Kafka client security, Kafka ACLs, the deployment check.

One place for the rules that docker-compose.yml spells out, local_stack starts Redis with and
the tests check (tests/unit/test_compose.py compares compose with these functions):

- Redis: `redis_users` / `redis_server_args`. Four users: `default` disabled (no password, no
  commands), `admin` (everything), `processor` (what the flow processor runs: reads, writes,
  transactions, its Lua script, TS.*; nothing administrative or destructive such as FLUSHDB,
  CONFIG, KEYS, SHUTDOWN, ACL, MODULE, DEBUG) and `grafana` (read commands only, including the
  TS.* reads the dashboards send; no write can succeed whatever query a dashboard holds).
- Kafka clients: `KafkaSecuritySettings` (a pydantic-settings base the services' settings
  classes extend) and `kafka_client_config`, the librdkafka keys to merge into every Producer,
  Consumer and AdminClient configuration.
- Kafka ACLs: `kafka_acl_bindings` (capture may only produce to the packets topic, the
  processor may only consume it and write the dead-letter topic) and `ensure_kafka_acls`, run
  by kafka-init with the admin (super) user after it created the topics.
- `python -m packet_records.security check`: compose's one-shot `preflight` service. It refuses
  to let the stack start with ports published beyond the loopback address while any password is
  still its documented local default, and checks what compose cannot (password characters,
  Redis maxmemory under the container's memory limit). One line and exit 2 when it refuses.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# ---------------------------------------------------------------------------------------------
# Redis

REDIS_ADMIN, REDIS_PROCESSOR, REDIS_GRAFANA = "admin", "processor", "grafana"

# RedisTimeSeries (1.12 in Redis Stack 7.4) registers its commands without ACL categories, so
# +@read / +@write do not reach them: they are named one by one. Its read commands also declare
# their key as read-write, so a read-only key pattern (%R~*) would refuse TS.RANGE and TS.GET:
# every user gets all keys, and the command rules are what keep `grafana` read-only.
TS_READ_COMMANDS = ("ts.range", "ts.revrange", "ts.mrange", "ts.mrevrange", "ts.get", "ts.mget",
                    "ts.info", "ts.queryindex")
TS_WRITE_COMMANDS = ("ts.create", "ts.alter", "ts.add", "ts.madd", "ts.incrby", "ts.decrby",
                     "ts.del", "ts.createrule", "ts.deleterule")

# Rules are applied left to right. No rule holds a shell glob character (allkeys, not ~*), so
# they survive a shell that splits and globs them (the image's REDIS_ARGS does both).
REDIS_RULES: dict[str, tuple[str, ...]] = {
    REDIS_ADMIN: ("allkeys", "allchannels", "+@all"),
    # The flow processor: MGET/SET of its offsets, WATCH/MULTI/EXEC, RPUSH/LPOP/LLEN of its
    # journal, HINCRBY/HSETNX/HSET, ZMSCORE/ZADD/ZINCRBY/ZREMRANGEBYRANK, EXPIRE/PERSIST/EXISTS,
    # EVALSHA/SCRIPT LOAD of top.lua + journal.lua (their calls are checked against these too),
    # TS.CREATE/ADD/MADD/INFO, PING, SELECT, CLIENT SETNAME/SETINFO. -@dangerous takes away
    # FLUSHDB, FLUSHALL, KEYS, CONFIG, SHUTDOWN, DEBUG, MODULE, ACL, MONITOR, REPLICAOF, SAVE,
    # CLIENT KILL/LIST and INFO (given back: it only reads server statistics).
    REDIS_PROCESSOR: ("allkeys", "-@all", "+@read", "+@write", "+@connection", "+@transaction",
                      "+@scripting", "-@dangerous", "-@admin", "-function", "+info",
                      *(f"+{c}" for c in TS_READ_COMMANDS + TS_WRITE_COMMANDS)),
    # Grafana's redis-datasource: PING (health check), the dashboards' TS.RANGE/TS.MRANGE/
    # TS.GET/TS.MGET, ZRANGE/ZREVRANGE, HGETALL/HMGET/HGET, GET/MGET, SCAN/TYPE/TTL, INFO,
    # CLIENT SETNAME/GETNAME/ID. Nothing that writes, no scripts, no transactions.
    REDIS_GRAFANA: ("allkeys", "-@all", "+@read", "+@connection", "-@dangerous", "+info",
                    *(f"+{c}" for c in TS_READ_COMMANDS)),
}


@dataclass(frozen=True)
class RedisUser:
    name: str
    password: str | None  # None: the user has no password and is off (the `default` user)
    rules: tuple[str, ...] = ()

    def acl_rules(self) -> list[str]:
        """What follows the name in `ACL SETUSER name ...`, `--user name ...` or `user name ...`.

        `reset` first: off, no password (and no nopass), no keys, no channels, -@all; so a
        user is exactly what its rules say, whatever it was before."""
        if self.password is None:
            return ["reset"]
        return ["reset", "on", f">{self.password}", *self.rules]

    def config_line(self) -> str:
        """The user as a redis.conf / ACL file line."""
        return " ".join(["user", self.name, *self.acl_rules()])


def redis_users(admin_password: str, processor_password: str,
                grafana_password: str) -> list[RedisUser]:
    """The Redis users of the pipeline, `default` first (disabled)."""
    passwords = {REDIS_ADMIN: admin_password, REDIS_PROCESSOR: processor_password,
                 REDIS_GRAFANA: grafana_password}
    for name, password in passwords.items():
        if not password or any(c.isspace() for c in password):
            raise ValueError(f"the password of Redis user {name!r} must be non-empty, "
                             "without spaces")
    return [RedisUser("default", None)] + [
        RedisUser(name, passwords[name], REDIS_RULES[name]) for name in passwords
    ]


def redis_server_args(admin_password: str, processor_password: str,
                      grafana_password: str) -> list[str]:
    """redis-server command-line arguments: protected mode on and the ACL users.

    Each element is one argv entry (no shell): redis-server quotes them itself, so a password
    reaches the server exactly as given."""
    args = ["--protected-mode", "yes"]
    for user in redis_users(admin_password, processor_password, grafana_password):
        args += ["--user", user.name, *user.acl_rules()]
    return args


def redis_url(username: str, password: str, host: str = "localhost", port: int = 6379,
              db: int = 0, *, tls: bool = False) -> str:
    """A redis:// URL with credentials, the password percent-encoded (redis-py decodes it)."""
    scheme = "rediss" if tls else "redis"
    return f"{scheme}://{quote(username, safe='')}:{quote(password, safe='')}@{host}:{port}/{db}"


def redact_url(url: str) -> str:
    """The URL with its password replaced by ***, for log lines and error messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return re.sub(r"//[^@/]*@", "//***@", url)


# ---------------------------------------------------------------------------------------------
# Kafka clients

KAFKA_ADMIN, KAFKA_CAPTURE, KAFKA_PROCESSOR = "admin", "capture", "processor"
SASL_PROTOCOLS = ("sasl_plaintext", "sasl_ssl")


class KafkaSecuritySettings(BaseSettings):
    """Kafka client security from the environment; extend it instead of BaseSettings.

    KAFKA_SECURITY_PROTOCOL plaintext (default) | sasl_plaintext | sasl_ssl,
    KAFKA_SASL_MECHANISM PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512, KAFKA_SASL_USERNAME,
    KAFKA_SASL_PASSWORD (both required with SASL), KAFKA_SSL_CA_LOCATION (sasl_ssl: CA file of
    the broker's certificate; empty = the system's CAs)."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    kafka_security_protocol: Literal["plaintext", "sasl_plaintext", "sasl_ssl"] = Field(
        "plaintext", description="Kafka security: plaintext, sasl_plaintext or sasl_ssl")
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "PLAIN", description="SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512")
    kafka_sasl_password: SecretStr = Field(
        "", validate_default=True, description="SASL password (required with SASL)")
    # After the password, so that its check sees the password (and never echoes it).
    kafka_sasl_username: str = Field(
        "", validate_default=True, description="SASL user name (required with SASL)")
    kafka_ssl_ca_location: str = Field(
        "", description="sasl_ssl: CA certificate file of the broker (empty: system CAs)")

    @field_validator("kafka_security_protocol", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("kafka_sasl_mechanism", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper().replace("_", "-") if isinstance(value, str) else value

    @field_validator("kafka_sasl_username")
    @classmethod
    def _credentials_with_sasl(cls, username: str, info: ValidationInfo) -> str:
        protocol = info.data.get("kafka_security_protocol")
        password = info.data.get("kafka_sasl_password")
        if protocol in SASL_PROTOCOLS and not (
                username and password is not None and password.get_secret_value()):
            raise ValueError(f"KAFKA_SECURITY_PROTOCOL={protocol} needs KAFKA_SASL_USERNAME "
                             "and KAFKA_SASL_PASSWORD (one or both are empty)")
        return username


def kafka_client_config(settings: Any) -> dict[str, str]:
    """librdkafka settings for the client security of `settings` (a KafkaSecuritySettings or
    anything with the same attributes): merge into every Producer/Consumer/AdminClient config."""
    protocol = settings.kafka_security_protocol
    config = {"security.protocol": protocol}
    if protocol in SASL_PROTOCOLS:
        password = settings.kafka_sasl_password
        if isinstance(password, SecretStr):
            password = password.get_secret_value()
        config.update({
            "sasl.mechanism": settings.kafka_sasl_mechanism,
            "sasl.username": settings.kafka_sasl_username,
            "sasl.password": password,
        })
    if protocol == "sasl_ssl" and getattr(settings, "kafka_ssl_ca_location", ""):
        config["ssl.ca.location"] = settings.kafka_ssl_ca_location
    return config


# ---------------------------------------------------------------------------------------------
# Kafka ACLs (the broker's StandardAuthorizer; kafka-init creates them as the super user)


def kafka_acl_bindings(packets_topic: str, group_id: str, capture_user: str = KAFKA_CAPTURE,
                       processor_user: str = KAFKA_PROCESSOR) -> list:
    """The ACLs of the pipeline's Kafka users (confluent_kafka AclBinding objects).

    capture: WRITE the packets topic (the idempotent producer needs nothing more on Kafka 3+;
    IDEMPOTENT_WRITE on the cluster is added for older brokers), DESCRIBE the dead-letter topic
    (its start-up topic check lists both topics; DESCRIBE does not let it read or write).
    processor: READ the packets topic, READ groups whose id starts with KAFKA_GROUP_ID (its
    group and its `<group>.watermarks` client), WRITE the dead-letter topic (idempotent
    producer). READ and WRITE imply DESCRIBE. No one else gets anything but the super user."""
    from confluent_kafka.admin import (
        AclBinding,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
    )

    deadletter = f"{packets_topic}.deadletter"
    allow = AclPermissionType.ALLOW

    def acl(restype, name, pattern, user, operation):
        return AclBinding(restype, name, pattern, f"User:{user}", "*", operation, allow)

    topic, group, cluster = ResourceType.TOPIC, ResourceType.GROUP, ResourceType.BROKER
    literal, prefixed = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED
    return [
        acl(topic, packets_topic, literal, capture_user, AclOperation.WRITE),
        acl(topic, packets_topic, literal, capture_user, AclOperation.DESCRIBE),
        acl(topic, deadletter, literal, capture_user, AclOperation.DESCRIBE),
        acl(cluster, "kafka-cluster", literal, capture_user, AclOperation.IDEMPOTENT_WRITE),
        acl(topic, packets_topic, literal, processor_user, AclOperation.READ),
        acl(group, group_id, prefixed, processor_user, AclOperation.READ),
        acl(topic, deadletter, literal, processor_user, AclOperation.WRITE),
        acl(cluster, "kafka-cluster", literal, processor_user, AclOperation.IDEMPOTENT_WRITE),
    ]


def ensure_kafka_acls(admin: Any, bindings: Iterable, timeout: float = 30.0) -> int:
    """Create the ACLs (creating one that exists is a no-op on the broker); return how many.

    Raises StartupError naming the first refused binding: a broker without an authorizer
    answers SECURITY_DISABLED, which means the broker was not configured for ACLs.
    Call it only against a real Kafka broker with SASL (kafka-init in compose): Tansu 0.6
    (local_stack) has no authorizer, and librdkafka 2.16 aborts the whole process on its reply
    to CreateAcls (assertion in rd_kafka_admin_response_parse)."""
    from confluent_kafka import KafkaException

    from packet_records.runtime import StartupError

    bindings = list(bindings)
    if not bindings:
        return 0
    try:
        futures = admin.create_acls(bindings, request_timeout=timeout)
    except KafkaException as exc:
        raise StartupError(f"cannot create Kafka ACLs: {exc.args[0]}") from None
    for binding, future in futures.items():
        try:
            future.result()
        except KafkaException as exc:
            raise StartupError(f"cannot create Kafka ACL {binding}: {exc.args[0]}") from None
    return len(bindings)


# ---------------------------------------------------------------------------------------------
# The deployment check (compose's preflight service)

# Every password compose uses, with the default it falls back to when .env does not set it.
# These defaults are public (they are in this file and in docker-compose.yml): they are only
# accepted while every published port is bound to the loopback address.
LOCAL_DEFAULTS: dict[str, str] = {
    "GF_SECURITY_ADMIN_PASSWORD": "admin",
    "REDIS_ADMIN_PASSWORD": "dpi-local-redis-admin",
    "REDIS_PROCESSOR_PASSWORD": "dpi-local-redis-processor",
    "REDIS_GRAFANA_PASSWORD": "dpi-local-redis-grafana",
    "KAFKA_ADMIN_PASSWORD": "dpi-local-kafka-admin",
    "KAFKA_CAPTURE_PASSWORD": "dpi-local-kafka-capture",
    "KAFKA_PROCESSOR_PASSWORD": "dpi-local-kafka-processor",
}
MIN_PASSWORD_LENGTH = 12
# Redis and Kafka passwords go into a redis:// URL, a JAAS configuration and redis-server's
# argv: URL-unreserved characters pass through all of them unchanged.
SAFE_PASSWORD = re.compile(r"[A-Za-z0-9._~-]+")
SAFE_PASSWORD_TEXT = "letters, digits and - . _ ~"
MAXMEMORY_SHARE = 0.8  # Redis maxmemory at most this share of its container's memory limit


def is_loopback(address: str) -> bool:
    address = address.strip().strip("[]")
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


_DOCKER_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_REDIS_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1024, "m": 1000**2, "mb": 1024**2,
                "g": 1000**3, "gb": 1024**3}


def parse_size(text: str, units: Mapping[str, int]) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in units:
        raise ValueError(f"{text!r} is not a size")
    return int(float(match.group(1)) * units[match.group(2).lower()])


def check_deployment(env: Mapping[str, str]) -> list[str]:
    """What stops the stack from starting with this environment (empty: nothing).

    A variable absent from `env` counts as its local default, as compose fills it in."""
    problems = []
    bind = env.get("BIND_ADDRESS") or "127.0.0.1"
    passwords = {name: env.get(name) or default for name, default in LOCAL_DEFAULTS.items()}
    for name, value in passwords.items():
        if name.startswith("GF_"):
            continue  # Grafana's own password goes nowhere but Grafana's environment
        if not SAFE_PASSWORD.fullmatch(value):
            problems.append(f"{name} may hold only {SAFE_PASSWORD_TEXT} (it goes into URLs "
                            "and Kafka's JAAS configuration)")
    if not is_loopback(bind):
        weak = [name for name, value in passwords.items()
                if value == LOCAL_DEFAULTS[name] or len(value) < MIN_PASSWORD_LENGTH]
        if weak:
            problems.append(
                f"BIND_ADDRESS={bind} publishes Grafana, Redis and Kafka beyond this host: set "
                f"{', '.join(weak)} in .env first ({MIN_PASSWORD_LENGTH}+ characters, not the "
                "local defaults)")
    limit, maxmemory = env.get("REDIS_MEM_LIMIT"), env.get("REDIS_MAXMEMORY")
    if limit and maxmemory:
        try:
            limit_bytes = parse_size(limit, _DOCKER_UNITS)
            max_bytes = parse_size(maxmemory, _REDIS_UNITS)
        except ValueError as exc:
            problems.append(f"REDIS_MEM_LIMIT / REDIS_MAXMEMORY: {exc}")
        else:
            if max_bytes == 0 or max_bytes > MAXMEMORY_SHARE * limit_bytes:
                problems.append(
                    f"REDIS_MAXMEMORY={maxmemory} must be above 0 and at most "
                    f"{int(MAXMEMORY_SHARE * 100)}% of REDIS_MEM_LIMIT={limit} (room for the "
                    "append-only file rewrite and client buffers)")
    return problems


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os

    parser = argparse.ArgumentParser(
        prog="python -m packet_records.security",
        description="check: compose's preflight. Refuses (one line, exit 2) published ports "
                    "beyond the loopback address while a password is still its local default, "
                    "passwords that cannot go into URLs/JAAS, and REDIS_MAXMEMORY above 80% "
                    "of REDIS_MEM_LIMIT.",
        epilog="environment variables: BIND_ADDRESS, REDIS_MEM_LIMIT, REDIS_MAXMEMORY, "
               + ", ".join(LOCAL_DEFAULTS))
    parser.add_argument("command", choices=["check"])
    parser.parse_args(argv)
    problems = check_deployment(os.environ)
    if problems:
        print(f"preflight: refusing to start: {'; '.join(problems)}", file=sys.stderr)
        return 2
    bind = os.environ.get("BIND_ADDRESS") or "127.0.0.1"
    print(f"preflight: ok (ports bound to {bind})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
