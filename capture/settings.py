"""Capture service configuration, from the environment."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from packet_records.security import KafkaSecuritySettings


class CaptureSettings(KafkaSecuritySettings):
    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    kafka_bootstrap_servers: str = Field("localhost:9092", min_length=1,
                                         description="Kafka bootstrap servers (host:port,...)")
    kafka_topic: str = Field("raw.packets", min_length=1, description="Topic of packet records")
    kafka_compression: Literal["lz4", "zstd", "snappy", "gzip", "none"] = Field(
        "lz4", description="Producer compression: lz4, zstd, snappy, gzip or none")
    iface: str = Field("", description="Interface to capture on; empty = every interface")
    bpf_filter: str = Field("", description="BPF filter compiled by libpcap (tcpdump syntax)")
    records_per_message: int = Field(1000, ge=1, le=65535,
                                     description="Packet records per Kafka message (1-65535)")
    batch_interval_ms: int = Field(100, ge=1, le=60000,
                                   description="Longest a partial batch waits before it is sent")
    producer_buffer_mb: int = Field(256, ge=1, le=16384,
                                    description="Bound of the buffer while the broker is away")
    delivery_timeout_ms: int = Field(300000, ge=1000, le=86400000,
                                     description="Give up on (and count) a message after this long")
    inspect_payloads: bool = Field(True, description="DPI on each flow's first payloads; false: "
                                   "headers only")
    inspect_memory_mb: float = Field(64, gt=0, le=65536,
                                     description="Budget for the bytes DPI holds across all "
                                     "flows (TCP reassembly, QUIC Initials); over it the "
                                     "inspections waiting longest are given up (counted)")
    inspect_idle_timeout_s: float = Field(30.0, gt=0, le=86400,
                                          description="Give up (and count) a flow's unfinished "
                                          "inspection after this long without payload "
                                          "(capture time)")
    fragments_held: int = Field(4096, ge=1, le=1048576,
                                description="IP fragments held back waiting for their first "
                                "fragment's ports (each ~0.5 KB: no payload is kept)")
    # a 1 GiB ring takes about 2.5 s to allocate at start; more is never needed
    socket_buffer_mb: int = Field(64, ge=1, le=1024,
                                  description="Size of the live capture ring in MiB (kernel "
                                  "memory, taken at start)")
    stats_interval_s: float = Field(5.0, gt=0, le=3600, description="Seconds between summary lines")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level")
