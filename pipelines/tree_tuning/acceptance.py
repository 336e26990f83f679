"""Acceptance along the true continuation, measured on the held-out split (step 1 of the tuner).

At a decoding position L (L tokens in the target's cache, the root x_L being the newest token) the drafter drafts
as `falcon.drafting.draft_tree` does, but along the TRUE continuation: pass 0 over the true context, pass p >= 1
(`falcon.drafting.next_pass`) fed the true tokens of depths (p-1)k+1 .. pk. For each depth d we record the rank
of the true token x_{L+d} among the drafter's top-R candidates (R when it is not among them). Along an accepted
path the candidate lists are exactly these, so the ranks decide acceptance for ANY tree: a node's path
(r_1..r_d) is accepted iff ranks[:d] equals it.

Approximation: with more than one decoder layer, the drafter's cached keys of older positions depend on how
the blocks were aligned when they were computed; here all context blocks share the alignment of the block
that drafts, where inference may have used others. With one layer (the default) keys and values depend on
the position alone, and the simulation matches `draft_tree` exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from falcon.drafter import Drafter
from falcon.drafting import next_pass
from falcon.lookup import LookupConfig
from pipelines.lookup_tuning import ChainReplay, replay_chain, replay_config
from pipelines.tree_tuning.config import TreeTuningError


@dataclass
class AcceptanceStats:
    """Ranks of the true token among the drafter's candidates, per held-out decoding position and depth."""

    ranks: np.ndarray  # (positions, depth) int64: rank of x_{L+d} among the top-`max_rank`, max_rank if absent
    max_rank: int
    num_samples: int
    chain: ChainReplay | None = None  # the context lookup replayed at the same positions (lookup_tuning)

    @property
    def depth(self) -> int:
        return self.ranks.shape[1]

    @property
    def num_positions(self) -> int:
        return self.ranks.shape[0]

    def parent_counts(self) -> np.ndarray:
        """(depth,) positions whose true tokens at depths < d are all among the candidates."""
        found = self.ranks < self.max_rank
        parent_found = np.concatenate([np.ones((len(found), 1), dtype=bool), found[:, :-1]], axis=1).cumprod(1)
        return parent_found.sum(0)

    def conditional(self) -> np.ndarray:
        """(depth, max_rank) p[d][r] = P(rank[d] = r | ranks[:d] all < max_rank); 0 where undefined."""
        found = self.ranks < self.max_rank
        parent_found = np.concatenate([np.ones((len(found), 1), dtype=bool), found[:, :-1]], axis=1).cumprod(1)
        table = np.zeros((self.depth, self.max_rank))
        for d in range(self.depth):
            rows = self.ranks[parent_found[:, d].astype(bool), d]
            if len(rows):
                table[d] = np.bincount(rows, minlength=self.max_rank + 1)[: self.max_rank] / len(rows)
        return table

    def unconditional(self) -> np.ndarray:
        """(depth, max_rank) P(rank[d] = r) over all positions (the drafter's top-r accuracy along the truth)."""
        table = np.zeros((self.depth, self.max_rank))
        if self.num_positions:
            for d in range(self.depth):
                table[d] = np.bincount(self.ranks[:, d], minlength=self.max_rank + 1)[: self.max_rank]
            table /= self.num_positions
        return table

    def accepted_depths(self, paths: Sequence[Sequence[int]]) -> np.ndarray:
        """(positions, len(paths)) draft tokens accepted at each position by the tree of the first n paths (greedy
        replay: the deepest node on the true path), for paths in an order whose every prefix is a tree."""
        depths = np.zeros((self.num_positions, len(paths)), dtype=np.int64)
        for j, path in enumerate(paths):
            if len(path) <= self.depth:  # deeper nodes are beyond the measured table: never accepted
                depths[:, j] = (self.ranks[:, :len(path)] == np.asarray(path)).all(1) * len(path)
        return np.maximum.accumulate(depths, axis=1)

    def empirical_tau(self, paths: Sequence[Sequence[int]]) -> float:
        """Held-out mean accepted tokens per step with this tree, bonus included (greedy replay of the ranks)."""
        if not self.num_positions:
            return math.nan
        return 1.0 + float(self.accepted_depths(paths)[:, -1].mean()) if len(paths) else 1.0


def decoding_positions(loss_mask: np.ndarray, depth: int, block_size: int, quota: int) -> list[int]:
    """Up to `quota` consecutive L from the first where the root x_L and depths 1..depth are all reply (loss)
    tokens: consecutive, so that the lookup tuning can walk a decode through them (a sample of spread positions
    would count one step per gap where a decode accepting little takes several)."""
    mask = np.asarray(loss_mask, dtype=bool)
    length = len(mask)
    if length < depth + 1:
        return []
    # window[L] = all of mask[L : L + depth + 1]
    window = np.lib.stride_tricks.sliding_window_view(mask, depth + 1).all(-1)  # (length - depth,)
    candidates = np.flatnonzero(window)
    candidates = candidates[candidates >= block_size]  # pass 0 needs a full block of known positions
    return candidates[:quota].tolist()


@torch.inference_mode()
def true_path_ranks(drafter: Drafter, hidden_states: torch.Tensor, input_ids: torch.Tensor,
                    positions: Sequence[int], depth: int, max_rank: int, batch_positions: int = 32) -> np.ndarray:
    """(len(positions), depth) ranks of x_{L+d} among the drafter's top-`max_rank` drafted along the truth.

    hidden_states (T, h): the target's features f_i; input_ids (T,); every L in `positions` must satisfy
    block_size <= L and L + depth <= T - 1.
    """
    k = drafter.config.block_size
    if not positions:
        return np.zeros((0, depth), dtype=np.int64)
    if min(positions) < k or max(positions) + depth > len(input_ids) - 1:
        raise ValueError(f"positions must lie in [{k}, {len(input_ids) - 1 - depth}]")
    device, dtype = drafter.head_weight.device, drafter.head_weight.dtype
    hidden_states = hidden_states.to(device=device, dtype=dtype)[None]  # (1, T, h)
    input_ids = input_ids.to(device=device, dtype=torch.long)[None]  # (1, T)

    # The LSTM runs over the true context once, in pieces ending at each L, to keep its state there.
    ends = sorted(set(positions))
    lstm_at, fused_pieces, start, lstm = {}, [], 0, None
    for end in ends:
        fused_piece, lstm = drafter.fuse(hidden_states[:, start:end], input_ids[:, start + 1:end + 1], lstm)
        fused_pieces.append(fused_piece)
        lstm_at[end] = lstm
        start = end
    fused = torch.cat(fused_pieces, dim=1)  # (1, L_max, h): drafter positions 0 .. L_max-1
    context = fused.shape[1]
    position_ids = torch.arange(context, device=device)[None]

    ranks = np.full((len(positions), depth), max_rank, dtype=np.int64)
    row_of = {}
    for row, position in enumerate(positions):
        row_of.setdefault(position, []).append(row)
    for offset in range(k):
        # Blocks aligned so that one ends at L-1 for every L with (L + offset) % k == 0, as at inference.
        aligned = [L for L in ends if (L + offset) % k == 0]
        if not aligned:
            continue
        block_ids = (torch.arange(context, device=device) + offset) // k
        mask = block_ids[None, :] <= block_ids[:, None]  # (context, context) relaxed causal
        features, context_kv = drafter.decode(fused, position_ids, attn_mask=mask[None, None])
        for start in range(0, len(aligned), batch_positions):
            batch = aligned[start:start + batch_positions]
            batch_ranks = _draft_along_truth(drafter, features, context_kv, lstm_at, batch, input_ids,
                                             depth, max_rank)
            for i, position in enumerate(batch):
                ranks[row_of[position]] = batch_ranks[i]
    return ranks


def _draft_along_truth(drafter: Drafter, features, context_kv, lstm_at, batch: list[int], input_ids,
                       depth: int, max_rank: int) -> np.ndarray:
    """Passes 0 .. ceil(depth/k)-1 for a batch of positions L; (B, depth) ranks of the true tokens."""
    k = drafter.config.block_size
    device = features.device
    ends = torch.tensor(batch, device=device)  # (B,)
    steps = torch.arange(k, device=device)
    num = len(batch)
    block_features = features[0, ends[:, None] - k + steps]  # (B, k, h): predicts f_L .. f_{L+k-1}
    lstm = tuple(torch.cat([lstm_at[L][i] for L in batch], dim=1) for i in range(2))  # (layers, B, h) each
    context = int(ends.max())
    context_kv = [(keys[:, :, :context], values[:, :, :context]) for keys, values in context_kv]
    context_allowed = torch.arange(context, device=device)[None, :] < ends[:, None]  # (B, context)
    ranks = torch.full((num, depth), max_rank, dtype=torch.long, device=device)
    pass_kv: list[list] = []  # per earlier pass p >= 1, per layer (keys, values) (B, kv_heads, k, d)
    for p in range((depth + k - 1) // k):
        if p > 0:
            tokens = input_ids[0, ends[:, None] + (p - 1) * k + 1 + steps]  # (B, k) true depths (p-1)k+1..pk
            allowed = torch.cat([context_allowed, context_allowed.new_ones(num, p * k)], dim=1)
            block_features, lstm, kv = next_pass(drafter, block_features, lstm, tokens,
                                                 ends[:, None] + (p - 1) * k + steps, context_kv, pass_kv,
                                                 allowed[:, None, None, :])
            pass_kv.append(kv)
        candidates = drafter.to_target_ids(drafter.logits(block_features).topk(max_rank, dim=-1).indices)  # (B, k, R)
        for j in range(min(k, depth - p * k)):
            d = p * k + j  # 0-based depth index: the token x_{L+d+1}
            hit = candidates[:, j, :] == input_ids[0, ends + d + 1][:, None]  # (B, R)
            ranks[:, d] = torch.where(hit.any(-1), hit.int().argmax(-1), max_rank)
    return ranks.cpu().numpy()


def measure_acceptance(drafter: Drafter, store, indices: Sequence[int], depth: int, max_rank: int, *,
                       max_positions: int = 4000, batch_positions: int = 32,
                       lookups: Sequence[LookupConfig] = ()) -> AcceptanceStats:
    """Ranks of the true tokens at up to `max_positions` decoding positions of the store samples `indices`, and
    with `lookups` the context lookup replayed at the same positions for all of those policies."""
    if max_rank > (drafter.config.draft_vocab_size or drafter.config.vocab_size):
        raise TreeTuningError(f"max rank {max_rank} exceeds the drafter's vocabulary")
    indices = list(indices)
    if not indices:
        raise TreeTuningError("no held-out samples to measure acceptance on (the eval split is empty)")
    quota = max(1, math.ceil(max_positions / len(indices)))
    all_ranks, chains = [], []
    matching, match_cap, max_chain = replay_config(lookups) if lookups else (None, 0, 0)
    for index in tqdm(indices, desc="acceptance", unit="sample"):
        sample = store.sample(int(index))
        positions = decoding_positions(sample["loss_mask"], depth, drafter.config.block_size, quota)
        if positions:
            all_ranks.append(true_path_ranks(
                drafter, torch.from_numpy(np.asarray(sample["hidden_states"], dtype=np.float32)),
                torch.from_numpy(np.asarray(sample["input_ids"], dtype=np.int64)),
                positions, depth, max_rank, batch_positions,
            ))
            if matching is not None:
                chains.append(replay_chain(sample["input_ids"], positions, matching, match_cap, max_chain))
    ranks = np.concatenate(all_ranks) if all_ranks else np.zeros((0, depth), dtype=np.int64)
    if not len(ranks):
        raise TreeTuningError(
            f"none of the {len(indices)} held-out samples has a reply of more than {depth} tokens to measure on"
        )
    chain = ChainReplay.concatenate(chains, max_chain) if matching is not None else None
    return AcceptanceStats(ranks=ranks, max_rank=max_rank, num_samples=len(indices), chain=chain)
