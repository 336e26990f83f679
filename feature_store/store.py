"""FeatureStore: create/open a store, write shards, read samples by global index, split, verify.

Store layout (at a local path or any fsspec URL):

    store.json          StoreMetadata (schema version, store_id, target, tokenizer, sizes, dtypes, config)
    manifest.parquet    one row per committed shard (see MANIFEST_SCHEMA); derived, rebuildable
    shards/shard-00000/ one Zarr v3 group per shard, committed atomically (see feature_store.shard)
    WRITER.lock         while a job writes the store (see feature_store.lock)

The per-shard commit records are the source of truth: opening a store scans them, and
`commit_manifest()` rebuilds `manifest.parquet` from them, so a killed writer can never leave a
manifest that lists a shard that is not fully written. The manifest is for people and tools
(pandas, DuckDB, `python -m feature_store.inspect`) and for `verify()` to notice shards that vanished;
a damaged one is rebuilt from the commit records when read.

Samples are numbered globally in shard-id order, then in their order inside the shard. The view of
which shards exist is taken when the store is opened (and refreshed by `commit_manifest()`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from tqdm.auto import tqdm

from feature_store.lock import LOCK_FILE, ensure_owner
from feature_store.schema import StoreMetadata, StoreMismatchError, decode_hidden
from feature_store.shard import (
    SHARDS_DIR,
    ShardRecord,
    ShardScan,
    corrupt_shards,
    partial_shard_names,
    remove_shard,
    scan_shards,
    write_shard,
)
from feature_store.storage import Location

log = logging.getLogger(__name__)

METADATA_FILE = "store.json"
MANIFEST_FILE = "manifest.parquet"
MANIFEST_SCHEMA = pa.schema(
    [
        ("shard_id", pa.int64()),
        ("name", pa.string()),
        ("n_samples", pa.int64()),
        ("n_tokens", pa.int64()),
        ("n_loss_tokens", pa.int64()),
        ("nbytes", pa.int64()),  # stored bytes of the shard's files
        ("checksum", pa.string()),  # sha256 over the shard's array checksums (see feature_store.shard)
    ]
)


@dataclass
class VerifyReport:
    """Outcome of `FeatureStore.verify()`; `ok` is False when any shard is corrupt, ignored or missing."""

    checked: list[str] = field(default_factory=list)  # committed shards whose data was re-read
    corrupt: dict[str, str] = field(default_factory=dict)  # shard name -> what is wrong
    ignored: dict[str, str] = field(default_factory=dict)  # shard name -> why its commit record does not count
    missing: list[str] = field(default_factory=list)  # listed in manifest.parquet, no longer committed
    unlisted: list[str] = field(default_factory=list)  # committed, absent from manifest.parquet
    partial: list[str] = field(default_factory=list)  # uncommitted leftovers of killed writers (harmless)

    @property
    def ok(self) -> bool:
        return not self.corrupt and not self.ignored and not self.missing

    def __str__(self) -> str:
        lines = [f"verified {len(self.checked)} shard(s): {'OK' if self.ok else 'FAILED'}"]
        lines += [f"  corrupt {name}: {reason}" for name, reason in sorted(self.corrupt.items())]
        lines += [f"  not committed {name}: {reason}; the next extraction run rewrites it"
                  for name, reason in self.ignored.items()]
        lines += [f"  missing {name} (listed in {MANIFEST_FILE})" for name in self.missing]
        if self.unlisted:
            lines.append(
                f"  {len(self.unlisted)} committed shard(s) not in {MANIFEST_FILE}; run commit_manifest()"
            )
        if self.partial:
            lines.append(f"  {len(self.partial)} partial leftover(s), ignored: {', '.join(self.partial[:5])}")
        return "\n".join(lines)


class FeatureStore:
    """A feature store at a URL. Build with `FeatureStore.create` or `FeatureStore.open`.

    Picklable and cheap to ship to Ray or DataLoader workers: open Zarr handles are not pickled.
    `writer_owner` is the owner id of the `WriterLock` a job writes under (set by the job, None
    otherwise); each `write_shard` then checks that the lock still names it.
    """

    def __init__(self, location: Location, metadata: StoreMetadata):
        self.location = location
        self.metadata = metadata
        self.writer_owner: str | None = None
        self._set_view(self._scan())
        for name, reason in self.ignored.items():
            log.warning("feature store %s: %s is not committed: %s; an extraction run writes it again",
                        location.redacted(), name, reason)

    @classmethod
    def create(
        cls,
        url: str,
        metadata: StoreMetadata,
        *,
        exist_ok: bool = True,
        storage_options: dict[str, Any] | None = None,
    ) -> FeatureStore:
        """Create a store, or with `exist_ok` reopen one whose metadata is exactly `metadata`."""
        location = Location(url, storage_options)
        if location.exists(location.path(METADATA_FILE)):
            if not exist_ok:
                raise FileExistsError(f"a feature store already exists at {location.redacted()}")
            existing = read_metadata(location)
            differences = existing.differences(metadata)
            if differences:
                raise StoreMismatchError(
                    f"feature store at {location.redacted()} was created with different metadata "
                    "(stored != requested):\n  "
                    + "\n  ".join(differences)
                    + "\nwrite to a new store URL, or delete this store to re-extract"
                )
            return cls(location, existing)
        metadata = dataclasses.replace(metadata, store_id=uuid.uuid4().hex)  # a re-created store is another store
        location.makedirs(location.path(SHARDS_DIR))
        location.write_json(location.path(METADATA_FILE), metadata.to_dict())
        return cls(location, metadata)

    @classmethod
    def open(
        cls,
        url: str,
        *,
        expect_fingerprint: str | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> FeatureStore:
        """Open an existing store; refuse it if it holds features of another target than expected."""
        location = Location(url, storage_options)
        return cls(location, read_metadata(location, expect_fingerprint))

    @property
    def url(self) -> str:
        return self.location.url

    def __repr__(self) -> str:
        shown = self.location.redacted()
        return f"FeatureStore({shown!r}, shards={len(self._shards)}, samples={self.num_samples})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = {}  # zarr handles hold event-loop state; reopen them in the new process
        return state

    # --- writing -------------------------------------------------------------------------------

    def _scan(self) -> ShardScan:
        return scan_shards(self.location, self.metadata.store_id)

    def committed_shards(self) -> set[int]:
        """Ids of the shards committed right now (re-scanned on every call): the extraction job skips these."""
        return {record.shard_id for record in self._scan().records}

    def write_shard(self, shard_id: int, samples: Sequence[Mapping[str, Any]]) -> ShardRecord:
        """Validate and atomically write one shard; see `feature_store.shard.write_shard`.

        Each sample maps `sample_id` (str), `input_ids` [T], `loss_mask` [T], `hidden_states` [T, hidden_size]
        and, when topk > 0, `topk_values` [T, topk] (logits), `topk_indices` [T, topk], `logsumexp` [T],
        as numpy arrays or torch tensors of any int/float dtype. Safe to call from a Ray worker.
        Does not change this object's read view; reopen the store or call `commit_manifest()`.
        """
        return write_shard(self.location, self.metadata, shard_id, samples,
                           check_writer=lambda: self.check_writer(f"write shard {shard_id}"))

    def check_writer(self, action: str) -> None:
        """Raise unless this handle may still `action`: its store was not re-created, its job holds the lock."""
        try:
            current = self.location.read_json(self.location.path(METADATA_FILE)).get("store_id")
        except FileNotFoundError:
            current = None
        if current != self.metadata.store_id:
            raise StoreMismatchError(
                f"feature store at {self.location.redacted()} was deleted or re-created (store_id "
                f"{self.metadata.store_id} -> "
                f"{current}) while this writer ran, so it does not {action}: the new store is another job's"
            )
        if self.writer_owner is not None:
            ensure_owner(self.location, self.writer_owner, action)

    def commit_manifest(self) -> list[ShardRecord]:
        """Rebuild `manifest.parquet` from the commit records, refresh the read view, return the records."""
        scan = self._scan()
        self._write_manifest(scan.records)
        self._set_view(scan)
        return scan.records

    def _write_manifest(self, records: Sequence[ShardRecord]) -> pa.Table:
        rows = [{name: getattr(r, name) for name in MANIFEST_SCHEMA.names} for r in records]
        table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        self.location.write_bytes(self.location.path(MANIFEST_FILE), buffer.getvalue())
        return table

    def read_manifest(self) -> pa.Table | None:
        """The last manifest written by `commit_manifest()`, or None if there is none yet. A damaged one is
        rebuilt from the commit records with a warning: only which shards vanished since is lost with it."""
        path = self.location.path(MANIFEST_FILE)
        try:
            return pq.read_table(io.BytesIO(self.location.fs.cat_file(path)))
        except FileNotFoundError:
            return None
        except pa.ArrowException as exc:
            log.warning("feature store %s: %s is unreadable (%s); rebuilding it from the shard commit records",
                        self.location.redacted(), MANIFEST_FILE, exc)
            return self._write_manifest(self._scan().records)

    def remove_corrupt_shards(self) -> dict[str, str]:
        """Check every committed shard's data as `verify` does and delete the corrupt ones, for the writer to
        write them again; returns shard name -> what was wrong. Call it holding the writer lock."""
        corrupt = corrupt_shards(self.location, self.metadata, self._scan().records)
        for name, problem in corrupt.items():
            self.check_writer(f"remove the corrupt shard {name}")
            log.warning("feature store %s: %s is corrupt (%s); removing it to write it again",
                        self.location.redacted(), name, problem)
            remove_shard(self.location, name)
        self._set_view(self._scan())
        return corrupt

    def remove_partial_shards(self) -> list[str]:
        """Delete leftovers of killed writers and `ignored` shards, only while no writer runs; returns the names."""
        scan = self._scan()
        names = sorted([*partial_shard_names(self.location, scan), *scan.ignored])
        for name in names:
            self.location.remove(self.location.path(SHARDS_DIR, name))
        return names

    # --- reading -------------------------------------------------------------------------------

    def _set_view(self, scan: ShardScan) -> None:
        self.ignored = scan.ignored  # shard name -> why it is not committed (see ShardScan)
        self._shards = tuple(scan.records)
        self._sample_starts = np.cumsum([0] + [r.n_samples for r in scan.records])  # [n_shards + 1]
        self._arrays: dict[int, dict[str, zarr.Array]] = {}
        self._offsets: dict[int, np.ndarray] = {}
        self._first_loss: dict[int, np.ndarray] = {}
        self._sample_ids: dict[int, list[str]] = {}

    @property
    def shards(self) -> tuple[ShardRecord, ...]:
        return self._shards

    @property
    def num_samples(self) -> int:
        return int(self._sample_starts[-1])

    @property
    def num_tokens(self) -> int:
        return sum(r.n_tokens for r in self._shards)

    def _shard_arrays(self, pos: int) -> dict[str, zarr.Array]:
        if pos not in self._arrays:
            path = self.location.path(SHARDS_DIR, self._shards[pos].name)
            group = zarr.open_group(self.location.zarr_store(path, read_only=True), mode="r")
            names = ("sample_ids", "offsets", *self.metadata.token_arrays())
            self._arrays[pos] = {name: group[name] for name in names}
        return self._arrays[pos]

    def _shard_offsets(self, pos: int) -> np.ndarray:
        if pos not in self._offsets:
            self._offsets[pos] = self._shard_arrays(pos)["offsets"][...]
        return self._offsets[pos]

    def _shard_first_loss(self, pos: int) -> np.ndarray:
        # Cached like the offsets: the training and held-out windows of a run both need it.
        if pos not in self._first_loss:
            offsets = self._shard_offsets(pos)
            loss_mask = self._shard_arrays(pos)["loss_mask"][...].astype(bool)  # [n_tokens]
            firsts = []
            for begin, end in zip(offsets[:-1], offsets[1:], strict=True):
                hits = np.flatnonzero(loss_mask[begin:end])
                firsts.append(int(hits[0]) if hits.size else int(end - begin))
            self._first_loss[pos] = np.asarray(firsts, dtype=np.int64)
        return self._first_loss[pos]

    def _shard_sample_ids(self, pos: int) -> list[str]:
        if pos not in self._sample_ids:
            self._sample_ids[pos] = self._shard_arrays(pos)["sample_ids"][...].tolist()
        return self._sample_ids[pos]

    def _locate(self, index: int) -> tuple[int, int]:
        """Global sample index -> (shard position in the view, sample index inside that shard)."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample index {index} out of range for a store of {self.num_samples} samples")
        pos = int(np.searchsorted(self._sample_starts, index, side="right")) - 1
        return pos, int(index - self._sample_starts[pos])

    def sample(self, index: int, start: int = 0, stop: int | None = None) -> dict[str, Any]:
        """Sample `index` (tokens `start:stop` of it) as numpy arrays.

        Keys: sample_index, sample_id, input_ids int32 [T], loss_mask uint8 [T], hidden_states [T, h]
        (float16 for float16 stores; float32, exact, for bfloat16 stores since numpy has no bfloat16),
        and with topk > 0: topk_values [T, k], topk_indices int32 [T, k], logsumexp float32 [T].
        """
        pos, local = self._locate(index)
        offsets = self._shard_offsets(pos)
        begin, length = int(offsets[local]), int(offsets[local + 1] - offsets[local])
        stop = length if stop is None else stop
        if not 0 <= start < stop <= length:
            raise IndexError(
                f"token range [{start}, {stop}) is invalid for sample {index} of {length} tokens"
            )
        arrays = self._shard_arrays(pos)
        out: dict[str, Any] = {"sample_index": index, "sample_id": self._shard_sample_ids(pos)[local]}
        for name in self.metadata.token_arrays():
            out[name] = arrays[name][begin + start : begin + stop]
        out["hidden_states"] = decode_hidden(out["hidden_states"], self.metadata.hidden_dtype)
        return out

    def sample_lengths(self) -> np.ndarray:
        """Token count of every sample, by global index (int64 [num_samples])."""
        lengths = [np.diff(self._shard_offsets(pos)) for pos in range(len(self._shards))]
        return np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)

    def first_loss_positions(self) -> np.ndarray:
        """Index of the first loss-masked token of every sample (its length if it has none), int64 [num_samples]."""
        firsts = [self._shard_first_loss(pos) for pos in range(len(self._shards))]
        return np.concatenate(firsts) if firsts else np.zeros(0, dtype=np.int64)

    def sample_ids(self) -> list[str]:
        """Id of every sample, by global index."""
        return [sid for pos in range(len(self._shards)) for sid in self._shard_sample_ids(pos)]

    def prompt_digests(self) -> list[bytes]:
        """sha256 of every sample's prompt tokens (those before its first loss token), by global index; a
        sample with no prompt (loss from its first token) is digested whole, so that those are not all alike."""
        digests = []
        for pos in range(len(self._shards)):
            input_ids = self._shard_arrays(pos)["input_ids"][...]
            offsets, firsts = self._shard_offsets(pos), self._shard_first_loss(pos)
            for begin, end, first in zip(offsets[:-1], offsets[1:], firsts, strict=True):
                prompt = input_ids[begin : begin + first] if first else input_ids[begin:end]
                digests.append(hashlib.sha256(prompt.astype("<i4").tobytes()).digest())
        return digests

    def split(self, eval_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Deterministic (train_indices, eval_indices) of global sample indices.

        A sample goes to eval when sha256(seed, its prompt digest) mapped to [0, 1) is below eval_fraction.
        The prompt, not the id: the same conversation stored under two ids, or the same prompt with another
        (re)generated reply, would otherwise land on both sides and leak eval prompts into training. The
        side never changes when shards are added or reordered; the eval share is eval_fraction in
        expectation, not exactly (samples sharing a prompt go together).
        """
        if not 0.0 <= eval_fraction <= 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
        digests = self.prompt_digests()
        is_eval = np.array([_unit_hash(seed, digest) < eval_fraction for digest in digests], dtype=bool)
        return np.flatnonzero(~is_eval), np.flatnonzero(is_eval)

    def token_counts(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """How often each token id occurs at loss-masked positions (int64 [vocab_size]).

        Pass the training indices to build a reduced draft vocabulary without looking at eval data.
        """
        selected = None
        if indices is not None:
            selected = np.zeros(self.num_samples, dtype=bool)
            selected[np.asarray(indices, dtype=np.int64)] = True
        counts = np.zeros(self.metadata.vocab_size, dtype=np.int64)
        for pos in tqdm(range(len(self._shards)), desc="token counts", unit="shard"):
            arrays = self._shard_arrays(pos)
            keep = arrays["loss_mask"][...].astype(bool)
            if selected is not None:
                chosen = selected[self._sample_starts[pos] : self._sample_starts[pos + 1]]  # [n_samples]
                keep &= np.repeat(chosen, np.diff(self._shard_offsets(pos)))  # [n_tokens]
            counts += np.bincount(arrays["input_ids"][...][keep], minlength=self.metadata.vocab_size)
        return counts

    # --- checking ------------------------------------------------------------------------------

    def verify(self) -> VerifyReport:
        """Re-read every committed shard, recompute its checksums, and compare with records and manifest."""
        scan = self._scan()
        records = scan.records
        manifest = self.read_manifest()
        listed = {row["name"]: row for row in manifest.to_pylist()} if manifest is not None else {}
        report = VerifyReport(checked=[r.name for r in records],
                              corrupt=corrupt_shards(self.location, self.metadata, records),
                              ignored=scan.ignored, partial=partial_shard_names(self.location, scan))
        for record in records:
            if record.name in listed and listed[record.name]["checksum"] != record.checksum:
                problem = f"{MANIFEST_FILE} checksum differs from the commit record"
                report.corrupt.setdefault(record.name, problem)
        committed = {r.name for r in records}
        report.missing = sorted(set(listed) - committed - set(scan.ignored))
        report.unlisted = sorted(committed - set(listed))
        return report


def read_metadata(location: Location, expect_fingerprint: str | None = None) -> StoreMetadata:
    """A store's metadata; refused if it holds features of another target than `expect_fingerprint`."""
    try:
        values = location.read_json(location.path(METADATA_FILE))
    except FileNotFoundError:
        raise FileNotFoundError(f"no feature store at {location.redacted()} (no {METADATA_FILE})") from None
    metadata = StoreMetadata.from_dict(values, where=f"feature store at {location.redacted()}")
    if expect_fingerprint is not None and metadata.target_fingerprint != expect_fingerprint:
        raise StoreMismatchError(
            f"feature store at {location.redacted()} holds features of target "
            f"{metadata.target_fingerprint!r}, but target {expect_fingerprint!r} was expected; extract "
            "features for this target into a new store"
        )
    return metadata


def remove_store_files(location: Location) -> None:
    """Delete a whole store but its writer lock: the job deleting it (`--fresh`) keeps the store to itself."""
    for name in location.list_names(location.root):
        if name != LOCK_FILE:
            location.remove(location.path(name))


def _unit_hash(seed: int, key: bytes) -> float:
    digest = hashlib.sha256(f"{seed}\0".encode() + key).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64
