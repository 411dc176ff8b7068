"""Helpers for tests and benchmarks: a local S3-compatible server and synthetic shards."""
