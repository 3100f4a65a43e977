"""python -m traffic_generator: send synthetic traffic at RATE_PER_SECOND until COUNT, DURATION_S,
Ctrl-C or SIGTERM. Configuration comes from the environment (below); the last line, on
stdout, is `final sent=N errors=N seconds=S rate=R target=T [dns=N http=N tls=N]`."""

from __future__ import annotations

import argparse
import logging
import sys

from packet_records.runtime import StartupError, configure_logging, load_settings
from traffic_generator.generator import StopFlag, run
from traffic_generator.senders import open_sender
from traffic_generator.settings import GeneratorSettings

log = logging.getLogger("traffic_generator")


def settings_help() -> str:
    lines = ["environment:"]
    for name, info in GeneratorSettings.model_fields.items():
        lines.append(f"  {name.upper():<18} {info.description} (default {info.default!r})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m traffic_generator", description=__doc__,
                                     epilog=settings_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    settings = load_settings(GeneratorSettings, "traffic_generator")
    configure_logging(settings.log_level)
    try:
        sender = open_sender(settings.mode, settings.target_host, settings.target_port,
                             settings.flows, settings.payload_size)
    except StartupError as exc:
        print(f"traffic_generator: {exc}", file=sys.stderr)
        return 2
    stop = StopFlag()
    stop.install()
    log.info("%s at %d/s%s%s", sender.description, settings.rate_per_second,
             f", {settings.count} in all" if settings.count else "",
             f", for {settings.duration_s:g}s" if settings.duration_s else "")
    try:
        result = run(sender, settings.rate_per_second, count=settings.count,
                     duration_s=settings.duration_s,
                     report_interval_s=settings.report_interval_s, stop=stop)
    finally:
        sender.close()
    print(result.summary(), flush=True)
    return 1 if result.errors and not result.sent else 0


if __name__ == "__main__":
    sys.exit(main())
