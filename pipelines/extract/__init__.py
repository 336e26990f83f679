"""Feature extraction on Ray Data: conversations in, a committed Zarr feature store out.

    read + normalise (driver) -> tokenise, [generate replies], target features -> write shards
                                 actor pool (ShardFeatures)                       Datasink tasks

One row of the Ray dataset is one whole feature-store SHARD: sample i of the deterministic input order
belongs to shard i // samples_per_shard, and every stage maps a shard row to a shard row. So each shard
is written by exactly one writer whatever Ray does with blocks, a shard's batches are formed from its own
samples (the same bits on every run), and resuming is per shard: committed shards are dropped before any
work, partial ones are done again from their records.

Reading and normalising run on the driver: sample indices need one sequential pass
over the inputs, and parsing JSON is negligible next to the target's work.

Modules, in the order a record flows through them: `config` (the `extract` section), `records` (read, normalise,
tokenise), `actor` (`ShardFeatures`: generate and forward, with `target_features`), `sink` (write and commit a
shard), `run` (the driver: pending shards, the writer lock, Ray Data, the summary).
"""

from pipelines.extract.config import ExtractConfig, ExtractError, GenerationConfig
from pipelines.extract.run import run

__all__ = ["ExtractConfig", "ExtractError", "GenerationConfig", "run"]
