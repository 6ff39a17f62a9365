"""Latency measurement: timing harness and host description."""
