"""One shard: a Zarr v3 group of a few samples' features, written once by one writer and committed atomically.

Layout of `shards/shard-00042/`:

    zarr.json              group metadata (attributes: schema_version, shard_id)
    sample_ids/            string [n_samples]
    offsets/               int64 [n_samples + 1]; sample j holds tokens offsets[j]:offsets[j+1]
    input_ids/ loss_mask/ hidden_states/ [topk_values/ topk_indices/ logsumexp/]
                           per-token arrays, concatenated over the shard's samples
    COMMITTED.json         the commit record (counts, byte size, checksums, store_id), written LAST

Each per-token array is split into chunks of about 1 MiB along the token axis (random access reads
one or two chunks per sample) and all its chunks sit in one Zarr shard file (few files per shard,
cheap on object stores). Chunks are compressed with Blosc zstd level 3 with byte shuffle (bit
shuffle was measured and compressed hidden states worse) and carry a crc32c, so a damaged chunk
raises on read instead of feeding garbage to training.

Commit protocol. A shard counts as written only when its `COMMITTED.json` exists, parses, and names
this store's `store_id`; readers, the manifest and `committed_shards()` ignore anything else. A
commit record that is damaged, or names another store (written by a writer that outlived a re-create
of the store at the same URL), is reported by shard name (`ShardScan.ignored`) and its shard is
rewritten by the next extraction run. So is a committed shard whose data no longer matches its checksums
(`check_shard`): the run removes it, commit record first (`remove_shard`), and writes it again.
- Local disk: the shard is written under `shards/.tmp-shard-00042-<uuid>/`, the commit record is
  written last inside it, everything is fsync'ed, and one `os.rename` makes the whole directory
  visible as `shards/shard-00042/`. A crash leaves only a `.tmp-` directory.
- Object stores (fsspec URLs where renaming a prefix is a copy, not atomic): the shard is written
  in place under its final name, and the commit record, a single atomic PUT, is written last. A
  crash leaves a `shard-00042/` prefix without a commit record: partial, hence invisible.
Before writing, the writer deletes whatever an earlier, killed attempt at the same shard left; before
that and again before committing, it checks that it may still write (`check_writer`: the store was
not re-created, the job still holds the writer lock). Writing is deterministic, so a rerun reproduces
the same bytes and checksums.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import zarr
from tqdm.auto import tqdm
from zarr.codecs import BloscCodec, Crc32cCodec

from feature_store.schema import SCHEMA_VERSION, StoreMetadata, normalize_samples
from feature_store.storage import Location, fsync_dir, fsync_tree

log = logging.getLogger(__name__)

SHARDS_DIR = "shards"
COMMIT_FILE = "COMMITTED.json"
TMP_PREFIX = ".tmp-"
_SHARD_NAME = re.compile(r"shard-(\d+)")

CHUNK_BYTES = 1 << 20  # target size of one uncompressed chunk
# Order in which arrays enter the shard checksum; never reorder (it would change every checksum).
CHECKSUM_ORDER = (
    "sample_ids",
    "offsets",
    "input_ids",
    "loss_mask",
    "hidden_states",
    "topk_values",
    "topk_indices",
    "logsumexp",
)


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:05d}"


def parse_shard_name(name: str) -> int | None:
    match = _SHARD_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class ShardRecord:
    """The commit record of one shard (its `COMMITTED.json`, and one row of the manifest)."""

    shard_id: int
    name: str
    n_samples: int
    n_tokens: int
    n_loss_tokens: int
    nbytes: int  # stored bytes of the shard's files, commit record excluded
    checksum: str  # sha256 over the array checksums in CHECKSUM_ORDER
    array_checksums: dict[str, str]
    store_id: str  # the store this shard was written for (StoreMetadata.store_id)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> ShardRecord:
        return cls(**values)


def array_checksum(name: str, dtype: np.dtype, shape: tuple[int, ...], blocks: Iterable[np.ndarray]) -> str:
    """sha256 over name, dtype, shape and the C-order bytes of an array given as consecutive row blocks."""
    digest = hashlib.sha256(f"{name}|{dtype.str}|{tuple(shape)}".encode())
    for block in blocks:
        digest.update(np.ascontiguousarray(block, dtype=dtype).data)
    return digest.hexdigest()


def sample_ids_checksum(sample_ids: Sequence[str]) -> str:
    return hashlib.sha256(b"sample_ids|json|" + json.dumps(list(sample_ids)).encode()).hexdigest()


def shard_checksum(array_checksums: Mapping[str, str]) -> str:
    lines = "".join(f"{name}={array_checksums[name]}\n" for name in CHECKSUM_ORDER if name in array_checksums)
    return hashlib.sha256(lines.encode()).hexdigest()


def chunk_tokens(row_nbytes: int, n_tokens: int) -> int:
    """Tokens per chunk: a power of two near CHUNK_BYTES, in [128, 65536], no bigger than the array needs."""
    target = 1 << min(16, max(7, (CHUNK_BYTES // row_nbytes).bit_length() - 1))
    return min(target, 1 << (n_tokens - 1).bit_length())


def _write_array(group: zarr.Group, name: str, data: np.ndarray) -> None:
    n_tokens = data.shape[0]
    chunk = chunk_tokens(data.dtype.itemsize * int(np.prod(data.shape[1:])), n_tokens)
    whole = -(-n_tokens // chunk) * chunk  # all chunks of the array in one zarr shard file
    array = group.create_array(
        name,
        shape=data.shape,
        dtype=data.dtype,
        chunks=(chunk, *data.shape[1:]),
        shards=(whole, *data.shape[1:]),
        compressors=(BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), Crc32cCodec()),
        fill_value=0,
    )
    array[...] = data


def parse_commit_record(data: bytes, directory: str, store_id: str | None) -> ShardRecord | str:
    """The commit record found in `shards/<directory>/`, or why it does not commit that shard to this store."""
    try:
        record = ShardRecord.from_json(json.loads(data))
    except (ValueError, TypeError) as exc:  # truncated or garbled JSON, missing or unknown keys
        return f"unreadable {COMMIT_FILE} ({type(exc).__name__}: {exc})"
    if record.name != directory or record.name != shard_name(record.shard_id):
        return f"{COMMIT_FILE} names shard {record.shard_id} ({record.name!r})"
    if record.store_id != store_id:
        return (f"written for another store (store_id {record.store_id}, this store is {store_id}): the store "
                "was re-created while a writer of the old one still ran")
    return record


def read_commit_record(location: Location, name: str, store_id: str | None) -> ShardRecord | None:
    """The record committing shard `name` to this store, or None (absent, damaged, or of another store)."""
    try:
        data = location.fs.cat_file(location.path(SHARDS_DIR, name, COMMIT_FILE))
    except FileNotFoundError:
        return None
    record = parse_commit_record(data, name, store_id)
    return record if isinstance(record, ShardRecord) else None


@dataclass(frozen=True)
class ShardScan:
    """What `shards/` holds for one store: the source of truth for which shards are committed."""

    records: list[ShardRecord]  # the committed shards, by shard id
    ignored: dict[str, str]  # shard name -> why its commit record does not count (damaged, another store)


def scan_shards(location: Location, store_id: str | None) -> ShardScan:
    """Read every commit record under shards/; the usable ones commit their shard, the rest are ignored."""
    # One listing plus one batched read, not a request per shard (matters on object stores).
    found = location.glob(location.path(SHARDS_DIR, "shard-*", COMMIT_FILE))
    paths = sorted(p for p in found if parse_shard_name(p.rstrip("/").split("/")[-2]) is not None)
    records, ignored = [], {}
    for path, data in location.read_many(paths).items():
        directory = path.rstrip("/").split("/")[-2]
        record = parse_commit_record(data, directory, store_id)
        if isinstance(record, ShardRecord):
            records.append(record)
        else:
            ignored[directory] = record
    return ShardScan(sorted(records, key=lambda r: r.shard_id), dict(sorted(ignored.items())))


def partial_shard_names(location: Location, scan: ShardScan) -> list[str]:
    """Entries under shards/ with no commit record at all: leftovers of killed writers."""
    names = location.list_names(location.path(SHARDS_DIR))
    known = {r.name for r in scan.records} | set(scan.ignored)
    return [
        n for n in names if n not in known and (n.startswith(TMP_PREFIX) or parse_shard_name(n) is not None)
    ]


def check_shard(location: Location, metadata: StoreMetadata, record: ShardRecord) -> str | None:
    """Re-read a committed shard and recompute its checksums: None if its data matches its record, else what
    is wrong. Reads every byte, streamed."""
    computed: dict[str, str] = {}
    reading = "its zarr group"  # named in the problem, so that a reader of the report knows what broke
    try:
        group = zarr.open_group(location.zarr_store(location.path(SHARDS_DIR, record.name), read_only=True),
                                mode="r")
        reading = "sample_ids"
        computed["sample_ids"] = sample_ids_checksum(group["sample_ids"][...].tolist())
        for reading in ("offsets", *metadata.token_arrays()):
            array = group[reading]
            rows = array.chunks[0] * 16  # stream: a shard's hidden states may not fit in memory
            blocks = (array[i : i + rows] for i in range(0, array.shape[0], rows))
            computed[reading] = array_checksum(reading, np.dtype(array.dtype), array.shape, blocks)
    except Exception as exc:  # damaged data fails in many ways (crc, codec, missing key); all mean corrupt
        return f"{reading} unreadable: {type(exc).__name__}: {exc}"
    bad = [name for name in CHECKSUM_ORDER if computed.get(name) != record.array_checksums.get(name)]
    if bad:
        return f"checksum mismatch in {', '.join(bad)}"
    if shard_checksum(computed) != record.checksum:
        return "shard checksum differs from the commit record"
    return None


def corrupt_shards(
    location: Location, metadata: StoreMetadata, records: Sequence[ShardRecord]
) -> dict[str, str]:
    """Shard name -> what is wrong with its data, for each of `records` that fails `check_shard`."""
    checked = tqdm(records, desc="verify", unit="shard", disable=not records)  # no bar over nothing
    problems = {record.name: check_shard(location, metadata, record) for record in checked}
    return {name: problem for name, problem in problems.items() if problem is not None}


def remove_shard(location: Location, name: str) -> None:
    """Delete a committed shard, its commit record first: a crash midway leaves a partial shard, which readers
    ignore and the next writer of that shard deletes."""
    location.remove(location.path(SHARDS_DIR, name, COMMIT_FILE))
    location.remove(location.path(SHARDS_DIR, name))


def _remove_leftovers(location: Location, name: str) -> None:
    """Delete what earlier, killed attempts at this shard left behind."""
    for entry in location.list_names(location.path(SHARDS_DIR)):
        if entry == name or entry.startswith(f"{TMP_PREFIX}{name}-"):
            log.info("removing partial shard %s", location.redacted(SHARDS_DIR, entry))
            location.remove(location.path(SHARDS_DIR, entry))


def write_shard(
    location: Location,
    metadata: StoreMetadata,
    shard_id: int,
    samples: Sequence[Mapping[str, Any]],
    check_writer: Callable[[], None] = lambda: None,
) -> ShardRecord:
    """Validate, write and commit one shard (see the module docstring for the protocol).

    If the shard is already committed it is left alone and its record returned, so a retried task
    (e.g. a Ray task re-run after its worker died) is harmless. Exactly one writer may write a
    given shard id at a time. `check_writer` raises when this writer must no longer touch the store.
    """
    if not isinstance(shard_id, (int, np.integer)) or shard_id < 0:
        raise ValueError(f"shard_id must be a non-negative integer, got {shard_id!r}")
    shard_id = int(shard_id)
    name = shard_name(shard_id)
    existing = read_commit_record(location, name, metadata.store_id)
    if existing is not None:
        log.info("shard %s already committed; skipping", name)
        return existing
    sample_ids, offsets, token_arrays = normalize_samples(samples, metadata, shard_id)
    check_writer()
    _remove_leftovers(location, name)  # incl. a shard whose commit record is damaged or of another store
    final = location.path(SHARDS_DIR, name)
    target = (
        location.path(SHARDS_DIR, f"{TMP_PREFIX}{name}-{uuid.uuid4().hex}") if location.is_local else final
    )

    group = zarr.open_group(
        location.zarr_store(target, read_only=False),
        mode="w",
        attributes={"schema_version": SCHEMA_VERSION, "shard_id": shard_id},
    )
    ids_array = group.create_array(
        "sample_ids", shape=(len(sample_ids),), dtype=str, chunks=(len(sample_ids),)
    )
    ids_array[...] = np.array(sample_ids)
    arrays = {"offsets": offsets, **token_arrays}
    for array_name, data in arrays.items():
        _write_array(group, array_name, data)

    checksums = {"sample_ids": sample_ids_checksum(sample_ids)}
    checksums |= {n: array_checksum(n, a.dtype, a.shape, [a]) for n, a in arrays.items()}
    record = ShardRecord(
        shard_id=shard_id,
        name=name,
        n_samples=len(sample_ids),
        n_tokens=int(offsets[-1]),
        n_loss_tokens=int(token_arrays["loss_mask"].sum()),
        nbytes=location.nbytes(target),
        checksum=shard_checksum(checksums),
        array_checksums=checksums,
        store_id=metadata.store_id,
    )
    check_writer()
    location.write_json(f"{target}/{COMMIT_FILE}", record.to_json())
    if location.is_local:
        _publish_local(target, final, record)
    log.info(
        "committed %s: %d samples, %d tokens, %d bytes",
        name,
        record.n_samples,
        record.n_tokens,
        record.nbytes,
    )
    return record


def _publish_local(tmp: str, final: str, record: ShardRecord) -> None:
    fsync_tree(tmp)
    try:
        os.rename(tmp, final)
    except OSError:
        # Another attempt at this shard committed first (e.g. a zombie of a retried task): keep its copy.
        if not os.path.exists(os.path.join(final, COMMIT_FILE)):
            raise
        log.warning("%s was committed concurrently; discarding this copy", record.name)
        shutil.rmtree(tmp)
        return
    fsync_dir(os.path.dirname(final))
