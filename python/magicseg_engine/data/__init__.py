"""Samples on disk: crash-safe WebDataset shards of a run directory, and reading them back."""

from magicseg_engine.data.shards import (
    DuplicateKeyError,
    RunState,
    ShardInfo,
    ShardWriter,
    finished_keys,
    iter_samples,
    sample_key,
    shard_paths,
)

__all__ = [
    "DuplicateKeyError", "RunState", "ShardInfo", "ShardWriter", "finished_keys", "iter_samples",
    "sample_key", "shard_paths",
]
