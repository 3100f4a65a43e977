"""Flow processor: packet records from Kafka -> flows and per-second series in Redis."""
