"""Logging (human / JSON lines) and Prometheus metrics; imported by anyone."""
