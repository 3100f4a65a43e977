"""docker-compose.yml as compose resolves it (`docker-compose config --format json`, offline):
every container confined, ports on the loopback address by default, authentication wired with
the rules of packet_records/security.py, size retention on the topics, and a stack published
beyond the loopback address with default passwords refused before anything starts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from packet_records import security
from packet_records.security import (
    LOCAL_DEFAULTS,
    KafkaSecuritySettings,
    check_deployment,
    kafka_client_config,
    parse_size,
    redis_server_args,
)

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_BIN = ROOT / ".venv" / "bin" / "docker-compose"
SECRETS = list(LOCAL_DEFAULTS)
STRONG = {name: f"{name.lower().replace('_', '-')}-0123456789abcdef" for name in SECRETS}
# Services that may keep a writable root filesystem, and why (see docker-compose.yml).
WRITABLE_ROOT = {"kafka": "the image's start script writes /opt/kafka/config at every start"}
CAPABILITIES = {"capture": ["NET_RAW"]}  # everything else runs with none


def compose_config(tmp_path_factory, **env: str) -> dict:
    """The resolved configuration (load-test profile included) under a clean environment:
    no .env, no variable of the caller's shell, only `env`."""
    compose = COMPOSE_BIN if COMPOSE_BIN.exists() else Path(sys.executable).with_name(
        "docker-compose")
    if not compose.exists():
        pytest.skip("docker-compose binary not installed (pip install -e '.[dev]')")
    empty = tmp_path_factory.mktemp("env") / "empty.env"
    empty.write_text("")
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
             "HOME": str(tmp_path_factory.mktemp("home")), **env}
    proc = subprocess.run(
        [str(compose), "-f", str(ROOT / "docker-compose.yml"), "--env-file", str(empty),
         "--profile", "load-test", "config", "--format", "json"],
        capture_output=True, text=True, env=clean, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> dict:
    return compose_config(tmp_path_factory)


@pytest.fixture(scope="module")
def services(config) -> dict:
    return config["services"]


def env_of(services: dict, name: str) -> dict:
    return services[name].get("environment") or {}


def test_every_service_is_confined(services):
    assert {"preflight", "kafka", "kafka-init", "redis", "grafana", "capture", "flow-processor",
            "traffic-generator"} <= set(services)
    for name, svc in services.items():
        assert svc.get("cap_drop") == ["ALL"], name
        assert sorted(svc.get("cap_add") or []) == CAPABILITIES.get(name, []), name
        assert "no-new-privileges:true" in (svc.get("security_opt") or []), name
        assert not svc.get("privileged"), name
        assert svc.get("pid") != "host" and svc.get("ipc") != "host", name
        limit = svc.get("mem_limit") or (
            svc.get("deploy", {}).get("resources", {}).get("limits", {}).get("memory"))
        assert limit and int(limit) > 0, f"{name} has no memory limit"
        if name in WRITABLE_ROOT:
            assert not svc.get("read_only"), f"{name}: update WRITABLE_ROOT"
        else:
            assert svc.get("read_only") is True, f"{name} has a writable root filesystem"
        if svc.get("read_only") and name != "preflight":
            assert "/tmp" in (svc.get("tmpfs") or []), f"{name}: read-only root without /tmp"


def test_published_ports_are_on_the_loopback_address_by_default(services, tmp_path_factory):
    published = {name: svc["ports"] for name, svc in services.items() if svc.get("ports")}
    assert set(published) == {"kafka", "redis", "grafana"}
    for name, ports in published.items():
        for port in ports:
            assert port["host_ip"] == "127.0.0.1", (name, port)
    # ... and BIND_ADDRESS is what moves them (with the passwords preflight asks for)
    opened = compose_config(tmp_path_factory, BIND_ADDRESS="0.0.0.0", **STRONG)["services"]
    assert {p["host_ip"] for name in published for p in opened[name]["ports"]} == {"0.0.0.0"}


def test_every_service_waits_for_preflight(services):
    assert services["preflight"]["command"] == ["python", "-m", "packet_records.security",
                                                "check"]
    assert services["preflight"].get("network_mode") == "none"
    for name, svc in services.items():
        if name != "preflight":
            dep = (svc.get("depends_on") or {}).get("preflight")
            assert dep and dep["condition"] == "service_completed_successfully", name


def test_compose_defaults_are_the_documented_local_defaults(services):
    """preflight judges what every service gets: the same defaults everywhere."""
    pre = env_of(services, "preflight")
    assert {name: pre[name] for name in SECRETS} == LOCAL_DEFAULTS
    assert pre["BIND_ADDRESS"] == "127.0.0.1"
    assert check_deployment(pre) == []


def test_redis_runs_the_acl_rules_of_security_py(services):
    redis = services["redis"]
    assert redis["entrypoint"] == ["/opt/redis-stack/bin/redis-server"]
    command = redis["command"]
    assert command[command.index("--loadmodule") + 1].endswith("/redistimeseries.so")
    acl = command[command.index("--protected-mode"):]
    assert acl == redis_server_args(LOCAL_DEFAULTS["REDIS_ADMIN_PASSWORD"],
                                    LOCAL_DEFAULTS["REDIS_PROCESSOR_PASSWORD"],
                                    LOCAL_DEFAULTS["REDIS_GRAFANA_PASSWORD"])
    assert command[command.index("--appendonly") + 1] == "yes"
    # maxmemory under the container's limit, evicting only keys with a TTL
    assert command[command.index("--maxmemory-policy") + 1].startswith("volatile-")
    maxmemory = parse_size(command[command.index("--maxmemory") + 1], security._REDIS_UNITS)
    assert 0 < maxmemory <= security.MAXMEMORY_SHARE * int(redis["mem_limit"])
    assert env_of(services, "redis")["REDISCLI_AUTH"] == LOCAL_DEFAULTS["REDIS_ADMIN_PASSWORD"]
    assert "--user admin" in redis["healthcheck"]["test"][1]


def test_services_authenticate_to_redis_and_kafka(services):
    kafka = env_of(services, "kafka")
    listeners = dict(item.split(":", 1) for item in
                     kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(listeners.values()) == {"SASL_PLAINTEXT"}, "a listener without authentication"
    assert "CONTROLLER://localhost:9093" in kafka["KAFKA_LISTENERS"].split(",")
    assert kafka["KAFKA_SASL_ENABLED_MECHANISMS"] == "PLAIN"
    assert kafka["KAFKA_AUTHORIZER_CLASS_NAME"] == (
        "org.apache.kafka.metadata.authorizer.StandardAuthorizer")
    assert kafka["KAFKA_SUPER_USERS"] == "User:admin"
    assert kafka["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false"
    users = {"admin": LOCAL_DEFAULTS["KAFKA_ADMIN_PASSWORD"],
             "capture": LOCAL_DEFAULTS["KAFKA_CAPTURE_PASSWORD"],
             "processor": LOCAL_DEFAULTS["KAFKA_PROCESSOR_PASSWORD"]}
    for listener in listeners:
        jaas = kafka[f"KAFKA_LISTENER_NAME_{listener}_PLAIN_SASL_JAAS_CONFIG"]
        assert jaas.startswith("org.apache.kafka.common.security.plain.PlainLoginModule "
                               "required ") and jaas.endswith(";")
        found = dict(re.findall(r'user_(\w+)="([^"]*)"', jaas))
        assert found == users, listener
        assert f'username="admin" password="{users["admin"]}"' in jaas
    # No secret under a KAFKA_ name in the broker's environment: the image would make it a
    # broker property.
    for name, value in kafka.items():
        if name.startswith("KAFKA_") and "JAAS" not in name:
            assert value not in users.values(), name

    clients = {"kafka-init": "admin", "capture": "capture", "flow-processor": "processor"}
    for name, user in clients.items():
        env = env_of(services, name)
        settings = KafkaSecuritySettings(**{k.lower(): v for k, v in env.items()
                                            if k.startswith("KAFKA_")})
        assert kafka_client_config(settings) == {
            "security.protocol": "sasl_plaintext", "sasl.mechanism": "PLAIN",
            "sasl.username": user, "sasl.password": users[user]}, name

    processor = env_of(services, "flow-processor")
    assert processor["REDIS_URL"] == (
        f"redis://processor:{LOCAL_DEFAULTS['REDIS_PROCESSOR_PASSWORD']}@redis:6379/0")
    grafana = env_of(services, "grafana")
    assert grafana["REDIS_GRAFANA_PASSWORD"] == LOCAL_DEFAULTS["REDIS_GRAFANA_PASSWORD"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == LOCAL_DEFAULTS["GF_SECURITY_ADMIN_PASSWORD"]
    assert env_of(services, "kafka-init")["KAFKA_GROUP_ID"] == processor["KAFKA_GROUP_ID"]


def test_passwords_from_the_environment_replace_every_default(tmp_path_factory):
    text = json.dumps(compose_config(tmp_path_factory, **STRONG))
    for name, default in LOCAL_DEFAULTS.items():
        if name != "GF_SECURITY_ADMIN_PASSWORD":  # "admin" is also a user name
            assert default not in text, f"{name}'s default is still used somewhere"
        assert STRONG[name] in text, name
    services = json.loads(text)["services"]
    assert env_of(services, "grafana")["GF_SECURITY_ADMIN_PASSWORD"] == (
        STRONG["GF_SECURITY_ADMIN_PASSWORD"])
    command = services["redis"]["command"]
    assert command[command.index("--protected-mode"):] == redis_server_args(
        STRONG["REDIS_ADMIN_PASSWORD"], STRONG["REDIS_PROCESSOR_PASSWORD"],
        STRONG["REDIS_GRAFANA_PASSWORD"])


def test_grafana_data_source_logs_in_as_the_read_only_user():
    text = (ROOT / "grafana" / "provisioning" / "datasources" / "redis.yaml").read_text()
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    assert "acl: true" in lines
    assert f"user: {security.REDIS_GRAFANA}" in lines
    assert "secureJsonData:" in lines
    assert "password: ${REDIS_GRAFANA_PASSWORD}" in lines


def test_topics_have_size_retention():
    topics = json.loads((ROOT / "kafka" / "topics.json").read_text())
    for name in ("packets", "deadletter"):
        config = topics[name]["config"]
        retention, segment = int(config["retention.bytes"]), int(config["segment.bytes"])
        assert int(config["retention.ms"]) > 0
        assert 0 < segment < retention, name  # whole segments are deleted: segment < bound
        worst = topics[name]["partitions"] * (retention + segment)
        assert worst <= 8 * 1024**3, f"{name} may hold {worst} bytes"


# ---- the refusal ------------------------------------------------------------------------------

def preflight_env(tmp_path_factory, **env: str) -> dict:
    return env_of(compose_config(tmp_path_factory, **env)["services"], "preflight")


def run_check(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "packet_records.security", "check"],
                          env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT),
                               **env},
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_published_beyond_loopback_with_default_passwords_is_refused(tmp_path_factory):
    env = preflight_env(tmp_path_factory, BIND_ADDRESS="0.0.0.0")
    problems = check_deployment(env)
    assert len(problems) == 1 and "BIND_ADDRESS=0.0.0.0" in problems[0]
    for name in SECRETS:
        assert name in problems[0]
    proc = run_check(env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("preflight: refusing to start: "), proc.stderr
    assert proc.stdout == ""

    # one password left at its default is enough to refuse, and it is named
    partly = dict(STRONG, KAFKA_CAPTURE_PASSWORD=LOCAL_DEFAULTS["KAFKA_CAPTURE_PASSWORD"])
    problems = check_deployment(preflight_env(tmp_path_factory, BIND_ADDRESS="0.0.0.0",
                                              **partly))
    assert len(problems) == 1 and "KAFKA_CAPTURE_PASSWORD" in problems[0]
    assert "REDIS_ADMIN_PASSWORD" not in problems[0]


def test_published_beyond_loopback_with_passwords_starts(tmp_path_factory):
    env = preflight_env(tmp_path_factory, BIND_ADDRESS="0.0.0.0", **STRONG)
    assert check_deployment(env) == []
    proc = run_check(env)
    assert proc.returncode == 0, proc.stderr
    assert "0.0.0.0" in proc.stdout


def test_default_run_starts(config):
    proc = run_check(env_of(config["services"], "preflight"))
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("bind, refused", [
    ("127.0.0.1", False), ("127.0.0.2", False), ("::1", False), ("[::1]", False),
    ("localhost", False), ("0.0.0.0", True), ("192.168.1.10", True), ("::", True),
    ("not-an-address", True),
])
def test_only_loopback_addresses_accept_the_local_defaults(bind, refused):
    assert bool(check_deployment({"BIND_ADDRESS": bind})) is refused


def test_short_or_unsafe_passwords_are_refused():
    short = dict(STRONG, REDIS_GRAFANA_PASSWORD="short")
    problems = check_deployment({"BIND_ADDRESS": "0.0.0.0", **short})
    assert len(problems) == 1 and "REDIS_GRAFANA_PASSWORD" in problems[0]
    assert check_deployment({"BIND_ADDRESS": "127.0.0.1", **short}) == []
    for bad in ("pass word", "p@ssword", 'pa"ss', "pa$$", "pass/word"):
        problems = check_deployment({"KAFKA_CAPTURE_PASSWORD": bad})
        assert len(problems) == 1 and problems[0].startswith("KAFKA_CAPTURE_PASSWORD"), bad
    # Grafana's password goes nowhere but Grafana: anything goes there
    assert check_deployment({"BIND_ADDRESS": "0.0.0.0",
                             **dict(STRONG, GF_SECURITY_ADMIN_PASSWORD="p@ss word!/$x")}) == []


@pytest.mark.parametrize("limit, maxmemory, ok", [
    ("2g", "1536mb", True), ("2g", "1gb", True), ("2g", "1700mb", False), ("2g", "2gb", False),
    ("512m", "400mb", True), ("512m", "0", False), ("4g", "3gb", True), ("2g", "lots", False),
])
def test_redis_maxmemory_must_stay_under_the_memory_limit(limit, maxmemory, ok):
    problems = check_deployment({"REDIS_MEM_LIMIT": limit, "REDIS_MAXMEMORY": maxmemory})
    assert (problems == []) is ok, problems
