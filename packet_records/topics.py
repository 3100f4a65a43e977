"""Creating the pipeline's topics from kafka/topics.json when they are missing."""

from __future__ import annotations

import logging
import sys

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from packet_records.runtime import StartupError, load_settings, topic_definitions

log = logging.getLogger(__name__)


def ensure_topics(bootstrap: str, packets_topic: str, timeout: float = 15.0) -> int:
    """Create missing topics; return the packets topic's partition count as the broker has it."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        existing = admin.list_topics(timeout=timeout).topics
    except KafkaException as exc:
        raise StartupError(f"Kafka broker at {bootstrap} not reachable: {exc.args[0]}") from None
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


class TopicSettings(BaseSettings):
    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    kafka_bootstrap_servers: str = Field("localhost:9092", min_length=1,
                                         description="Kafka bootstrap servers (host:port,...)")
    kafka_topic: str = Field("raw.packets", min_length=1, description="Topic of packet records")


def main() -> int:
    """python -m packet_records.topics: create the topics (compose's one-shot kafka-init)."""
    logging.basicConfig(level="INFO", format="%(message)s")
    settings = load_settings(TopicSettings, "kafka-init")
    try:
        partitions = ensure_topics(settings.kafka_bootstrap_servers, settings.kafka_topic,
                                   timeout=60.0)
    except StartupError as exc:
        print(f"kafka-init: {exc}", file=sys.stderr)
        return 2
    print(f"kafka-init: {settings.kafka_topic} ready with {partitions} partitions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
