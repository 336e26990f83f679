"""What a feature store holds: store metadata, per-token array dtypes, and sample validation.

Stored dtypes (all little-endian):

| array           | per token        | dtype                                                        |
|-----------------|------------------|--------------------------------------------------------------|
| `input_ids`     | scalar           | int32                                                        |
| `loss_mask`     | scalar           | uint8 (0/1)                                                  |
| `hidden_states` | [hidden_size]    | `hidden_dtype`: "float16", or "bfloat16" stored as the raw   |
|                 |                  | uint16 bit pattern (zarr and numpy have no bfloat16 dtype)   |
| `topk_values`   | [topk]           | `topk_dtype` ("float32" or "float16"): the top-k LOGITS      |
| `topk_indices`  | [topk]           | int32 token ids of those logits                              |
| `logsumexp`     | scalar           | float32 logsumexp over the full vocabulary                   |

The three top-k arrays exist only when `topk > 0`. The probability of a stored top-k token is
`exp(topk_values - logsumexp)`, exact up to the rounding of `topk_values` to `topk_dtype`: float32
keeps it within float32 precision; float16 rounds a logit of magnitude |v| by up to |v|·2^-11, so
probabilities carry a relative error up to |v|·2^-11 (about 0.5 % at |v| = 10).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from falcon.errors import FalconError

# 2: store.json holds a store_id and every commit record names it (1 had neither).
SCHEMA_VERSION = 2

# Storage dtype of each configurable float format.
HIDDEN_DTYPES = {"bfloat16": np.dtype("<u2"), "float16": np.dtype("<f2")}
TOPK_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}


class StoreMismatchError(FalconError, ValueError):
    """An existing store does not match what the caller expects (target, schema, config)."""


class SampleError(ValueError):
    """A sample handed to the writer has a missing key, a wrong shape or dtype, or bad values."""


@dataclass(frozen=True)
class StoreMetadata:
    """Everything that determines what a store's features mean; saved as `store.json`.

    `extraction_config` should hold only settings that change the stored content (max length,
    chat template, samples per shard, dataset digest), not resources such as worker counts:
    re-running into an existing store requires equal metadata.

    `store_id` is not content: `FeatureStore.create` gives every new store a random one, so a shard
    written for a store that was since deleted and re-created at the same URL is told apart. It takes no
    part in equality or `differences`.
    """

    target_fingerprint: str
    tokenizer: str
    hidden_size: int
    vocab_size: int
    topk: int
    hidden_dtype: str = "bfloat16"
    topk_dtype: str = "float32"
    extraction_config: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    store_id: str | None = field(default=None, compare=False)  # None until the store is created

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"this code writes schema_version {SCHEMA_VERSION}, got {self.schema_version!r}")
        if self.store_id is not None and (not isinstance(self.store_id, str) or not self.store_id):
            raise ValueError(f"StoreMetadata.store_id must be a non-empty string or None, got {self.store_id!r}")
        if not isinstance(self.target_fingerprint, str) or not self.target_fingerprint:
            raise ValueError("StoreMetadata.target_fingerprint must be a non-empty string")
        if self.hidden_size <= 0 or self.vocab_size <= 0:
            raise ValueError(
                f"hidden_size and vocab_size must be positive, got {self.hidden_size}, {self.vocab_size}"
            )
        if not 0 <= self.topk <= self.vocab_size:
            raise ValueError(f"topk must be in [0, vocab_size={self.vocab_size}], got {self.topk}")
        if self.hidden_dtype not in HIDDEN_DTYPES:
            raise ValueError(
                f"hidden_dtype must be one of {sorted(HIDDEN_DTYPES)}, got {self.hidden_dtype!r}"
            )
        if self.topk_dtype not in TOPK_DTYPES:
            raise ValueError(f"topk_dtype must be one of {sorted(TOPK_DTYPES)}, got {self.topk_dtype!r}")
        try:
            # Normalise through JSON so tuples and lists compare equal after a save/load round trip.
            object.__setattr__(self, "extraction_config", json.loads(json.dumps(self.extraction_config)))
        except TypeError as exc:
            raise ValueError(f"extraction_config must be JSON-serialisable: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str) -> StoreMetadata:
        version = values.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreMismatchError(
                f"{where}: store has schema_version {version!r}, this code reads schema_version {SCHEMA_VERSION}"
                + (" (version 1 stores have no store_id to tell their shards from a re-created store's); "
                   "extract into a new store, or re-run the extraction with --fresh" if version == 1 else "")
            )
        if not values.get("store_id"):
            raise StoreMismatchError(f"{where}: store.json has no store_id; the store is damaged, re-extract it")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise StoreMismatchError(f"{where}: unknown metadata key(s) {unknown}")
        return cls(**values)

    def differences(self, other: StoreMetadata) -> list[str]:
        """Human-readable `field: ours != theirs` lines for every field that differs."""
        ours, theirs = self.to_dict(), other.to_dict()
        content = [f.name for f in dataclasses.fields(self) if f.compare]
        return [f"{k}: {ours[k]!r} != {theirs[k]!r}" for k in content if ours[k] != theirs[k]]

    def token_arrays(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """Per-token arrays in storage order: name -> (storage dtype, shape of one token's row)."""
        arrays = {
            "input_ids": (np.dtype("<i4"), ()),
            "loss_mask": (np.dtype("u1"), ()),
            "hidden_states": (HIDDEN_DTYPES[self.hidden_dtype], (self.hidden_size,)),
        }
        if self.topk:
            arrays |= {
                "topk_values": (TOPK_DTYPES[self.topk_dtype], (self.topk,)),
                "topk_indices": (np.dtype("<i4"), (self.topk,)),
                "logsumexp": (np.dtype("<f4"), ()),
            }
        return arrays

    def raw_bytes_per_token(self) -> int:
        """Uncompressed bytes one token takes in storage dtypes (the baseline for compression ratios)."""
        return sum(dtype.itemsize * int(np.prod(row)) for dtype, row in self.token_arrays().values())


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even, as torch does) and return the uint16 bits."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Exact float32 values of bfloat16 numbers given as uint16 bits."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def decode_hidden(stored: np.ndarray, hidden_dtype: str) -> np.ndarray:
    """Stored hidden states as a float numpy array: float16 as is, bfloat16 widened exactly to float32."""
    return bfloat16_bits_to_float32(stored) if hidden_dtype == "bfloat16" else stored


def _to_numpy(value: Any, where: str) -> np.ndarray:
    # Only look for torch if the caller already imported it: the writer must not pull torch in.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()  # numpy has no bfloat16; float32 holds every bfloat16 exactly
        return value.numpy()
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (list, tuple)):
        return np.asarray(value)
    raise SampleError(f"{where}: expected a numpy array or torch tensor, got {type(value).__name__}")


class _SampleChecker:
    """Validates one sample's arrays and converts them to storage dtypes."""

    def __init__(self, metadata: StoreMetadata, where: str, sample: Mapping[str, Any]):
        self.metadata = metadata
        self.where = where
        self.sample = sample

    def fail(self, message: str) -> SampleError:
        return SampleError(f"{self.where}: {message}")

    def get(self, name: str, kinds: str, shape: tuple[int, ...], shape_names: str) -> np.ndarray:
        if name not in self.sample:
            raise self.fail(f"missing key {name!r}")
        array = _to_numpy(self.sample[name], f"{self.where}: {name}")
        if array.dtype.kind not in kinds:
            raise self.fail(f"{name} has dtype {array.dtype}, expected {_KIND_NAMES[kinds]}")
        if array.shape != shape:
            raise self.fail(f"{name} has shape {array.shape}, expected {shape} = {shape_names}")
        return array

    def token_ids(self, name: str, array: np.ndarray) -> np.ndarray:
        if array.size and (array.min() < 0 or array.max() >= self.metadata.vocab_size):
            raise self.fail(
                f"{name} holds ids in [{array.min()}, {array.max()}], outside [0, vocab_size={self.metadata.vocab_size})"
            )
        return array.astype("<i4")

    def floats(self, name: str, array: np.ndarray, dtype_name: str, storage: np.dtype) -> np.ndarray:
        if not np.isfinite(array).all():
            raise self.fail(f"{name} contains NaN or inf")
        if dtype_name == "bfloat16":
            return float32_to_bfloat16_bits(array)
        with np.errstate(over="ignore"):  # overflow is reported below, with the offending magnitude
            stored = array.astype(storage)
        if not np.isfinite(stored).all():
            raise self.fail(
                f"{name} overflows {dtype_name} (max |x| = {np.abs(array).max():.4g}); store it as a wider dtype"
            )
        return stored


_KIND_NAMES = {"iu": "an integer dtype", "biu": "bool or an integer dtype", "f": "a float dtype"}


def normalize_sample(
    sample: Mapping[str, Any], metadata: StoreMetadata, where: str
) -> tuple[str, dict[str, np.ndarray]]:
    """Check one sample against the store's schema; return its id and its arrays in storage dtypes.

    `where` names the sample in error messages (e.g. "shard 3, sample #5").
    """
    sample_id = sample.get("sample_id") if isinstance(sample, Mapping) else None
    if not isinstance(sample_id, str) or not sample_id:
        raise SampleError(f"{where}: 'sample_id' must be a non-empty string, got {sample_id!r}")
    check = _SampleChecker(metadata, f"{where} ({sample_id!r})", sample)
    if "input_ids" not in sample:
        raise check.fail("missing key 'input_ids'")
    ids_shape = _to_numpy(sample["input_ids"], f"{where}: input_ids").shape
    if len(ids_shape) != 1 or ids_shape[0] == 0:
        raise check.fail(f"input_ids must be a non-empty 1-D array, got shape {ids_shape}")
    n_tokens = ids_shape[0]
    h, k = metadata.hidden_size, metadata.topk

    input_ids = check.get("input_ids", "iu", (n_tokens,), "(tokens,)")
    loss_mask = check.get("loss_mask", "biu", (n_tokens,), "(tokens,)")
    if not np.isin(loss_mask, (0, 1)).all():
        raise check.fail("loss_mask must hold only 0 and 1")
    hidden = check.get("hidden_states", "f", (n_tokens, h), "(tokens, hidden_size)")
    arrays = {
        "input_ids": check.token_ids("input_ids", input_ids),
        "loss_mask": loss_mask.astype("u1"),
        "hidden_states": check.floats(
            "hidden_states", hidden, metadata.hidden_dtype, HIDDEN_DTYPES[metadata.hidden_dtype]
        ),
    }
    if k:
        values = check.get("topk_values", "f", (n_tokens, k), "(tokens, topk)")
        indices = check.get("topk_indices", "iu", (n_tokens, k), "(tokens, topk)")
        logsumexp = check.get("logsumexp", "f", (n_tokens,), "(tokens,)")
        arrays["topk_values"] = check.floats(
            "topk_values", values, metadata.topk_dtype, TOPK_DTYPES[metadata.topk_dtype]
        )
        arrays["topk_indices"] = check.token_ids("topk_indices", indices)
        arrays["logsumexp"] = check.floats("logsumexp", logsumexp, "float32", np.dtype("<f4"))
        # A logit above the logsumexp of all logits is impossible: the arrays were mixed up.
        excess = values.astype(np.float32) - arrays["logsumexp"][:, None]
        if (excess > 1e-3 * (1.0 + np.abs(arrays["logsumexp"][:, None]))).any():
            raise check.fail(
                f"topk_values exceed logsumexp by up to {excess.max():.4g}: topk_values must be raw logits "
                "and logsumexp the logsumexp of the full-vocabulary logits"
            )
    return sample_id, arrays


def normalize_samples(
    samples: Sequence[Mapping[str, Any]], metadata: StoreMetadata, shard_id: int
) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """Validate a shard's samples; return (sample_ids, offsets [n+1] int64, concatenated token arrays)."""
    if not samples:
        raise SampleError(f"shard {shard_id}: no samples; a shard holds at least one sample")
    sample_ids: list[str] = []
    per_sample: list[dict[str, np.ndarray]] = []
    for i, sample in enumerate(samples):
        sample_id, arrays = normalize_sample(sample, metadata, f"shard {shard_id}, sample #{i}")
        sample_ids.append(sample_id)
        per_sample.append(arrays)
    if len(set(sample_ids)) != len(sample_ids):
        duplicates = sorted({s for s in sample_ids if sample_ids.count(s) > 1})
        raise SampleError(f"shard {shard_id}: duplicate sample_id(s) {duplicates[:5]}")
    lengths = np.array([len(a["input_ids"]) for a in per_sample], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype("<i8")
    token_arrays = {name: np.concatenate([a[name] for a in per_sample]) for name in metadata.token_arrays()}
    return sample_ids, offsets, token_arrays
