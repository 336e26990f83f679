"""Torch view of a feature store: samples (or max_len windows of them) as tensors, and a padding collate."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from feature_store.store import FeatureStore

_TORCH_HIDDEN_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class FeatureDataset(Dataset):
    """Items of a FeatureStore as tensors, one per window of at most `max_len` tokens.

    Windowing: a sample of T tokens becomes ceil(T / max_len) consecutive, non-overlapping windows
    [0, max_len), [max_len, 2 max_len), ..., the last one holding the remainder; with max_len None
    every sample is one item. Each window is an independent training sequence. The target computed
    the hidden states over the whole sample, so a window keeps full-context features; only the
    drafter's own attention starts afresh at the window start.

    With `context_tokens`, a sample's windows start at most that many tokens before its first
    loss-masked token: the prompt tokens before carry no loss, and the features already summarise them.

    Item keys: input_ids int64 [T], loss_mask bool [T], hidden_states [T, h] in the store's dtype
    (bfloat16 or float16), and with topk > 0: topk_values [T, k] (logits, store dtype),
    topk_indices int64 [T, k], logsumexp float32 [T].
    """

    def __init__(
        self,
        store: FeatureStore,
        indices: Sequence[int] | np.ndarray | None = None,
        max_len: int | None = None,
        context_tokens: int | None = None,
    ):
        if max_len is not None and max_len <= 0:
            raise ValueError(f"max_len must be positive or None, got {max_len}")
        if context_tokens is not None and context_tokens < 0:
            raise ValueError(f"context_tokens must be >= 0 or None, got {context_tokens}")
        n = store.num_samples
        indices = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= n):
            raise IndexError(f"sample indices must be in [0, {n}), got [{indices.min()}, {indices.max()}]")
        lengths = store.sample_lengths()[indices]
        offsets = np.zeros_like(lengths)  # where each sample's first window starts
        if context_tokens is not None:
            offsets = np.clip(store.first_loss_positions()[indices] - context_tokens, 0, np.maximum(lengths - 1, 0))
        spans = lengths - offsets
        per_sample = np.ones_like(spans) if max_len is None else -(-spans // max_len)
        first_window = np.repeat(np.cumsum(per_sample) - per_sample, per_sample)
        # position of each window inside its sample: 0, 1, ... per sample
        window_number = np.arange(int(per_sample.sum())) - first_window
        sample_lengths = np.repeat(lengths, per_sample)
        starts = np.repeat(offsets, per_sample) + window_number * (max_len or 0)
        stops = sample_lengths if max_len is None else np.minimum(starts + max_len, sample_lengths)
        self.store = store
        self.windows = np.stack([np.repeat(indices, per_sample), starts, stops], axis=1)  # [n_windows, 3]
        self.hidden_dtype = _TORCH_HIDDEN_DTYPES[store.metadata.hidden_dtype]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sample_index, start, stop = (int(v) for v in self.windows[i])
        sample = self.store.sample(sample_index, start, stop)
        item = {
            "input_ids": torch.from_numpy(sample["input_ids"].astype(np.int64)),
            "loss_mask": torch.from_numpy(sample["loss_mask"].astype(bool)),
            "hidden_states": torch.from_numpy(sample["hidden_states"]).to(self.hidden_dtype),
        }
        if self.store.metadata.topk:
            item["topk_values"] = torch.from_numpy(sample["topk_values"])
            item["topk_indices"] = torch.from_numpy(sample["topk_indices"].astype(np.int64))
            item["logsumexp"] = torch.from_numpy(sample["logsumexp"])
        return item

    @staticmethod
    def collate(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return collate_features(items)


def collate_features(
    items: Sequence[dict[str, torch.Tensor]], pad_token_id: int = 0
) -> dict[str, torch.Tensor]:
    """Stack items padded on the right to the longest one; adds attention_mask bool [B, T].

    Padding: input_ids with pad_token_id, everything else with 0 (so loss_mask is False there).
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    lengths = torch.tensor([len(item["input_ids"]) for item in items])
    max_len = int(lengths.max())
    batch = {}
    for name, first in items[0].items():
        padded = first.new_full(
            (len(items), max_len, *first.shape[1:]), pad_token_id if name == "input_ids" else 0
        )
        for row, item in enumerate(items):
            padded[row, : len(item[name])] = item[name]
        batch[name] = padded
    batch["attention_mask"] = torch.arange(max_len)[None, :] < lengths[:, None]  # [B, T]
    return batch
