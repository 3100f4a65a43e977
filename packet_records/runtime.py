"""Start-up helpers shared by the services: settings that fail with one clear line, logging."""

from __future__ import annotations

import gc
import json
import logging
import sys
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings

S = TypeVar("S", bound=BaseSettings)
TOPICS_FILE = Path(__file__).resolve().parents[1] / "kafka" / "topics.json"


class StartupError(Exception):
    """A condition that stops a service at start (bad configuration, missing server, bad file)."""


def tune_gc() -> None:
    """The services hold hundreds of thousands of long-lived objects (flow tables, caches) and
    make few reference cycles: Python's default thresholds (a collection every 700 allocations,
    a full one every 100 of those) made the processor spend about 40% of its aggregation time
    in the cyclic collector. Collect far less often; what start-up made is never scanned."""
    gc.set_threshold(100_000, 50, 100)
    gc.freeze()


def load_settings(cls: type[S], service: str) -> S:
    """Read settings from the environment; bad values stop the service with one line, exit 2."""
    try:
        return cls()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']).upper() or 'settings'}: {err['msg']}"
            f" (got {err.get('input')!r})"
            for err in exc.errors()
        )
        print(f"{service}: invalid configuration: {problems}", file=sys.stderr)
        raise SystemExit(2) from None


def environment_help(cls: type[BaseSettings]) -> str:
    """The environment variables a settings class reads, for a service's --help epilog."""
    lines = ["environment variables:"]
    for name, field in cls.model_fields.items():
        default = field.default if field.default not in ("", None) else "(empty)"
        lines.append(f"  {name.upper():<26} {field.description or ''} [default: {default}]")
    return "\n".join(lines)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def topic_definitions(packets_topic: str) -> dict[str, dict]:
    """The topics of kafka/topics.json under their configured names."""
    spec = json.loads(TOPICS_FILE.read_text())
    return {packets_topic: spec["packets"], f"{packets_topic}.deadletter": spec["deadletter"]}
