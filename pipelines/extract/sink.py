"""`FeatureStoreSink`: the Ray Data sink that writes and commits each shard row into the feature store."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ray.data import Datasink
from ray.data.block import BlockAccessor

from feature_store import FeatureStore
from feature_store.schema import decode_hidden


class FeatureStoreSink(Datasink):
    """Writes each shard row with `FeatureStore.write_shard`; returns per-shard stats and rejects."""

    def __init__(self, store: FeatureStore):
        self.store = store
        self.shard_results: list[dict[str, Any]] = []

    def write(self, blocks, ctx) -> list[dict[str, Any]]:
        results = []
        for block in blocks:
            batch = BlockAccessor.for_block(block).to_batch_format("numpy")
            for row in range(len(batch["shard_id"])):
                results.append(self._write_row({name: column[row] for name, column in batch.items()}))
        return results

    def _write_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        shard_id, info = int(row["shard_id"]), json.loads(row["info"])
        sample_ids, offsets = json.loads(row["sample_ids"]), row["offsets"]
        result = {"shard_id": shard_id, **info, "n_samples": 0, "n_tokens": 0, "n_loss_tokens": 0}
        if not sample_ids:  # every sample was rejected: nothing to store
            return result
        hidden_states = decode_hidden(row["hidden_states"], self.store.metadata.hidden_dtype)
        token_names = [name for name in self.store.metadata.token_arrays() if name != "hidden_states"]
        samples = []
        for j, sample_id in enumerate(sample_ids):
            span = slice(int(offsets[j]), int(offsets[j + 1]))
            samples.append({"sample_id": sample_id, "hidden_states": hidden_states[span],
                            **{name: row[name][span] for name in token_names}})
        record = self.store.write_shard(shard_id, samples)
        return result | {"n_samples": record.n_samples, "n_tokens": record.n_tokens,
                         "n_loss_tokens": record.n_loss_tokens, "nbytes": record.nbytes}

    def on_write_complete(self, write_result) -> None:
        self.shard_results = [r for returns in write_result.write_returns for r in returns]
