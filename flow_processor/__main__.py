"""python -m flow_processor [--exit-when-idle SECONDS]: read packet records from Kafka, write
per-second series, flows and top-N sets to Redis, exactly once."""

from __future__ import annotations

import argparse
import signal
import sys

import redis

from flow_processor.consumer import Processor
from flow_processor.settings import ProcessorSettings
from flow_processor.sink import RedisSink
from packet_records.runtime import (
    StartupError,
    configure_logging,
    environment_help,
    load_settings,
    tune_gc,
)
from packet_records.security import kafka_client_config
from packet_records.topics import ensure_topics

# How often Python's running thread hands over to a waiting one (default 5 ms). The writer
# thread sends a flush's journal while the processor's thread builds the rest of it: it
# waited up to this long for the interpreter after each Redis reply, and Redis sat idle
# meanwhile at the end of a replay
SWITCH_INTERVAL_S = 0.001


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flow_processor", description=__doc__,
        epilog=environment_help(ProcessorSettings),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exit-when-idle", type=float, metavar="SECONDS",
                        help="exit 0 once everything in the topic is written and nothing new "
                             "came for SECONDS")
    parser.add_argument("--reset-data", action="store_true",
                        help="delete every figure in Redis (series, flows, top-N sets, "
                             "counters) but keep the stored offsets, so that what is already "
                             "in the topic is not counted again; stop the processors first")
    args = parser.parse_args(argv)
    if args.exit_when_idle is not None and args.exit_when_idle < 0:
        parser.error("--exit-when-idle must be >= 0")
    settings = load_settings(ProcessorSettings, "flow_processor")
    tune_gc()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    configure_logging(settings.log_level)
    sink = RedisSink(settings)
    if args.reset_data:
        try:
            removed = sink.reset_data()
        except redis.RedisError as exc:
            print(f"flow_processor: reset failed: {exc}", file=sys.stderr)
            return 2
        print(f"flow_processor: removed {removed} keys; offsets kept")
        return 0
    try:
        sink.check()
        ensure_topics(settings.kafka_bootstrap_servers, settings.kafka_topic,
                      client_config=kafka_client_config(settings))
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
