"""Stand-ins for pure-logic unit tests (anything crossing a process boundary is tested against
the real servers instead)."""

from __future__ import annotations


class RecordingProducer:
    """Stands in for capture's RecordProducer: keeps what pump() gives it."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, bytes, int]] = []  # (partition, message, records)
        self.stats: list[bytes] = []
        self.replay_ends: list[tuple[bytes, int]] = []  # (message, partitions)

    def send(self, partition: int, message: bytes, records: int) -> bool:
        self.sent.append((partition, message, records))
        return True

    def poll(self) -> None:
        pass

    def send_stats(self, message: bytes) -> None:
        self.stats.append(message)

    def send_replay_end(self, message: bytes, partitions: int) -> None:
        self.replay_ends.append((message, partitions))
