"""python -m flow_processor [--exit-when-idle SECONDS]"""

from __future__ import annotations

import argparse
import signal
import sys

from flow_processor.consumer import Processor
from flow_processor.settings import ProcessorSettings
from flow_processor.sink import RedisSink
from packet_records.runtime import StartupError, configure_logging, load_settings
from packet_records.topics import ensure_topics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flow_processor", description=__doc__)
    parser.add_argument("--exit-when-idle", type=float, metavar="SECONDS",
                        help="exit 0 once everything in the topic is written and nothing new "
                             "came for SECONDS")
    args = parser.parse_args(argv)
    if args.exit_when_idle is not None and args.exit_when_idle < 0:
        parser.error("--exit-when-idle must be >= 0")
    settings = load_settings(ProcessorSettings, "flow_processor")
    configure_logging(settings.log_level)
    sink = RedisSink(settings)
    try:
        sink.check()
        ensure_topics(settings.kafka_bootstrap_servers, settings.kafka_topic)
    except StartupError as exc:
        print(f"flow_processor: {exc}", file=sys.stderr)
        return 2
    processor = Processor(settings, sink, args.exit_when_idle)

    def stop(_signum, _frame):
        processor.stop_requested = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    return processor.run()


if __name__ == "__main__":
    sys.exit(main())
