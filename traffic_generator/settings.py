"""Traffic generator configuration, from the environment."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class GeneratorSettings(BaseSettings):
    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    rate_per_second: int = Field(5000, gt=0, le=2_000_000,
                                 description="Packets (udp) or messages (mix) sent per second")
    payload_size: int = Field(1300, ge=0, le=65000,
                              description="UDP payload bytes per datagram (udp mode)")
    target_host: str = Field("127.0.0.1", min_length=1,
                             description="Host the datagrams go to (udp mode); resolved at start."
                                         " A local address with no listener on TARGET_PORT gets "
                                         "one of the generator's (no ICMP unreachable replies)")
    target_port: int = Field(9999, ge=1, le=65535, description="UDP port on TARGET_HOST (udp mode)")
    flows: int = Field(8, ge=1, le=1024,
                       description="Source sockets (one flow each) the datagrams spread over")
    mode: Literal["udp", "mix"] = Field(
        "udp", description="udp: datagrams to TARGET_HOST:TARGET_PORT; mix: DNS, HTTP and TLS "
                           "to listeners the generator starts on 127.0.0.1")
    count: int = Field(0, ge=0, description="Stop after this many packets/messages; 0 = unlimited")
    duration_s: float = Field(0, ge=0, le=30 * 86400,
                              description="Stop after this many seconds; 0 = unlimited")
    report_interval_s: float = Field(5.0, gt=0, le=3600,
                                     description="Seconds between achieved-rate lines")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level")
