"""Feature extraction on Ray Data: conversations in, a committed Zarr feature store out.

    read + normalise (driver) -> [generate replies] -> tokenise -> target forward -> write shards
                                  actor pool          tasks       actor pool        Datasink tasks

One row of the Ray dataset is one whole feature-store SHARD: sample i of the deterministic input order
belongs to shard i // samples_per_shard, and every stage maps a shard row to a shard row. So each shard
is written by exactly one writer whatever Ray does with blocks, a shard's forward batches are formed
from its own samples (the same bits on every run), and resuming is per shard: committed shards are
dropped before any generation or forward work, partial ones are rewritten from scratch.

Reading and normalising run on the driver: sample indices need one sequential pass over the inputs,
and parsing JSON is negligible next to the target's forward.

Generated replies are cached per shard under `<store>/generated/shard-XXXXX.jsonl` (written atomically
once the shard's replies are done), so a resumed run does not generate them again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
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
from falcon.target import describe_target, load_target, target_fingerprint, target_parts
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
from pipelines.tracking import redact

GENERATED_DIR = "generated"
TARGET_DTYPES = ("float32", "bfloat16", "float16")
LOGITS_CHUNK_BYTES = 1 << 26  # float32 logits computed at once per sample (64 MiB)


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
    # Greedy replies are generated this many prompts at a time (left-padded): on CPU a batch of 16 costs
    # little more per step than one prompt. Sampled replies go one by one, so a record's seed fixes its reply.
    batch_size: int = 16
    actors: ActorPoolConfig = field(default_factory=ActorPoolConfig)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"generation.batch_size must be >= 1, got {self.batch_size}")
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
    dtype: str = "bfloat16"  # dtype of the target forward
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
# Stage 1 (optional): self-distillation, the target writes the missing assistant replies


def generation_cache_path(location: Location, shard_id: int) -> str:
    return location.path(GENERATED_DIR, f"{shard_name(shard_id)}.jsonl")


def read_generation_cache(location: Location, shard_id: int) -> dict[str, list[int]] | None:
    """{sample id: generated token ids} of a shard whose replies were all generated before, else None.

    A damaged cache is only lost work, not lost data: it is reported and the replies are generated again.
    """
    path = generation_cache_path(location, shard_id)
    try:
        data = location.fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        entries = [json.loads(line) for line in data.splitlines() if line.strip()]
        return {_cached_id(entry): _cached_reply(entry) for entry in entries}
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("damaged reply cache %s (%s: %s): its replies are generated again",
                    location.redacted(GENERATED_DIR, f"{shard_name(shard_id)}.jsonl"), type(exc).__name__, exc)
        return None


def _cached_id(entry: dict[str, Any]) -> str:
    if not isinstance(entry["id"], str):
        raise TypeError(f"id {entry['id']!r} is not a string")
    return entry["id"]


def _cached_reply(entry: dict[str, Any]) -> list[int]:
    reply = entry["generated_ids"]
    if not isinstance(reply, list) or not all(isinstance(token, int) for token in reply):
        raise TypeError(f"generated_ids of {entry['id']!r} is not a list of token ids")
    return reply


def record_seed(seed: int, sample_id: str) -> int:
    """The sampling seed of one record's reply: the same whichever actor, shard order or rerun generates it."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{sample_id}".encode()).digest()[:8], "big") >> 1


class GenerateReplies:
    """Actor: append the target's own reply (token ids) to every record of a shard that lacks one."""

    def __init__(self, cfg: ExtractConfig, store: FeatureStore):
        self.cfg, self.location = cfg, store.location
        self.model, self.tokenizer = load_actor_target(
            cfg, cfg.generation.actors, store.metadata.target_fingerprint
        )
        eos = self.model.generation_config.eos_token_id
        self.eos_token_ids = {self.tokenizer.eos_token_id} | set(eos if isinstance(eos, list) else [eos])
        self.eos_token_ids.discard(None)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records_out, info_out = [], []
        for shard_id, records_json, info_json in zip(batch["shard_id"], batch["records"], batch["info"], strict=True):
            records, info = json.loads(records_json), json.loads(info_json)
            if not info.get("generation_cached"):
                info |= self._generate_shard(int(shard_id), records)
            records_out.append(json.dumps(records))
            info_out.append(json.dumps(info))
        return {"shard_id": batch["shard_id"], "records": _objects(records_out), "info": _objects(info_out)}

    def _generate_shard(self, shard_id: int, records: list[dict[str, Any]]) -> dict[str, Any]:
        started = time.perf_counter()
        prompts = {record["id"]: self._prompt(record) for record in records}
        prompts = {sample_id: prompt for sample_id, prompt in prompts.items() if prompt is not None}
        replies = self._generate(prompts)
        entries = []
        for record in records:
            if record["id"] in replies:
                generated = replies[record["id"]]
                record["generated_ids"] = generated
                entries.append({
                    "id": record["id"],
                    "generated_ids": generated,
                    "finish": "eos" if generated[-1] in self.eos_token_ids else "length",
                    "text": self.tokenizer.decode(generated, skip_special_tokens=True),
                })
        lines = "".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry in entries)
        self.location.write_bytes(generation_cache_path(self.location, shard_id), lines.encode())
        tokens, elapsed = sum(len(entry["generated_ids"]) for entry in entries), time.perf_counter() - started
        print(f"generate: {shard_name(shard_id)}: {len(entries)} replies, {tokens} tokens in {elapsed:.1f} s "
              f"({tokens / max(elapsed, 1e-9):.1f} tokens/s)", flush=True)
        return {"generated_replies": len(entries), "generated_tokens": tokens}

    def _prompt(self, record: dict[str, Any]) -> tuple[list[int], int] | None:
        """(prompt ids, reply budget) of a record that needs a reply and has room for one, else None."""
        if not needs_reply(record):
            return None
        prompt = tokenize_conversation(record["messages"], self.tokenizer, self.cfg.max_len, sample_id=record["id"])
        if isinstance(prompt, Rejected):
            return None  # rejected again, and counted, by the tokenise stage
        budget = min(self.cfg.generation.max_new_tokens, self.cfg.max_len - len(prompt["input_ids"]))
        return (prompt["input_ids"].tolist(), budget) if budget >= 1 else None

    def _generate(self, prompts: dict[str, tuple[list[int], int]]) -> dict[str, list[int]]:
        """{sample id: reply token ids, ending with EOS unless cut at the budget}."""
        generation, eos = self.cfg.generation, sorted(self.eos_token_ids)
        if generation.temperature == 0:
            return greedy_replies(self.model, prompts, eos, generation.batch_size)
        replies = {}
        for sample_id, (prompt, budget) in prompts.items():
            sampling = SamplingConfig(generation.temperature, generation.top_p, record_seed(generation.seed, sample_id))
            input_ids = torch.as_tensor(prompt, dtype=torch.long)[None]  # (1, prompt)
            replies[sample_id] = autoregressive_generate(self.model, input_ids, budget, eos, sampling).tokens
        return replies


def greedy_replies(model, prompts: dict[str, tuple[list[int], int]], eos_token_ids: list[int],
                   batch_size: int) -> dict[str, list[int]]:
    """Greedy replies to many prompts, `batch_size` at a time, left-padded, prompts of similar length together.

    A batched reply can differ from the unbatched one where two logits are within float noise of each other
    (padding changes the reduction order); either is the target's own greedy output, which is what the
    drafter must learn. Each reply stops at its first EOS (kept) or at its own budget.
    """
    from transformers import GenerationConfig

    order = sorted(prompts, key=lambda sample_id: len(prompts[sample_id][0]))
    device = next(model.parameters()).device
    replies = {}
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        longest = max(len(prompts[i][0]) for i in batch)
        input_ids = torch.full((len(batch), longest), eos_token_ids[0], dtype=torch.long, device=device)  # (B, T)
        attention_mask = torch.zeros_like(input_ids)
        for row, sample_id in enumerate(batch):
            prompt = prompts[sample_id][0]
            input_ids[row, longest - len(prompt):] = torch.as_tensor(prompt, device=device)
            attention_mask[row, longest - len(prompt):] = 1
        config = GenerationConfig(max_new_tokens=max(prompts[i][1] for i in batch), do_sample=False,
                                  eos_token_id=eos_token_ids, pad_token_id=eos_token_ids[0])
        with torch.inference_mode():
            output = model.generate(input_ids, attention_mask=attention_mask, generation_config=config)
        for row, sample_id in enumerate(batch):
            reply = output[row, longest:].tolist()[: prompts[sample_id][1]]
            ends = [i for i, token in enumerate(reply) if token in eos_token_ids]
            replies[sample_id] = reply[: ends[0] + 1] if ends else reply
    return replies


# ---------------------------------------------------------------------------------------------------
# Stage 2: tokenise with the assistant loss mask


def tokenize_record(record: Mapping[str, Any], tokenizer, max_len: int) -> dict[str, Any] | Rejected:
    """input_ids and loss_mask of a record; a generated reply's ids are appended as they were sampled."""
    sample = tokenize_conversation(record["messages"], tokenizer, max_len, sample_id=record["id"])
    if isinstance(sample, Rejected) or not sample["needs_generation"]:
        return sample
    generated = record.get("generated_ids")
    if generated is None:
        if len(sample["input_ids"]) >= max_len:
            return Rejected("over_long", f"prompt of {len(sample['input_ids'])} tokens leaves no room under "
                                         f"max_len {max_len} for a reply")
        return Rejected("no_assistant_turn", "ends with a user turn and generation is off")
    return {
        **sample,
        "input_ids": np.concatenate([sample["input_ids"], np.asarray(generated, dtype=np.int32)]),
        "loss_mask": np.concatenate([sample["loss_mask"], np.ones(len(generated), dtype=np.uint8)]),
    }


def tokenize_shards(batch: dict[str, np.ndarray], tokenizer, max_len: int) -> dict[str, np.ndarray]:
    """Ray task: shard rows of records -> shard rows of concatenated input_ids / loss_mask and offsets."""
    out: dict[str, list] = {"shard_id": [], "info": [], "sample_ids": [], "offsets": [], "input_ids": [],
                            "loss_mask": []}
    for shard_id, records_json, info_json in zip(batch["shard_id"], batch["records"], batch["info"], strict=True):
        info = json.loads(info_json)
        rejects, notes = info.setdefault("rejects", []), info.setdefault("notes", {})
        sample_ids, input_ids, loss_mask = [], [], []
        for record in json.loads(records_json):
            sample = tokenize_record(record, tokenizer, max_len)
            if isinstance(sample, Rejected):
                rejects.append({"reason": sample.reason, "detail": sample.detail, "sample_id": record["id"],
                                "source": record["source"], "raw": json.dumps(record)[:500]})
                continue
            if sample["truncated"]:
                notes["truncated"] = notes.get("truncated", 0) + 1
            sample_ids.append(record["id"])
            input_ids.append(sample["input_ids"])
            loss_mask.append(sample["loss_mask"])
        lengths = [len(ids) for ids in input_ids]
        out["shard_id"].append(shard_id)
        out["info"].append(json.dumps(info))
        out["sample_ids"].append(json.dumps(sample_ids))
        out["offsets"].append(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64))
        out["input_ids"].append(np.concatenate(input_ids or [np.zeros(0, np.int32)]).astype(np.int32))
        out["loss_mask"].append(np.concatenate(loss_mask or [np.zeros(0, np.uint8)]).astype(np.uint8))
    return {name: _objects(values) for name, values in out.items()}


# ---------------------------------------------------------------------------------------------------
# Stage 3: the target forward


def forward_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Positions of samples grouped into forward batches, longest first, so that each batch's padded size
    (rows x its longest sample) stays within max_tokens; a longer sample goes alone."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        # Descending order: a batch's first sample is its longest.
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def forward_features(decoder, lm_head, sequences: Sequence, topk: int) -> list[dict[str, Any]]:
    """Per sequence: `hidden_states` (T, h) in the model's dtype, the final-norm states the LM head reads,
    and with topk > 0 float32 `topk_values` (T, k) logits, `topk_indices` (T, k), `logsumexp` (T,).

    The sequences run as one right-padded batch; real tokens never attend to padding (causal mask),
    so each equals its unbatched forward up to floating-point rounding.
    """
    device = lm_head.weight.device
    lengths = [len(sequence) for sequence in sequences]
    input_ids = torch.zeros(len(sequences), max(lengths), dtype=torch.long, device=device)  # (B, T)
    attention_mask = torch.zeros_like(input_ids)
    for row, sequence in enumerate(sequences):
        input_ids[row, : lengths[row]] = torch.as_tensor(sequence, device=device)
        attention_mask[row, : lengths[row]] = 1
    with torch.inference_mode():
        hidden_states = decoder(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state  # (B, T, h)
        real_tokens = hidden_states[attention_mask.bool()]  # (sum of lengths, h), sequence after sequence
        features = {"hidden_states": real_tokens}
        if topk:
            features |= logit_summary(lm_head, real_tokens, topk)
    per_sequence = {name: torch.split(values, lengths) for name, values in features.items()}
    return [{name: per_sequence[name][row] for name in features} for row in range(len(sequences))]


def logit_summary(lm_head, hidden_states, topk: int) -> dict[str, Any]:
    """Top-k logits and the full-vocabulary logsumexp of (T, h) hidden states, in float32 chunks."""
    chunk = max(1, LOGITS_CHUNK_BYTES // (4 * lm_head.weight.shape[0]))
    values, indices, logsumexp = [], [], []
    for start in range(0, hidden_states.shape[0], chunk):
        logits = lm_head(hidden_states[start : start + chunk]).float()  # (chunk, vocab)
        top = logits.topk(topk, dim=-1)
        values.append(top.values)
        indices.append(top.indices)
        logsumexp.append(logits.logsumexp(dim=-1))
    return {
        "topk_values": torch.cat(values),
        "topk_indices": torch.cat(indices).to(torch.int32),
        "logsumexp": torch.cat(logsumexp),
    }


def hidden_for_storage(hidden_states, hidden_dtype: str) -> np.ndarray:
    """(T, h) hidden states in the store's storage dtype: bfloat16 bits as uint16, or float16."""
    if hidden_dtype == "bfloat16":
        return hidden_states.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    half = hidden_states.to(torch.float16)
    if not torch.isfinite(half).all():
        raise ExtractError(
            f"hidden states overflow float16 (max |x| = {hidden_states.abs().max().item():.4g}); "
            "set hidden_dtype: bfloat16"
        )
    return half.cpu().numpy()


class ExtractFeatures:
    """Actor: shard rows of token ids -> shard rows with the target's per-token features."""

    def __init__(self, cfg: ExtractConfig, expect_fingerprint: str | None = None):
        self.cfg = cfg
        model, _ = load_actor_target(cfg, cfg.forward_actors, expect_fingerprint)
        self.decoder, _, self.lm_head = target_parts(model)
        self.hidden_size = model.config.get_text_config().hidden_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        features = [self.shard_features(batch["input_ids"][row], batch["offsets"][row])
                    for row in range(len(batch["shard_id"]))]
        return {**batch, **{name: _objects([f[name] for f in features]) for name in features[0]}}

    def shard_features(self, input_ids: np.ndarray, offsets: np.ndarray) -> dict[str, np.ndarray]:
        """Concatenated per-token features of one shard's samples (token axis as in input_ids)."""
        n_tokens, k = len(input_ids), self.cfg.topk
        out = {"hidden_states": np.empty((n_tokens, self.hidden_size), HIDDEN_DTYPES[self.cfg.hidden_dtype])}
        if k:
            out |= {"topk_values": np.empty((n_tokens, k), np.float32),
                    "topk_indices": np.empty((n_tokens, k), np.int32),
                    "logsumexp": np.empty(n_tokens, np.float32)}
        spans = list(zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True))
        for positions in forward_batches([end - start for start, end in spans], self.cfg.forward_batch_tokens):
            sequences = [input_ids[spans[i][0] : spans[i][1]].astype(np.int64) for i in positions]
            for i, features in zip(positions, forward_features(self.decoder, self.lm_head, sequences, k), strict=True):
                start, end = spans[i]
                out["hidden_states"][start:end] = hidden_for_storage(features["hidden_states"], self.cfg.hidden_dtype)
                for name in ("topk_values", "topk_indices", "logsumexp") if k else ():
                    out[name][start:end] = features[name].cpu().numpy()
        return out


# ---------------------------------------------------------------------------------------------------
# Stage 4: write shards


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
    """Forward on the actor pool, ready for `write_datasink`; input rows hold shard_id, info,
    sample_ids, offsets, input_ids, loss_mask."""
    return dataset.map_batches(
        ExtractFeatures,
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


def build_pipeline(rows: list[dict[str, Any]], cfg: ExtractConfig, store: FeatureStore, tokenizer,
                   generate: bool):
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
    if generate:
        dataset = dataset.map_batches(
            GenerateReplies, batch_size=1, batch_format="numpy",
            fn_constructor_kwargs={"cfg": cfg, "store": store}, **cfg.generation.actors.map_batches_args(),
        )
    dataset = dataset.map_batches(
        tokenize_shards, batch_size=1, batch_format="numpy", num_cpus=cfg.task_num_cpus,
        fn_kwargs={"tokenizer": tokenizer, "max_len": cfg.max_len},
    )
    return feature_stages(dataset, cfg, store)


def pending_shard_rows(
    records: list[dict[str, Any]], cfg: ExtractConfig, store: FeatureStore
) -> tuple[list[dict[str, Any]], int, bool]:
    """(rows of the shards still to write, number of shards already committed, whether any needs generation)."""
    committed = store.committed_shards()
    rows, generate = [], False
    for shard_id in range(-(-len(records) // cfg.samples_per_shard)):
        if shard_id in committed:
            continue
        shard_records = records[shard_id * cfg.samples_per_shard : (shard_id + 1) * cfg.samples_per_shard]
        info: dict[str, Any] = {}
        wanting = [r for r in shard_records if needs_reply(r)] if cfg.generation.enabled else []
        cached = read_generation_cache(store.location, shard_id) if wanting else None
        if cached is not None:
            shard_records = [{**r, "generated_ids": cached[r["id"]]} if r["id"] in cached else r
                             for r in shard_records]
            info = {"generation_cached": True, "cached_replies": sum(r["id"] in cached for r in wanting)}
        generate |= bool(wanting) and cached is None
        rows.append({"shard_id": shard_id, "records": json.dumps(shard_records), "info": json.dumps(info)})
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
            results = write_features(build_pipeline(rows, cfg, store, tokenizer, generate), cfg, store) if rows else []
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
        "replies_from_cache": total("cached_replies"),
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
        f"  replies: {s['replies_generated']} generated ({s['tokens_generated']} tokens), "
        f"{s['replies_from_cache']} from the generation cache",
        f"  store: {s['store_shards']} shards, {s['store_samples']} samples, {s['store_tokens']} tokens, "
        f"{s['store_bytes'] / 1e6:.1f} MB = {s['bytes_per_token']} bytes/token "
        f"({s['stored_vs_raw']}x the raw {s['raw_bytes_per_token']} bytes/token)",
        rejects.table("  skipped (input rejects every run; later rejects for the shards written this run)"),
    ])
