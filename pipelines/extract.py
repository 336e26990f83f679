"""Feature extraction on Ray Data: conversations in, a committed Zarr feature store out.

    read + normalise (driver) -> tokenise, [generate replies], target features -> write shards
                                 actor pool (ShardFeatures)                       Datasink tasks

One row of the Ray dataset is one whole feature-store SHARD: sample i of the deterministic input order
belongs to shard i // samples_per_shard, and every stage maps a shard row to a shard row. So each shard
is written by exactly one writer whatever Ray does with blocks, a shard's batches are formed from its own
samples (the same bits on every run), and resuming is per shard: committed shards are dropped before any
work, partial ones are done again from their records.

Greedy replies keep the features of the decode that wrote them (pipelines.target_features): no second
forward over the reply. Reading and normalising run on the driver: sample indices need one sequential pass
over the inputs, and parsing JSON is negligible next to the target's work.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
import torch
from ray.data import Datasink
from ray.data.block import BlockAccessor
from ray.exceptions import RayTaskError
from tqdm.auto import tqdm

from falcon.generate import SamplingConfig, autoregressive_generate
from falcon.target import (
    describe_target,
    eos_token_ids,
    load_target,
    resolve_dtype,
    target_fingerprint,
    target_parts,
)
from feature_store import FeatureStore, StoreLockedError, StoreMetadata, StoreMismatchError, WriterLock
from feature_store.lock import DEFAULT_STALE_AFTER_S
from feature_store.schema import HIDDEN_DTYPES, TOPK_DTYPES, decode_hidden
from feature_store.shard import shard_name
from feature_store.storage import Location
from feature_store.store import METADATA_FILE, read_metadata, remove_store_files
from pipelines.data import (
    DEFAULT_MAX_CHARS,
    FORMATS,
    DataError,
    RejectCounter,
    Rejected,
    read_conversations,
    tokenize_conversation,
)
from pipelines.ray_utils import ActorPoolConfig, RayConfig, ray_session
from pipelines.target_features import (
    forward_batches,
    forward_features,
    greedy_replies_with_features,
    hidden_for_storage,
)
from pipelines.tracking import redact

TARGET_DTYPES = ("float32", "bfloat16", "float16")


log = logging.getLogger(__name__)


class ExtractError(RuntimeError):
    """The extraction cannot run as configured; the message says why and what to do."""


@dataclass
class GenerationConfig:
    # Generate the assistant reply of records that end with a user turn (self-distillation). Off: such
    # records are rejected ("no_assistant_turn").
    enabled: bool = True
    # Cap on new tokens; each reply is further capped at max_len - prompt length.
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0  # sampling seed; each record draws from its own generator seeded by (seed, id)
    # Greedy replies are decoded up to this many prompts of a shard at a time (left-padded; on CPU a step of
    # 64 rows costs far less than 64 steps of one), within batch_tokens = rows x (prompt + reply budget), which
    # bounds the KV cache. Sampled replies go one by one, so a record's seed fixes its reply.
    batch_size: int = 64
    batch_tokens: int = 16384

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1 or self.batch_tokens < 1:
            raise ValueError(f"generation.batch_size and batch_tokens must be >= 1, got {self.batch_size}, "
                             f"{self.batch_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")

    def content_settings(self) -> dict[str, Any]:
        """The settings that change generated replies (recorded in the store's metadata)."""
        return {
            "enabled": self.enabled,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p if self.temperature > 0 else 1.0,
            "seed": self.seed if self.temperature > 0 else 0,
        }


@dataclass
class ExtractConfig:
    inputs: list[str]  # files, directories or globs of ShareGPT / OpenAI JSON, JSONL(.gz) or Parquet
    store: str  # feature store URL: a local path or any fsspec URL (s3://, gs://, ...)
    run_dir: str = "runs/extract"  # local folder for rejects.jsonl and summary.json of the last run
    input_format: str = "auto"  # "auto" | "sharegpt" | "openai"
    max_chars: int | None = DEFAULT_MAX_CHARS  # longer conversations are rejected before tokenising
    shuffle_seed: int | None = None  # shuffle the records (deterministically) before taking max_samples
    max_samples: int | None = None  # keep the first N records
    target: str | None = None  # falcon.target.load_target spec; None: the default SmolLM2-135M-Instruct
    trust_remote_code: bool = False
    device: str = "cpu"
    dtype: str = "auto"  # dtype of the target forward (auto: see falcon.target.resolve_dtype)
    max_len: int = 2048  # tokens per sample, prompt + reply
    samples_per_shard: int = 64
    hidden_dtype: str = "bfloat16"
    topk: int = 32  # stored top-k logits per token (0: none)
    topk_dtype: str = "float32"  # bf16 logits are exact in float32 and compress to their bf16 size
    forward_batch_tokens: int = 8192  # padded tokens (rows x longest) per target forward
    forward_actors: ActorPoolConfig = field(default_factory=ActorPoolConfig)
    task_num_cpus: float = 0.25  # CPU reservation of the tokenise and write tasks
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for the store URL
    # The store's writer lock is stale once its heartbeat is this old (a job on another host died).
    lock_timeout_s: float = DEFAULT_STALE_AFTER_S
    # Re-read the committed shards of an existing store, re-extract the corrupt ones: ~1 s per 100 MB here,
    # so seconds for the demo but hours for a store of a 7B target's ShareGPT features (~500 GB).
    verify_on_resume: bool = True

    def __post_init__(self) -> None:
        self.dtype = resolve_dtype(self.dtype, self.device)  # the store records the dtype its features had
        checks = [
            (bool(self.inputs), f"inputs must name at least one file, got {self.inputs!r}"),
            (self.input_format in FORMATS, f"input_format must be one of {FORMATS}"),
            (self.dtype in TARGET_DTYPES, f"dtype must be one of {TARGET_DTYPES}"),
            (self.hidden_dtype in HIDDEN_DTYPES, f"hidden_dtype must be one of {sorted(HIDDEN_DTYPES)}"),
            (self.topk_dtype in TOPK_DTYPES, f"topk_dtype must be one of {sorted(TOPK_DTYPES)}"),
            (self.topk >= 0, "topk must be >= 0"),
            (self.max_len >= 2, "max_len must be >= 2"),
            (self.samples_per_shard >= 1, "samples_per_shard must be >= 1"),
            (self.forward_batch_tokens >= 1, "forward_batch_tokens must be >= 1"),
            (self.max_samples is None or self.max_samples >= 1, "max_samples must be >= 1 or null"),
            (self.task_num_cpus > 0, "task_num_cpus must be > 0"),
            (self.lock_timeout_s > 0, "lock_timeout_s must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def content_settings(self) -> dict[str, Any]:
        """Settings that change the stored features, for the store's metadata (not resources or paths)."""
        return {
            "max_len": self.max_len,
            "samples_per_shard": self.samples_per_shard,
            "dtype": self.dtype,
            "generation": self.generation.content_settings(),
        }


# ---------------------------------------------------------------------------------------------------
# Records: read and normalised on the driver, assigned to shards by position


def read_records(cfg: ExtractConfig, rejects: RejectCounter) -> list[dict[str, Any]]:
    """Normalised records of every input, in the deterministic order that numbers the samples."""
    records, seen_ids = [], set()
    for path in cfg.inputs:
        rows = read_conversations(
            path, cfg.input_format, rejects=rejects, require_reply=not cfg.generation.enabled,
            max_chars=cfg.max_chars,
        )
        for record in tqdm(rows, desc=f"read {path}", unit=" rec", file=sys.stderr):
            if record["id"] in seen_ids:  # read_conversations deduplicates within one input only
                rejects.reject("duplicate_id", source_file=path, sample_id=record["id"], raw=record)
                continue
            seen_ids.add(record["id"])
            records.append(record)
    if cfg.shuffle_seed is not None:
        random.Random(cfg.shuffle_seed).shuffle(records)
    return records[: cfg.max_samples]


def records_digest(records: Iterable[Mapping[str, Any]]) -> str:
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


def needs_reply(record: Mapping[str, Any]) -> bool:
    return record["messages"][-1]["role"] != "assistant"


# ---------------------------------------------------------------------------------------------------
# The target, loaded once per actor


def load_actor_target(cfg: ExtractConfig, pool: ActorPoolConfig, expect_fingerprint: str | None = None):
    """The target for one actor, checked to be the store's target (a node may hold another copy)."""
    if pool.torch_threads is not None:
        torch.set_num_threads(pool.torch_threads)
    model, tokenizer = load_target(
        cfg.target, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code
    )
    if expect_fingerprint is not None and target_fingerprint(model, tokenizer) != expect_fingerprint:
        raise ExtractError(
            f"target {cfg.target!r} on this worker has fingerprint {target_fingerprint(model, tokenizer)}, "
            f"the store expects {expect_fingerprint}: every node must hold the same target"
        )
    return model, tokenizer


def _describe_target(cfg: ExtractConfig) -> tuple[dict[str, Any], Any]:
    """(describe_target summary, tokenizer), computed in a Ray worker so the driver never loads weights."""
    model, tokenizer = load_actor_target(cfg, cfg.forward_actors)
    return describe_target(model, tokenizer), tokenizer


def store_metadata(cfg: ExtractConfig, target: Mapping[str, Any], tokenizer, records) -> StoreMetadata:
    return StoreMetadata(
        target_fingerprint=target["fingerprint"],
        tokenizer=f"{type(tokenizer).__name__}(vocab={len(tokenizer)})",
        hidden_size=target["hidden_size"],
        vocab_size=target["vocab_size"],
        topk=cfg.topk,
        hidden_dtype=cfg.hidden_dtype,
        topk_dtype=cfg.topk_dtype,
        extraction_config={
            **cfg.content_settings(),
            "num_records": len(records),
            "records_sha256": records_digest(records),
        },
    )


# ---------------------------------------------------------------------------------------------------
# Stage 1: one actor per shard turns its records into token ids and the target's features


def record_seed(seed: int, sample_id: str) -> int:
    """The sampling seed of one record's reply: the same whichever actor, shard order or rerun generates it."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{sample_id}".encode()).digest()[:8], "big") >> 1


def tokenize_record(record: Mapping[str, Any], tokenizer, max_len: int, generate: bool) -> dict[str, Any] | Rejected:
    """input_ids and loss_mask of a record; one that ends with a user turn is a prompt when `generate`."""
    sample = tokenize_conversation(record["messages"], tokenizer, max_len, sample_id=record["id"])
    if isinstance(sample, Rejected) or not sample["needs_generation"]:
        return sample
    if not generate:
        return Rejected("no_assistant_turn", "ends with a user turn and generation is off")
    if len(sample["input_ids"]) >= max_len:
        return Rejected("over_long", f"prompt of {len(sample['input_ids'])} tokens leaves no room under "
                                     f"max_len {max_len} for a reply")
    return sample


class ShardFeatures:
    """Actor: shard rows of records -> shard rows of token ids, loss masks and the target's per-token features.

    Records that end with a user turn get the target's own reply (self-distillation). Greedy replies keep the
    features of the decode that wrote them; sampled ones (one by one, so a record's seed fixes its reply) and
    the inputs' own replies get them from one forward, `forward_batch_tokens` padded tokens at a time.
    """

    def __init__(self, cfg: ExtractConfig, expect_fingerprint: str | None = None):
        self.cfg = cfg
        self.model, self.tokenizer = load_actor_target(cfg, cfg.forward_actors, expect_fingerprint)
        self.decoder, _, self.lm_head = target_parts(self.model)
        self.eos_token_ids = eos_token_ids(self.model, self.tokenizer)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self.shard(int(shard_id), json.loads(records), json.loads(info))
                for shard_id, records, info in zip(batch["shard_id"], batch["records"], batch["info"], strict=True)]
        return {name: _objects([row[name] for row in rows]) for name in rows[0]}

    def shard(self, shard_id: int, records: list[dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
        rejects, notes = info.setdefault("rejects", []), info.setdefault("notes", {})
        samples = {}
        for record in records:
            sample = tokenize_record(record, self.tokenizer, self.cfg.max_len, self.cfg.generation.enabled)
            if isinstance(sample, Rejected):
                rejects.append({"reason": sample.reason, "detail": sample.detail, "sample_id": record["id"],
                                "source": record["source"], "raw": json.dumps(record)[:500]})
                continue
            if sample["truncated"]:
                notes["truncated"] = notes.get("truncated", 0) + 1
            samples[record["id"]] = sample
        features = self._generate(shard_id, samples, info)
        self._forward({sample_id: s for sample_id, s in samples.items() if sample_id not in features}, features)
        return self._shard_row(shard_id, info, samples, features)

    def _generate(self, shard_id: int, samples: dict[str, dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
        """Append the target's reply to every prompt in `samples`; {sample id: features} of the greedy ones."""
        prompts = {sample_id: sample for sample_id, sample in samples.items() if sample["needs_generation"]}
        if not prompts:
            return {}
        started, generation = time.perf_counter(), self.cfg.generation
        budgets = {sample_id: min(generation.max_new_tokens, self.cfg.max_len - len(sample["input_ids"]))
                   for sample_id, sample in prompts.items()}
        features, replies = {}, {}
        if generation.temperature == 0:
            ids = list(prompts)
            outputs = greedy_replies_with_features(
                self.decoder, self.lm_head, [prompts[i]["input_ids"].tolist() for i in ids],
                [budgets[i] for i in ids], self.eos_token_ids, self.cfg.topk, generation.batch_size,
                generation.batch_tokens,
            )
            for sample_id, (reply, reply_features) in zip(ids, outputs, strict=True):
                replies[sample_id], features[sample_id] = reply, reply_features
        else:
            for sample_id, sample in prompts.items():
                sampling = SamplingConfig(generation.temperature, generation.top_p,
                                          record_seed(generation.seed, sample_id))
                input_ids = torch.as_tensor(sample["input_ids"], dtype=torch.long)[None]  # (1, prompt)
                replies[sample_id] = autoregressive_generate(
                    self.model, input_ids, budgets[sample_id], sorted(self.eos_token_ids), sampling
                ).tokens
        for sample_id, reply in replies.items():
            sample = samples[sample_id]
            sample["input_ids"] = np.concatenate([sample["input_ids"], np.asarray(reply, dtype=np.int32)])
            sample["loss_mask"] = np.concatenate([sample["loss_mask"], np.ones(len(reply), dtype=np.uint8)])
        tokens, elapsed = sum(map(len, replies.values())), time.perf_counter() - started
        info |= {"generated_replies": len(replies), "generated_tokens": tokens}
        print(f"generate: {shard_name(shard_id)}: {len(replies)} replies, {tokens} tokens in {elapsed:.1f} s "
              f"({tokens / max(elapsed, 1e-9):.1f} tokens/s)", flush=True)
        return features

    def _forward(self, samples: dict[str, dict[str, Any]], features: dict[str, Any]) -> None:
        """Features of complete samples into `features`, by one right-padded forward per batch."""
        ids = list(samples)
        lengths = [len(samples[i]["input_ids"]) for i in ids]
        for positions in forward_batches(lengths, self.cfg.forward_batch_tokens):
            sequences = [samples[ids[i]]["input_ids"].astype(np.int64) for i in positions]
            outputs = forward_features(self.decoder, self.lm_head, sequences, self.cfg.topk)
            for i, output in zip(positions, outputs, strict=True):
                features[ids[i]] = output

    def _shard_row(self, shard_id: int, info: dict[str, Any], samples: dict[str, dict[str, Any]],
                   features: dict[str, Any]) -> dict[str, Any]:
        """One shard row as the sink reads it: per-token columns concatenated in record order, plus offsets."""
        ids = list(samples)
        lengths = [len(samples[i]["input_ids"]) for i in ids]
        row = {"shard_id": shard_id, "info": json.dumps(info), "sample_ids": json.dumps(ids),
               "offsets": np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64),
               "input_ids": np.concatenate([samples[i]["input_ids"] for i in ids] or [np.zeros(0)]).astype(np.int32),
               "loss_mask": np.concatenate([samples[i]["loss_mask"] for i in ids] or [np.zeros(0)]).astype(np.uint8)}
        try:
            hidden = [hidden_for_storage(features[i]["hidden_states"], self.cfg.hidden_dtype) for i in ids]
        except ValueError as exc:  # float16 overflow
            raise ExtractError(str(exc)) from None
        row["hidden_states"] = (np.concatenate(hidden) if hidden else
                                np.zeros((0, self.model.config.get_text_config().hidden_size),
                                         HIDDEN_DTYPES[self.cfg.hidden_dtype]))
        if self.cfg.topk:
            for name, dtype, width in (("topk_values", np.float32, self.cfg.topk),
                                       ("topk_indices", np.int32, self.cfg.topk), ("logsumexp", np.float32, None)):
                parts = [features[i][name].cpu().numpy() for i in ids]
                empty = np.zeros((0, width) if width else (0,), dtype)
                row[name] = np.concatenate(parts).astype(dtype) if parts else empty
        return row

# ---------------------------------------------------------------------------------------------------
# Stage 2: write shards


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


def _objects(values: list[Any]) -> np.ndarray:
    """A column of per-row values (arrays of different shapes, strings) as a 1-D object array."""
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


# ---------------------------------------------------------------------------------------------------
# The pipeline


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
        describe = ray.remote(_describe_target).options(
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
            dataset = ray.data.from_items(rows, override_num_blocks=len(rows)) if rows else None
            results = write_features(feature_stages(dataset, cfg, store), cfg, store) if rows else []
            store.check_writer("write the manifest")
        except (StoreLockedError, StoreMismatchError, ExtractError) as exc:  # e.g. another job took the store
            # Raised in an actor or a shard writer it arrives wrapped by Ray, whose str() is the worker traceback.
            raise ExtractError(str(exc.cause if isinstance(exc, RayTaskError) else exc)) from None
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
