"""Capture service: frames from an interface or a capture file -> packet records on Kafka."""
