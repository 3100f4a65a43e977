"""Flow processor configuration, from the environment."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from packet_records.security import KafkaSecuritySettings


class ProcessorSettings(KafkaSecuritySettings):
    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    kafka_bootstrap_servers: str = Field("localhost:9092", min_length=1,
                                         description="Kafka bootstrap servers (host:port,...)")
    kafka_topic: str = Field("raw.packets", min_length=1, description="Topic of packet records")
    kafka_group_id: str = Field("flow-processor", min_length=1, description="Consumer group")
    max_poll_records: int = Field(50_000, ge=1, le=1_000_000,
                                  description="Records fetched per poll (rounded to messages)")
    redis_url: str = Field("redis://localhost:6379/0", pattern=r"^rediss?://",
                           description="Redis Stack URL (RedisTimeSeries needed)")
    flush_interval_ms: int = Field(1000, ge=10, le=60000,
                                   description="How often aggregates and offsets go to Redis")
    flow_write_interval_ms: int = Field(
        5000, ge=10, le=600000, description="How often flow hashes, top-N sets and counters go "
        "to Redis (also whenever there is nothing to read); the per-second series go every "
        "FLUSH_INTERVAL_MS")
    max_pending_records: int = Field(1_000_000, ge=1000, le=50_000_000,
                                     description="Flush early once this many records are pending")
    flow_idle_timeout_s: int = Field(120, ge=1, le=86400,
                                     description="Forget a flow after this long without packets")
    flow_active_timeout_s: int = Field(1800, ge=1, le=604800,
                                       description="Re-open a flow's table entry after this long")
    max_flows: int = Field(300_000, ge=100, le=100_000_000,
                           description="Bound of the in-memory flow tables of the process "
                           "(all its partitions together; about 1.3 KB a flow)")
    series_retention_ms: int = Field(0, ge=0, description="Retention of aggregate series; 0 = keep")
    flow_series_retention_ms: int = Field(86_400_000, ge=0,
                                          description="Retention of per-flow series; 0 = keep")
    flow_series_chunk_bytes: int = Field(512, ge=48, le=1048576, multiple_of=8,
                                         description="Chunk size of per-flow series (small "
                                         "flows waste the 4 KiB default)")
    flow_ttl_s: int = Field(86400, ge=60,
                            description="Flow keys (flow:<id>:meta, ts:flow:<id>:*) carry this "
                            "TTL from their first write, renewed while the flow is written")
    flow_series: Literal["all", "top"] = Field(
        "top", description="Per-flow series: all = every flow; top = flows that reach "
        "FLOW_SERIES_MIN_BYTES or the top FLOW_SERIES_TOP, complete from their first second")
    flow_series_min_bytes: int = Field(1_000_000, ge=0,
                                       description="FLOW_SERIES=top: bytes that give a flow "
                                       "its series")
    flow_series_top: int = Field(100, ge=0, le=100_000,
                                 description="FLOW_SERIES=top: flows among the top this many "
                                 "of flows:top:bytes get their series")
    flow_series_max_held: int = Field(60, ge=1, le=86400,
                                      description="FLOW_SERIES=top: a flow holding more "
                                      "seconds than this in the processor gets its series")
    flush_max_flows: int = Field(20_000, ge=100, le=1_000_000,
                                 description="Write a partition's flow part early once this "
                                 "many of its flows wait for it")
    probe_flows_stored: int = Field(
        200, ge=0, le=10_000_000, description="Flows of a single packet (what a scan makes) "
        "given keys of their own (hash, flows:top entries) per flow write of a partition; the "
        "others count in flows_not_stored, their packets in every series and in the host, "
        "application and domain sets; 0 = no limit")
    top_flows_kept: int = Field(10000, ge=10, le=10_000_000,
                                description="Members kept in each top-N set (flows, hosts, ...)")
    live_time_window_s: int = Field(300, ge=1, le=86400,
                                    description="Live records more than this many seconds from "
                                    "their Kafka message's timestamp are set aside")
    max_time_ahead_s: int = Field(300, ge=0, le=86400,
                                  description="Records captured more than this many seconds "
                                  "ahead of this host's clock are set aside")
    stats_interval_s: float = Field(5.0, gt=0, le=3600, description="Seconds between summary lines")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level")
