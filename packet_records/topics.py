"""Creating the pipeline's topics from kafka/topics.json when they are missing."""

from __future__ import annotations

import argparse
import logging
import re
import sys

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from packet_records.runtime import (
    StartupError,
    environment_help,
    load_settings,
    topic_definitions,
)
from packet_records.security import (
    KafkaSecuritySettings,
    ensure_kafka_acls,
    kafka_acl_bindings,
    kafka_client_config,
)

log = logging.getLogger(__name__)


class _ClientLog:
    """Takes librdkafka's log lines instead of stderr (a broker that is down would print one
    per retry); keeps the last connection failure, which says why."""

    failure = ""

    def log(self, _level: int, fmt: str, *args) -> None:
        line = fmt % args if args else fmt
        if line.startswith("FAIL"):  # FAIL [client] [thread]: host:port/id: reason (after ...)
            reason = line.split("]: ", 1)[-1].split(": ", 1)[-1]
            self.failure = re.sub(r" \(after \d+ms in state \w+(, .*)?\)$", "", reason)


def ensure_topics(bootstrap: str, packets_topic: str, timeout: float = 15.0,
                  client_config: dict | None = None) -> int:
    """Create missing topics; return the packets topic's partition count as the broker has it.
    client_config: the client's security settings (security.kafka_client_config)."""
    client_log = _ClientLog()
    # without sparse connections the client keeps its first connection to a broker it then
    # learns the id of, instead of dropping it and waiting out the 50 ms before connecting
    # again: the start of every service takes 50 ms less (a short-lived client: a connection
    # to each broker for a moment costs nothing)
    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": client_log,
                         "enable.sparse.connections": False,
                         **(client_config or {})})
    try:
        existing = admin.list_topics(timeout=timeout).topics
    except KafkaException as exc:
        admin.poll(0)  # hands over the log lines
        reason = client_log.failure or exc.args[0].str()
        raise StartupError(f"Kafka broker at {bootstrap} not reachable ({reason}); "
                           "check KAFKA_BOOTSTRAP_SERVERS") from None
    wanted = topic_definitions(packets_topic)
    missing = [
        NewTopic(name, spec["partitions"], spec["replication_factor"],
                 config=spec.get("config", {}))
        for name, spec in wanted.items()
        if name not in existing
    ]
    if missing:
        for name, future in admin.create_topics(missing, operation_timeout=timeout).items():
            try:
                future.result()
                log.info("created topic %s", name)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise StartupError(f"cannot create topic {name}: {exc.args[0]}") from None
    metadata = admin.list_topics(topic=packets_topic, timeout=timeout)
    partitions = len(metadata.topics[packets_topic].partitions)
    if partitions == 0:
        raise StartupError(f"topic {packets_topic} has no partitions")
    return partitions


class TopicSettings(KafkaSecuritySettings):
    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    kafka_group_id: str = Field("flow-processor", min_length=1,
                                description="Consumer group the processors' ACLs name")
    kafka_bootstrap_servers: str = Field("localhost:9092", min_length=1,
                                         description="Kafka bootstrap servers (host:port,...)")
    kafka_topic: str = Field("raw.packets", min_length=1, description="Topic of packet records")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m packet_records.topics",
        description="Create the pipeline's topics from kafka/topics.json where they are\n"
                    "missing (compose's one-shot kafka-init), then exit.",
        epilog=environment_help(TopicSettings),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(message)s")
    settings = load_settings(TopicSettings, "kafka-init")
    try:
        client_config = kafka_client_config(settings)
        partitions = ensure_topics(settings.kafka_bootstrap_servers, settings.kafka_topic,
                                   timeout=60.0, client_config=client_config)
        if settings.kafka_security_protocol != "plaintext":  # a broker with an authorizer
            admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers,
                                 **client_config})
            ensure_kafka_acls(admin, kafka_acl_bindings(settings.kafka_topic,
                                                        settings.kafka_group_id))
    except StartupError as exc:
        print(f"kafka-init: {exc}", file=sys.stderr)
        return 2
    print(f"kafka-init: {settings.kafka_topic} ready with {partitions} partitions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
