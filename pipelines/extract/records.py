"""The extraction's input side: records read and normalised on the driver, their digest, per-record seeds, and one
record tokenised for the target (prompt only when the target writes the reply)."""

from __future__ import annotations

import hashlib
import json
import random
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from tqdm.auto import tqdm

from pipelines.data import RejectCounter, Rejected, read_conversations
from pipelines.extract.config import ExtractConfig
from pipelines.tokenization import tokenize_conversation


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
