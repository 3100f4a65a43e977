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
    max_poll_records: int = Field(10000, ge=1, le=1_000_000,
                                  description="Records fetched per poll (rounded to messages)")
    redis_url: str = Field("redis://localhost:6379/0", pattern=r"^rediss?://",
                           description="Redis Stack URL (RedisTimeSeries needed)")
    flush_interval_ms: int = Field(1000, ge=10, le=60000,
                                   description="How often aggregates and offsets go to Redis")
    max_pending_records: int = Field(500_000, ge=1000, le=50_000_000,
                                     description="Flush early once this many records are pending")
    flow_idle_timeout_s: int = Field(120, ge=1, le=86400,
                                     description="Forget a flow after this long without packets")
    flow_active_timeout_s: int = Field(1800, ge=1, le=604800,
                                       description="Re-open a flow's table entry after this long")
    max_flows: int = Field(1_000_000, ge=100, le=100_000_000,
                           description="Bound of the in-memory flow table per process")
    series_retention_ms: int = Field(0, ge=0, description="Retention of aggregate series; 0 = keep")
    flow_series_retention_ms: int = Field(86_400_000, ge=0,
                                          description="Retention of per-flow series; 0 = keep")
    flow_series_chunk_bytes: int = Field(512, ge=48, le=1048576, multiple_of=8,
                                         description="Chunk size of per-flow series (small "
                                         "flows waste the 4 KiB default)")
    flow_ttl_s: int = Field(86400, ge=60, description="Flow keys expire this long after going idle")
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
