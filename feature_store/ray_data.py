"""A Ray Data view of a feature store, for pipelines that stream samples through Ray."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from feature_store.store import FeatureStore

if TYPE_CHECKING:
    import ray.data


def to_ray_dataset(
    store: FeatureStore, indices: Sequence[int] | np.ndarray | None = None, *, batch_size: int = 16
) -> ray.data.Dataset:
    """A `ray.data.Dataset` with one row per sample: the keys of `FeatureStore.sample`.

    The driver only builds rows of sample indices; every sample is read inside Ray's map tasks.
    Per-token arrays are variable-shaped tensor columns; bfloat16 hidden states arrive as float32.
    """
    import ray.data  # lazily: the package must import without Ray

    indices = range(store.num_samples) if indices is None else indices
    rows = [{"sample_index": int(i)} for i in indices]
    return ray.data.from_items(rows).map_batches(
        partial(_read_samples, store), batch_size=batch_size, batch_format="numpy"
    )


def _read_samples(store: FeatureStore, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    samples = [store.sample(int(i)) for i in batch["sample_index"]]
    return {name: _column([s[name] for s in samples]) for name in samples[0]}


def _column(values: list[Any]) -> np.ndarray:
    if not isinstance(values[0], np.ndarray):
        return np.array(values)
    # Samples differ in length: an object array of arrays, which Ray stores as a variable-shaped tensor column.
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column
