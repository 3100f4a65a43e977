"""Application labels carried in packet records (Record.app) and used in Redis keys."""

from __future__ import annotations

# The index in this tuple is the id on the wire: append only, never reorder.
APPS = ("UNKNOWN", "DNS", "HTTP", "TLS", "QUIC", "SSH", "NTP", "DHCP", "DHCPV6", "MDNS", "SMTP",
        "IMAP", "POP3")
APP_ID = {name: i for i, name in enumerate(APPS)}


def app_name(app_id: int) -> str:
    return APPS[app_id] if 0 <= app_id < len(APPS) else "UNKNOWN"
