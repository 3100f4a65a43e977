"""Every Python service of docker-compose.yml's default profile, run with the environment compose
gives it and nothing set by the user, starts: the one-shot services exit 0, the long-running
ones are still running after a while. Only what points at servers is replaced by the test's
(the local broker speaks plaintext Kafka and its Redis has no users: see README, Security)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.pipeline import REPO, compose_config

pytestmark = pytest.mark.integration

SERVER_SETTINGS = re.compile(r"^(KAFKA_BOOTSTRAP_SERVERS|REDIS_URL|KAFKA_SECURITY_PROTOCOL"
                             r"|KAFKA_SASL_\w+|KAFKA_SSL_\w+)$")


def dockerfile_command(service: dict) -> list[str]:
    text = (REPO / service["build"]["dockerfile"]).read_text()
    return json.loads(re.findall(r"^CMD (\[.*\])$", text, re.M)[-1])


def test_every_python_service_starts_with_its_compose_defaults(pipeline_env, tmp_path):
    config = compose_config(tmp_path)
    python_services = {name: svc for name, svc in config["services"].items()
                       if "build" in svc and "profiles" not in svc}
    assert {"preflight", "kafka-init", "flow-processor", "capture"} <= set(python_services)
    procs = {}
    for name, service in sorted(python_services.items()):
        env = {key: "" if value is None else str(value)
               for key, value in (service.get("environment") or {}).items()
               if not SERVER_SETTINGS.match(key)}
        env.update(PATH=os.environ["PATH"], PYTHONPATH=str(REPO),
                   KAFKA_BOOTSTRAP_SERVERS=pipeline_env["KAFKA_BOOTSTRAP_SERVERS"],
                   REDIS_URL=pipeline_env["REDIS_URL"])
        if "KAFKA_TOPIC" in env:  # our own topic, so that other tests' data stays apart
            env["KAFKA_TOPIC"] = pipeline_env["KAFKA_TOPIC"]
        command = service.get("command") or dockerfile_command(service)
        assert command[0] == "python"
        log = tmp_path / f"{name}.log"
        with open(log, "w") as fh:
            procs[name] = (subprocess.Popen([sys.executable, *command[1:]], env=env, cwd=REPO,
                                            stdout=fh, stderr=subprocess.STDOUT), log)
        if service.get("restart") == "no" or name in ("preflight", "kafka-init"):
            code = procs[name][0].wait(60)
            assert code == 0, f"{name} exited {code}: {log.read_text()[-2000:]}"
    time.sleep(8)
    try:
        for name, (proc, log) in procs.items():
            if name in ("preflight", "kafka-init"):
                continue
            assert proc.poll() is None, f"{name} exited at start: {log.read_text()[-2000:]}"
    finally:
        for proc, _log in procs.values():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
