"""Helpers for tests and benchmarks: synthetic shards. (The S3 and MLflow servers they start are the
local stack's, in moram_platform.stack.)"""
