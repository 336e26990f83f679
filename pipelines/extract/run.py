"""The extraction driver: plan the pending shards, run Ray Data over them under the store's writer lock, summarise."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
import ray.data
from tqdm.auto import tqdm

from feature_store import FeatureStore, StoreLockedError, StoreMetadata, StoreMismatchError, WriterLock
from feature_store.storage import Location
from feature_store.store import METADATA_FILE, read_metadata, remove_store_files
from pipelines.data import DataError, RejectCounter
from pipelines.extract.actor import ShardFeatures, store_metadata, target_description
from pipelines.extract.config import ExtractConfig, ExtractError
from pipelines.extract.records import needs_reply, read_records
from pipelines.extract.sink import FeatureStoreSink
from pipelines.ray_utils import quiet_ray_data, ray_session, task_error_cause
from pipelines.tracking import redact

PROGRESS_POLL_S = 5.0


def feature_stages(dataset, cfg: ExtractConfig, store: FeatureStore):
    """Shard rows of records (shard_id, records, info as JSON) -> shard rows for `FeatureStoreSink`."""
    return dataset.map_batches(
        ShardFeatures,
        batch_size=1,  # one shard per call: the actor batches the shard's samples itself
        batch_format="numpy",
        fn_constructor_kwargs={"cfg": cfg, "expect_fingerprint": store.metadata.target_fingerprint},
        **cfg.forward_actors.map_batches_args(),
    )


def write_features(dataset, cfg: ExtractConfig, store: FeatureStore) -> list[dict[str, Any]]:
    """Run the pipeline into the store; per-shard results of the shards this run processed."""
    sink = FeatureStoreSink(store)
    dataset.write_datasink(sink, ray_remote_args={"num_cpus": cfg.task_num_cpus})
    return sink.shard_results


@contextlib.contextmanager
def shard_progress(store: FeatureStore, total: int, committed: int) -> Iterator[None]:
    """One progress bar over the store's shards, counted from their commit records (what a resume keeps), polled
    in a thread while Ray Data runs."""
    bar = tqdm(total=total, initial=committed, desc="extract", unit=" shard", file=sys.stderr, dynamic_ncols=True,
               mininterval=PROGRESS_POLL_S if sys.stderr.isatty() else 60)
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(PROGRESS_POLL_S):
            bar.update(len(store.committed_shards()) - bar.n)

    thread = threading.Thread(target=poll, name="extract-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.update(len(store.committed_shards()) - bar.n)
        bar.close()


def pending_shard_rows(records: list[dict[str, Any]], cfg: ExtractConfig,
                       store: FeatureStore) -> tuple[list[dict[str, Any]], int, bool]:
    """(rows of the shards still to write, number of shards already committed, whether any needs generation).

    A shard not committed is done again from its records: generation is deterministic (greedy, or seeded per
    record), so a resumed store equals an uninterrupted one.
    """
    committed = store.committed_shards()
    rows, generate = [], False
    for shard_id in range(-(-len(records) // cfg.samples_per_shard)):
        if shard_id in committed:
            continue
        shard_records = records[shard_id * cfg.samples_per_shard : (shard_id + 1) * cfg.samples_per_shard]
        generate |= cfg.generation.enabled and any(needs_reply(r) for r in shard_records)
        rows.append({"shard_id": shard_id, "records": json.dumps(shard_records), "info": "{}"})
    return rows, len(committed), generate


@contextlib.contextmanager
def writer_lock(cfg: ExtractConfig) -> Iterator[WriterLock]:
    """The store's writer lock, held for the whole job (see feature_store.lock); refused if another job has it."""
    try:
        lock = WriterLock(Location(cfg.store, cfg.storage_options), cfg.lock_timeout_s).acquire()
    except StoreLockedError as exc:
        raise ExtractError(str(exc)) from None
    try:
        yield lock
    finally:
        lock.release()


def open_store(cfg: ExtractConfig, metadata: StoreMetadata, fresh: bool) -> FeatureStore:
    """The store to write, created or reopened; call it holding the store's writer lock, which --fresh keeps."""
    location = Location(cfg.store, cfg.storage_options)
    if fresh and location.exists(location.root):
        print(f"extract: --fresh: removing the existing store at {redact(cfg.store)}", file=sys.stderr)
        remove_store_files(location)
    try:
        if location.exists(location.path(METADATA_FILE)):
            read_metadata(location, expect_fingerprint=metadata.target_fingerprint)
        return FeatureStore.create(cfg.store, metadata, storage_options=cfg.storage_options)
    except StoreMismatchError as exc:
        raise ExtractError(f"{exc}\n(pass --fresh to delete the existing store and extract again)") from None


def run(cfg: ExtractConfig, *, fresh: bool = False) -> dict[str, Any]:
    """Extract features for every input record not yet in the store; print and return a summary."""
    started = time.perf_counter()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "rejects.jsonl").unlink(missing_ok=True)  # describes the last run only
    rejects = RejectCounter(run_dir / "rejects.jsonl")
    with writer_lock(cfg) as lock, ray_session(cfg.ray):
        describe = ray.remote(target_description).options(
            num_cpus=cfg.forward_actors.num_cpus, num_gpus=cfg.forward_actors.num_gpus
        )
        target, tokenizer = ray.get(describe.remote(cfg))
        if not getattr(tokenizer, "is_fast", False) or not getattr(tokenizer, "chat_template", None):
            raise ExtractError(f"target {cfg.target!r}: need a fast tokenizer with a chat template")
        try:
            records = read_records(cfg, rejects)
        except DataError as exc:
            raise ExtractError(str(exc)) from None
        if not records:
            raise ExtractError(f"no usable records in {cfg.inputs}\n{rejects.table()}")
        store = open_store(cfg, store_metadata(cfg, target, tokenizer, records), fresh)
        store.writer_owner = lock.owner  # the job's shard writers check the lock before each commit
        corrupt = store.remove_corrupt_shards() if cfg.verify_on_resume else {}  # extracted again below
        rows, n_skipped, generate = pending_shard_rows(records, cfg, store)
        print(f"extract: {len(records)} records -> {n_skipped + len(rows)} shards; {n_skipped} already "
              f"committed, {len(rows)} to write{' (with generation)' if generate else ''}", file=sys.stderr)
        try:
            results = []
            if rows:
                quiet_ray_data()
                dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
                with shard_progress(store, n_skipped + len(rows), n_skipped):
                    results = write_features(feature_stages(dataset, cfg, store), cfg, store)
            store.check_writer("write the manifest")
        except (StoreLockedError, StoreMismatchError, ExtractError) as exc:  # e.g. another job took the store
            # Raised in an actor or a shard writer it arrives wrapped by Ray, whose str() is the worker traceback.
            raise ExtractError(str(task_error_cause(exc))) from None
        store.commit_manifest()
    for result in results:
        for entry in result.get("rejects", []):
            rejects.reject(entry.pop("reason"), raw=entry.pop("raw"), detail=entry.pop("detail"), **entry)
        for note, count in result.get("notes", {}).items():
            rejects.merge({note: count})
    elapsed = time.perf_counter() - started
    summary = summarise(cfg, store, target, results, n_skipped, rejects, elapsed, corrupt)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary, rejects))
    return summary


def summarise(cfg, store: FeatureStore, target, results, n_skipped, rejects: RejectCounter, elapsed,
              corrupt: Mapping[str, str] | None = None) -> dict:
    def total(key: str) -> int:
        return sum(int(r.get(key, 0)) for r in results)

    store_bytes = sum(record.nbytes for record in store.shards)
    raw_per_token = store.metadata.raw_bytes_per_token()
    bytes_per_token = store_bytes / store.num_tokens if store.num_tokens else 0.0
    return redact({  # the summary is printed and kept: no credentials
        "store": cfg.store,
        "target": target,
        "elapsed_s": round(elapsed, 2),
        "shards_skipped": n_skipped,
        "shards_corrupt": dict(corrupt or {}),  # shard name -> what was wrong; removed and extracted again
        "shards_written": sum(r["n_samples"] > 0 for r in results),
        "samples_written": total("n_samples"),
        "tokens_written": total("n_tokens"),
        "loss_tokens_written": total("n_loss_tokens"),
        "tokens_per_s": round(total("n_tokens") / elapsed, 1),
        "replies_generated": total("generated_replies"),
        "tokens_generated": total("generated_tokens"),
        "rejects": dict(sorted(rejects.counts.items())),
        "rejected": rejects.rejected,
        "store_shards": len(store.shards),
        "store_samples": store.num_samples,
        "store_tokens": store.num_tokens,
        "store_bytes": store_bytes,
        "bytes_per_token": round(bytes_per_token, 1),
        "raw_bytes_per_token": raw_per_token,
        "stored_vs_raw": round(bytes_per_token / raw_per_token, 3),
        "config": asdict(cfg),
    })


def format_summary(summary: Mapping[str, Any], rejects: RejectCounter) -> str:
    s = summary
    return "\n".join([
        f"extracted into {s['store']} in {s['elapsed_s']:.1f} s",
        f"  this run: {s['shards_written']} shards, {s['samples_written']} samples, {s['tokens_written']} tokens "
        f"({s['loss_tokens_written']} with loss), {s['tokens_per_s']} tokens/s; {s['shards_skipped']} shards "
        "were already committed",
        *[f"  corrupt {name}: {why}; removed, extracted again" for name, why in s["shards_corrupt"].items()],
        f"  replies: {s['replies_generated']} generated ({s['tokens_generated']} tokens)",
        f"  store: {s['store_shards']} shards, {s['store_samples']} samples, {s['store_tokens']} tokens, "
        f"{s['store_bytes'] / 1e6:.1f} MB = {s['bytes_per_token']} bytes/token "
        f"({s['stored_vs_raw']}x the raw {s['raw_bytes_per_token']} bytes/token)",
        rejects.table("  skipped (input rejects every run; later rejects for the shards written this run)"),
    ])
