"""Synthetic load for the pipeline: UDP datagrams at a set rate, or a DNS/HTTP/TLS mix against
listeners of its own (`python -m traffic_generator`)."""
