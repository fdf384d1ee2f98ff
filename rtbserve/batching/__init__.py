"""Micro-batching: concurrent requests coalesce into one kernel call per model and worker."""

from rtbserve.batching.micro_batcher import BatcherStats, MicroBatcher

__all__ = ["BatcherStats", "MicroBatcher"]
