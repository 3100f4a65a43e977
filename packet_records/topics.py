"""Creating the pipeline's topics from kafka/topics.json when they are missing."""

from __future__ import annotations

import logging

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from packet_records.runtime import StartupError, topic_definitions

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


def main() -> int:
    """python -m packet_records.topics: create the topics (compose's one-shot kafka-init)."""
    import os
    import sys

    logging.basicConfig(level="INFO", format="%(message)s")
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "localhost:9092")
    topic = os.environ.get("KAFKA_TOPIC", "raw.packets")
    try:
        partitions = ensure_topics(bootstrap, topic, timeout=60.0)
    except StartupError as exc:
        print(f"kafka-init: {exc}", file=sys.stderr)
        return 2
    print(f"kafka-init: {topic} ready with {partitions} partitions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
