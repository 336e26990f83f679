"""Offline feature store: per-token target hidden states and logits in sharded Zarr v3.

    store = FeatureStore.create(url, StoreMetadata(...))      # or FeatureStore.open(url, expect_fingerprint=...)
    store.write_shard(shard_id, samples)                      # one writer per shard, atomic commit
    store.commit_manifest()                                   # manifest.parquet from the commit records
    store.sample(i); store.split(0.05); FeatureDataset(store, indices, max_len)
    with WriterLock(store.location): ...                      # one writing job per store at a time

See `feature_store.store` for the layout, `feature_store.shard` for the commit protocol and
`feature_store.schema` for the stored arrays and dtypes, `feature_store.lock` for the writer lock.
"""

from feature_store.lock import StoreLockedError, WriterLock
from feature_store.schema import SCHEMA_VERSION, SampleError, StoreMetadata, StoreMismatchError
from feature_store.shard import ShardRecord
from feature_store.store import FeatureStore, VerifyReport

__all__ = [
    "SCHEMA_VERSION",
    "FeatureDataset",
    "FeatureStore",
    "SampleError",
    "ShardRecord",
    "StoreLockedError",
    "StoreMetadata",
    "StoreMismatchError",
    "VerifyReport",
    "WriterLock",
    "collate_features",
]


def __getattr__(name: str):
    # The torch Dataset is imported on first use, so writers and the inspect CLI do not load torch.
    if name in ("FeatureDataset", "collate_features"):
        from feature_store import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'feature_store' has no attribute {name!r}")
