"""`ShardFeatures`, the actor pool's work: one shard's records in, the target's features of every sample out.

Greedy replies keep the features of the decode that wrote them (`target_features.greedy_replies_with_features`):
no second forward over the reply. Sampled replies are decoded one by one with per-record seeds, then forwarded;
records that bring their own replies are forwarded only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from falcon.decode_kernels import GROUPED_DECODE
from falcon.generate import SamplingConfig, autoregressive_generate
from falcon.target import describe_target, eos_token_ids, load_target, target_fingerprint, target_parts
from feature_store import StoreMetadata
from feature_store.schema import HIDDEN_DTYPES
from feature_store.shard import shard_name
from pipelines.data import Rejected
from pipelines.extract.config import ExtractConfig, ExtractError
from pipelines.extract.records import record_seed, records_digest, tokenize_record
from pipelines.extract.target_features import (
    forward_batches,
    forward_features,
    greedy_replies_with_features,
    hidden_for_storage,
)
from pipelines.ray_utils import ActorPoolConfig


def load_actor_target(cfg: ExtractConfig, pool: ActorPoolConfig, expect_fingerprint: str | None = None):
    """The target for one actor, checked to be the store's target (a node may hold another copy)."""
    if pool.torch_threads is not None:
        torch.set_num_threads(pool.torch_threads)
    # grouped_decode: the batched greedy decode's one-token steps without torch's slow bf16 CPU SDPA kernel
    model, tokenizer = load_target(cfg.target, device=cfg.device, dtype=cfg.dtype,
                                   trust_remote_code=cfg.trust_remote_code, attn_implementation=GROUPED_DECODE)
    if expect_fingerprint is not None and target_fingerprint(model, tokenizer) != expect_fingerprint:
        raise ExtractError(
            f"target {cfg.target!r} on this worker has fingerprint {target_fingerprint(model, tokenizer)}, "
            f"the store expects {expect_fingerprint}: every node must hold the same target"
        )
    return model, tokenizer


def target_description(cfg: ExtractConfig) -> tuple[dict[str, Any], Any]:
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
        return {name: object_column([row[name] for row in rows]) for name in rows[0]}

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


def object_column(values: list[Any]) -> np.ndarray:
    """A column of per-row values (arrays of different shapes, strings) as a 1-D object array."""
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column
