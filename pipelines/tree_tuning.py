"""Tune the candidate tree of a drafter for one target on one device (Sequoia-style), or give a fixed shape.

Three measurements, one construction:

1. Acceptance, on held-out samples of the feature store. At a decoding position L (L tokens in the target's
   cache, the root x_L being the newest token) the drafter drafts as `falcon.generate.draft_tree` does, but
   along the TRUE continuation: pass 0 over the true context, pass p >= 1 fed the true tokens of depths
   (p-1)k+1 .. pk. For each depth d we record the rank of the true token x_{L+d} among the drafter's top-R
   candidates (R when it is not among them). Along an accepted path the candidate lists are exactly these,
   so the ranks decide acceptance for ANY tree: a node's path (r_1..r_d) is accepted iff ranks[:d] equals it.
   From them, p[d][r] = P(rank[d] = r | ranks[:d] all < R): the chance that the rank-r candidate at depth d
   is accepted given that its parent path was.
2. Verification cost: the target's forward of n new tokens under a tree mask over a cache of `cache_length`
   tokens, median over repeats.
3. Drafting cost: `draft_tree` on a tree with pass 0 only, and on trees whose pass 1 has b branches.

Construction: a node's value is the product of p along its path, its probability of being accepted. A
child's value never exceeds its parent's, so taking nodes in decreasing value gives nested prefix-closed
trees T_1 ⊂ T_2 ⊂ ..., T_n holding the n most valuable nodes (within the depth and per-depth rank bounds).
The tree kept is the T_n maximising

    E[accepted + 1](n) / (draft_ms(T_n) + verify_ms(n + 1)),    E[accepted + 1](n) = 1 + sum of values,

and the expected speedup is that rate times verify_ms(1), the cost of one plain decoding step (the same
forward with a single token). The ranks also give the held-out ("empirical") tau of every tree, reported
next to the model's expectation. With the context lookup on (`pipelines.lookup_tuning`), the lookup is replayed
at the same positions and each nested tree is paired with each candidate chain policy: the pair kept is the one
with the most expected tokens per millisecond, the chain's verification (and a skipped drafter) costed alike.

Approximation: with more than one decoder layer, the drafter's cached keys of older positions depend on how
the blocks were aligned when they were computed; here all context blocks share the alignment of the block
that drafts, where inference may have used others. With one layer (the default) keys and values depend on
the position alone, and the simulation matches `draft_tree` exactly.
"""

from __future__ import annotations

import heapq
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from falcon.drafter import Drafter
from falcon.generate import DrafterState, draft_tree
from falcon.lookup import LookupConfig
from falcon.tree import TreeConfig, build_tree, tree_attention_mask
from pipelines.lookup_tuning import (
    ChainReplay,
    LookupTuningConfig,
    TreeCandidates,
    lookup_candidates,
    replay_chain,
    replay_config,
    resolve_lookup,
)

TREE_MODES = ("tuned", "preset", "fixed")


class TreeTuningError(ValueError):
    """The tree cannot be tuned or resolved as configured; the message says why."""


@dataclass
class TreeTuningConfig:
    mode: str = "tuned"  # tuned: measured construction | preset: a named shape | fixed: `paths` or `branching`
    preset: str = "falcon-k2"  # with mode preset (see PRESETS)
    paths: list[list[int]] | None = None  # with mode fixed: explicit rank paths
    branching: list[int] | None = None  # with mode fixed: children per node at each depth
    max_nodes: int = 64  # draft tokens in the tree, root excluded
    max_depth: int | None = None  # None: the drafter's max_tree_depth (max_passes x block_size)
    max_ranks: list[int] = field(default_factory=lambda: [8, 4])  # top-R bound per depth; the last repeats
    max_samples: int | None = None  # held-out samples read (None: all of the split)
    max_positions: int = 4000  # decoding positions measured, spread evenly over the samples
    batch_positions: int = 32  # positions drafted together (memory: batch x context x kv size)
    cache_length: int = 256  # context length of the timing runs
    timing_repeats: int = 7  # rounds timing every size once (after a warm-up); median per size

    def __post_init__(self) -> None:
        if self.mode not in TREE_MODES:
            raise ValueError(f"tree.mode must be one of {TREE_MODES}, got {self.mode!r}")
        if self.mode == "fixed" and (self.paths is None) == (self.branching is None):
            raise ValueError("tree.mode fixed needs exactly one of tree.paths or tree.branching")
        if self.mode == "preset" and self.preset not in PRESETS:
            raise ValueError(f"unknown tree.preset {self.preset!r}; known: {sorted(PRESETS)}")
        checks = {
            "max_nodes": self.max_nodes, "max_positions": self.max_positions,
            "batch_positions": self.batch_positions, "cache_length": self.cache_length,
            "timing_repeats": self.timing_repeats,
        }
        for name, value in checks.items():
            if value < 1:
                raise ValueError(f"tree.{name} must be >= 1, got {value}")
        if not self.max_ranks or any(r < 1 for r in self.max_ranks):
            raise ValueError(f"tree.max_ranks must be a non-empty list of ranks >= 1, got {self.max_ranks}")
        if self.max_depth is not None and self.max_depth < 1:
            raise ValueError(f"tree.max_depth must be >= 1 or null, got {self.max_depth}")


def ranks_per_depth(max_ranks: Sequence[int], depth: int) -> list[int]:
    """The rank bound of each depth 1..depth: `max_ranks` with its last entry repeated."""
    return [max_ranks[min(d, len(max_ranks) - 1)] for d in range(depth)]


# ---------------------------------------------------------------------------------------------------
# 1. Acceptance along the true continuation


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
    """Up to `quota` evenly spread L where the root x_L and depths 1..depth are all reply (loss) tokens."""
    mask = np.asarray(loss_mask, dtype=bool)
    length = len(mask)
    if length < depth + 1:
        return []
    # window[L] = all of mask[L : L + depth + 1]
    window = np.lib.stride_tricks.sliding_window_view(mask, depth + 1).all(-1)  # (length - depth,)
    candidates = np.flatnonzero(window)
    candidates = candidates[candidates >= block_size]  # pass 0 needs a full block of known positions
    if len(candidates) > quota:
        candidates = candidates[np.linspace(0, len(candidates) - 1, quota).round().astype(int)]
    return candidates.tolist()


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
            fused, lstm = drafter.fuse(block_features, tokens, lstm)
            past = [
                (torch.cat([ctx_k.expand(num, -1, -1, -1)] + [kv[layer][0] for kv in pass_kv], dim=2),
                 torch.cat([ctx_v.expand(num, -1, -1, -1)] + [kv[layer][1] for kv in pass_kv], dim=2))
                for layer, (ctx_k, ctx_v) in enumerate(context_kv)
            ]
            allowed = torch.cat([context_allowed, context_allowed.new_ones(num, p * k)], dim=1)
            block_features, kv = drafter.decode(fused, ends[:, None] + (p - 1) * k + steps, past,
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


# ---------------------------------------------------------------------------------------------------
# 2-3. Costs on the target device


def size_grid(limit: int) -> list[int]:
    """1, 2, 4, 8, then steps of a quarter to a half of the current size, ending exactly at `limit`."""
    sizes = [n for n in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512) if n < limit]
    return sizes + [limit]


def _interpolate(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    """Piecewise linear through (xs, ys), extended linearly past the last point."""
    if len(xs) == 1 or x <= xs[-1]:
        return float(np.interp(x, xs, ys))
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return float(ys[-1] + slope * (x - xs[-1]))


def pass_branch_counts(paths: Sequence[Sequence[int]], block_size: int) -> list[int]:
    """Branches of each drafter pass: distinct depth-p·k prefixes of the paths deeper than p·k."""
    depth = max((len(p) for p in paths), default=0)
    return [len({tuple(p[: q * block_size]) for p in paths if len(p) > q * block_size})
            for q in range((depth + block_size - 1) // block_size)]


@dataclass
class CostModel:
    """Measured milliseconds of verification by tree size and of drafter passes by branch count."""

    cache_length: int
    verify_sizes: list[int]  # tokens verified, root included
    verify_ms: list[float]
    first_pass_ms: float  # pass 0: the new context positions + the first k depths
    pass_branches: list[int]
    pass_ms: list[float]  # one further pass with that many branches

    def verify(self, num_tokens: int) -> float:
        return _interpolate(num_tokens, self.verify_sizes, self.verify_ms)

    def draft(self, paths: Sequence[Sequence[int]], block_size: int) -> float:
        branches = pass_branch_counts(paths, block_size)
        if not branches:
            return 0.0
        return self.first_pass_ms + sum(_interpolate(b, self.pass_branches, self.pass_ms) for b in branches[1:])

    def step(self, paths: Sequence[Sequence[int]], block_size: int) -> float:
        """One Falcon step: drafting + verifying root and tree (loop overhead not included)."""
        return self.draft(paths, block_size) + self.verify(len(paths) + 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cache_length": self.cache_length,
            "verify_ms": dict(zip(map(str, self.verify_sizes), self.verify_ms, strict=True)),
            "first_pass_ms": self.first_pass_ms,
            "pass_ms": dict(zip(map(str, self.pass_branches), self.pass_ms, strict=True)),
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved_median_ms(runs: Sequence, repeats: int, device: torch.device, desc: str) -> list[float]:
    """Median ms of each callable over `repeats` rounds that time every one of them once.

    Timing one size after another let a slow spell of a shared machine land on a single size (a one-token
    verify timed 23.6 ms just after the prefill, 19.5-21.6 ms in the decode loop), and ratios between sizes
    are what the tree is chosen on. Rounds alternate direction so a drift in speed hits all sizes alike.
    """
    for run in runs:  # warm-up
        run()
    _sync(device)
    times: list[list[float]] = [[] for _ in runs]
    for round_index in tqdm(range(repeats), desc=desc, unit="round"):
        order = range(len(runs)) if round_index % 2 == 0 else reversed(range(len(runs)))
        for i in order:
            start = time.perf_counter()
            runs[i]()
            _sync(device)
            times[i].append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def _running_max(values: list[float]) -> list[float]:
    """Costs cannot fall as the work grows; a dip is timing noise."""
    return np.maximum.accumulate(values).tolist()


@torch.inference_mode()
def measure_verify_ms(target, sizes: Sequence[int], cache_length: int, repeats: int, seed: int = 0) -> list[float]:
    """Median ms of a target forward of n tokens under a tree mask over a `cache_length` cache, per n."""
    device, dtype = target.device, target.dtype
    vocab = target.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    context = torch.randint(vocab, (1, cache_length), generator=generator).to(device)
    target(input_ids=context, position_ids=torch.arange(cache_length, device=device)[None],
           past_key_values=cache, use_cache=True)
    runs = []
    for n in sizes:
        ids = torch.randint(vocab, (1, n), generator=generator).to(device)
        positions = (cache_length + torch.arange(n, device=device))[None]
        # One token is timed as plain decoding runs it (no mask): it is the baseline of every speedup.
        mask = None if n == 1 else tree_attention_mask(
            torch.ones(n, n, dtype=torch.bool, device=device).tril(), cache_length, dtype)

        def run(ids=ids, positions=positions, mask=mask, n=n):
            target(input_ids=ids, position_ids=positions, attention_mask=mask, past_key_values=cache, use_cache=True)
            cache.crop(-n)

        runs.append(run)
    return _running_max(_interleaved_median_ms(runs, repeats, device, "verify timing"))


def _branching_tree_paths(branches: int, block_size: int) -> list[tuple[int, ...]]:
    """A tree whose pass 1 has `branches` branches, one child each (its pass 0 and 1 are the cost measured)."""
    k = block_size
    trunk = [(0,) * d for d in range(1, k)]
    leaves = [(0,) * (k - 1) + (r,) for r in range(branches)]
    return trunk + leaves + [leaf + (0,) for leaf in leaves]


@torch.inference_mode()
def measure_draft_ms(drafter: Drafter, branch_counts: Sequence[int], cache_length: int, repeats: int,
                     seed: int = 0) -> tuple[float, list[float]]:
    """Median ms of `draft_tree` for pass 0 alone, and of one further pass with b branches, per b."""
    k = drafter.config.block_size
    device, dtype = drafter.head_weight.device, drafter.head_weight.dtype
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, cache_length + 2 * k, drafter.config.hidden_size, generator=generator)
    hidden = hidden.to(device=device, dtype=dtype)
    next_ids = torch.randint(drafter.config.vocab_size, (1, cache_length + 2 * k), generator=generator).to(device)
    # Commit the context once; each timed call drafts from 2k pending positions (k of them new to the LSTM),
    # about what one step leaves.
    state = DrafterState(hidden[:, :cache_length], next_ids[:, :cache_length])
    draft_tree(drafter, build_tree(TreeConfig.chain(k), k, device=device), state, cache_length)
    length = cache_length + k

    def drafting(paths):
        tree = build_tree(TreeConfig(paths=[list(p) for p in paths]), k, device=device)

        def run():
            fresh = DrafterState(hidden[:, cache_length - k:length], next_ids[:, cache_length - k:length],
                                 committed=state.committed, kv=state.kv, fused=state.fused, lstm=state.lstm)
            draft_tree(drafter, tree, fresh, length)

        return run

    runs = [drafting([(0,) * d for d in range(1, k + 1)])]
    runs += [drafting(_branching_tree_paths(b, k)) for b in branch_counts]
    first_pass_ms, *with_pass_ms = _interleaved_median_ms(runs, repeats, device, "draft timing")
    pass_ms = [max(ms - first_pass_ms, 0.0) for ms in with_pass_ms]
    return first_pass_ms, _running_max(pass_ms)


def measure_costs(target, drafter: Drafter, *, max_nodes: int, cache_length: int, repeats: int,
                  max_chain: int = 0) -> CostModel:
    """Verification of root + up to `max_nodes` drafted + `max_chain` lookup tokens, and the drafter's passes."""
    verify_sizes = size_grid(max_nodes + 1 + max_chain)
    draft_vocab = drafter.config.draft_vocab_size or drafter.config.vocab_size
    branch_counts = size_grid(min(max_nodes, draft_vocab))
    verify_ms = measure_verify_ms(target, verify_sizes, cache_length, repeats)
    first_pass_ms, pass_ms = measure_draft_ms(drafter, branch_counts, cache_length, repeats)
    return CostModel(cache_length, verify_sizes, verify_ms, first_pass_ms, branch_counts, pass_ms)


# ---------------------------------------------------------------------------------------------------
# Construction


def greedy_node_order(accept: np.ndarray, max_nodes: int, max_ranks: Sequence[int]) -> list[tuple[tuple[int, ...], float]]:
    """Up to `max_nodes` (path, value) in decreasing value = product of accept[d][r] along the path.

    accept (depth, R); max_ranks: the rank bound of each depth (len >= depth). Every prefix of the result is
    a prefix-closed tree: children are offered only once their parent is taken, and never outvalue it.
    Nodes of value 0 are never taken. Ties go to the shallower, then the lexicographically smaller path.
    """
    depth, num_ranks = accept.shape
    heap: list[tuple[float, int, tuple[int, ...]]] = []

    def offer(parent: tuple[int, ...], parent_value: float) -> None:
        d = len(parent)
        if d >= depth:
            return
        for rank in range(min(max_ranks[d], num_ranks)):
            value = parent_value * float(accept[d, rank])
            if value > 0:
                heapq.heappush(heap, (-value, d + 1, parent + (rank,)))

    offer((), 1.0)
    order = []
    while heap and len(order) < max_nodes:
        negative_value, _, path = heapq.heappop(heap)
        order.append((path, -negative_value))
        offer(path, -negative_value)
    return order


def expected_tau(paths: Sequence[Sequence[int]], accept: np.ndarray) -> float:
    """1 + sum over nodes of the product of accept along the path: expected accepted + bonus tokens."""
    total = 1.0
    for path in paths:
        if len(path) > accept.shape[0] or max(path) >= accept.shape[1]:
            continue  # beyond the measured table: counted as never accepted
        total += float(np.prod([accept[d, r] for d, r in enumerate(path)]))
    return total


@dataclass
class TreeChoice:
    paths: list[tuple[int, ...]]
    expected_tau: float
    step_ms: float
    expected_speedup: float  # (tau / step_ms) / (1 / verify_ms(1))
    curve: list[dict[str, float]]  # one row per candidate size
    order: list[tuple[int, ...]] = field(default_factory=list)  # the nested trees: T_n = order[:n]


def choose_tree(accept: np.ndarray, costs: CostModel, block_size: int, max_nodes: int,
                max_ranks: Sequence[int]) -> TreeChoice:
    """The nested greedy tree of the size with the most expected tokens per millisecond (at least one node)."""
    # A drafter never right on the held-out data still gets the smallest tree; its speedup (< 1) says the rest.
    order = greedy_node_order(accept, max_nodes, max_ranks) or [((0,), 0.0)]
    plain_ms = costs.verify(1)
    curve, best = [], None
    tau = 1.0
    for n, (_, value) in enumerate(order, start=1):
        tau += value
        paths = [path for path, _ in order[:n]]
        step_ms = costs.step(paths, block_size)
        row = {"nodes": n, "depth": max(len(p) for p in paths), "expected_tau": tau, "step_ms": step_ms,
               "expected_speedup": tau * plain_ms / step_ms}
        curve.append(row)
        if best is None or row["expected_speedup"] > best["expected_speedup"]:
            best = row
    paths = [path for path, _ in order[: best["nodes"]]]
    return TreeChoice(paths, best["expected_tau"], best["step_ms"], best["expected_speedup"], curve,
                      [path for path, _ in order])


# ---------------------------------------------------------------------------------------------------
# Fixed shapes


def paper_like_prior(depth: int, num_ranks: int, block_size: int) -> np.ndarray:
    """A fixed acceptance prior (not measured): top-1 0.75, the remaining mass decaying geometrically
    over ranks, and the second token of each k-block (drafted one step further ahead) 10 % less likely."""
    rank_prior = np.array([0.75] + [0.2 * 0.4 * 0.6 ** (r - 1) for r in range(1, num_ranks)])
    block_factor = np.array([1.0 if d % block_size == 0 else 0.9 for d in range(depth)])
    return block_factor[:, None] * rank_prior[None, :]


@dataclass(frozen=True)
class Preset:
    block_size: int
    depth: int
    nodes: int
    max_ranks: tuple[int, ...]

    def paths(self) -> list[tuple[int, ...]]:
        prior = paper_like_prior(self.depth, max(self.max_ranks), self.block_size)
        order = greedy_node_order(prior, self.nodes, ranks_per_depth(self.max_ranks, self.depth))
        return [path for path, _ in order]


# The paper's k=2 trees are hand-tuned per model family (4 passes, depth 8, about 166 nodes, top-20 at the
# root, at most 10 deeper). The exact lists are not reproduced here: this preset is the greedy construction
# above run on `paper_like_prior` with the same bounds, a tree of the same size and depth.
PRESETS = {
    "falcon-k2": Preset(block_size=2, depth=8, nodes=166, max_ranks=(20, 10)),
    "falcon-k2-small": Preset(block_size=2, depth=8, nodes=32, max_ranks=(8, 4)),
}


def preset_tree(name: str) -> TreeConfig:
    if name not in PRESETS:
        raise TreeTuningError(f"unknown tree preset {name!r}; known: {sorted(PRESETS)}")
    return TreeConfig(paths=[list(p) for p in PRESETS[name].paths()])


# ---------------------------------------------------------------------------------------------------
# Orchestration


def tree_summary(paths: Sequence[Sequence[int]], block_size: int) -> dict[str, Any]:
    depth = max((len(p) for p in paths), default=0)
    return {
        "nodes": len(paths),
        "depth": depth,
        "nodes_per_depth": [sum(1 for p in paths if len(p) == d) for d in range(1, depth + 1)],
        "pass_branches": pass_branch_counts(paths, block_size),
    }


def _tree_candidates(order: Sequence[tuple[int, ...]], sizes: Sequence[int], stats: AcceptanceStats,
                     accept: np.ndarray, costs: CostModel, block_size: int) -> TreeCandidates:
    """The trees order[:n] for n in `sizes`, with what the joint choice with the lookup needs of each."""
    trees = [list(order[:n]) for n in sizes]
    return TreeCandidates(paths=trees, expected_tau=np.array([expected_tau(t, accept) for t in trees]),
                          draft_ms=np.array([costs.draft(t, block_size) for t in trees]),
                          accepted=stats.accepted_depths(order)[:, [n - 1 for n in sizes]])


def resolve_tree(config: TreeTuningConfig, drafter: Drafter, target=None, store=None,
                 eval_indices: Sequence[int] | None = None,
                 lookup: LookupTuningConfig | None = None) -> tuple[TreeConfig, dict[str, Any]]:
    """The tree to ship and a JSON-able report, with the lookup settings chosen with it in report["lookup"]
    (`pipelines.lookup_tuning`); tuned trees and lookups need `target`, `store` and `eval_indices`.

    Fixed and preset trees are also evaluated (expected and held-out tau, expected speedup) when those are given.
    """
    lookup = lookup or LookupTuningConfig()
    k = drafter.config.block_size
    max_depth = min(config.max_depth or drafter.config.max_tree_depth, drafter.config.max_tree_depth)
    report: dict[str, Any] = {"mode": config.mode, "block_size": k}
    measured = target is not None and store is not None and eval_indices is not None
    if config.mode == "fixed":
        fixed = TreeConfig(paths=config.paths, branching=config.branching)
    elif config.mode == "preset":
        fixed = preset_tree(config.preset)
        report["preset"] = config.preset
    else:
        fixed = None
        if not measured:
            raise TreeTuningError("tree.mode tuned needs the target, the feature store and its held-out split")
    if lookup.mode == "tuned" and not measured:
        raise TreeTuningError("lookup.mode tuned needs the target, the feature store and its held-out split")
    if fixed is not None:
        fixed_paths = [tuple(p) for p in fixed.resolve_paths()]
        build_tree(fixed, k, drafter.config.max_tree_depth)  # refuse a bad shape before any measuring
        max_depth = max(len(p) for p in fixed_paths)
        max_ranks = [max([p[d] for p in fixed_paths if len(p) > d]) + 1 for d in range(max_depth)]
        if not measured:
            report.update(paths=[list(p) for p in fixed_paths], summary=tree_summary(fixed_paths, k),
                          lookup={"mode": lookup.mode, "settings": asdict(lookup.settings())})
            return TreeConfig(paths=[list(p) for p in fixed_paths]), report
    else:
        max_ranks = ranks_per_depth(config.max_ranks, max_depth)

    eval_indices = list(eval_indices)[: config.max_samples]
    candidates = lookup_candidates(lookup)
    stats = measure_acceptance(drafter, store, eval_indices, max_depth, max(max_ranks),
                               max_positions=config.max_positions, batch_positions=config.batch_positions,
                               lookups=candidates)
    accept, replay = stats.conditional(), stats.chain
    nodes = len(fixed_paths) if fixed is not None else config.max_nodes
    costs = measure_costs(target, drafter, max_nodes=nodes, cache_length=config.cache_length,
                          repeats=config.timing_repeats, max_chain=replay.max_chain)
    if fixed is None:
        choice = choose_tree(accept, costs, k, config.max_nodes, max_ranks)
        trees = _tree_candidates(choice.order, range(1, len(choice.order) + 1), stats, accept, costs, k)
        curve = choice.curve
    else:
        trees, curve = _tree_candidates(fixed_paths, [len(fixed_paths)], stats, accept, costs, k), []
    best, lookup_report = resolve_lookup(lookup.mode, candidates, trees, replay, costs.verify)
    paths = trees.paths[best.tree]
    report.update(
        paths=[list(p) for p in paths],
        summary=tree_summary(paths, k),
        expected_tau=best.expected_tau,
        empirical_tau=best.empirical_tau,
        step_ms=best.step_ms,
        plain_step_ms=costs.verify(1),
        expected_speedup=best.expected_speedup,
        definitions={
            "tau": "mean tokens per target forward after the prefill, accepted drafts + the bonus token "
                   "(plain decoding = 1)",
            "expected_tau": "1 + sum over nodes of prod_d p[d][r_d] (p: conditional acceptance table), plus "
                            "the lookup chain's replayed gain over the tree (lookup.tree_only: without it)",
            "empirical_tau": "the same, replayed on the held-out ranks and lookup matches (greedy acceptance)",
            "expected_speedup": "expected_tau x verify_ms(1) / (draft_ms + verify_ms(nodes + 1 + chain)), "
                                "averaged over held-out positions; loop overhead excluded, so an upper bound",
        },
        acceptance={
            "samples": stats.num_samples,
            "positions": stats.num_positions,
            "max_depth": max_depth,
            "max_ranks": list(max_ranks),
            "conditional": accept.round(5).tolist(),
            "unconditional": stats.unconditional().round(5).tolist(),
            "parent_counts": stats.parent_counts().tolist(),
        },
        timing=costs.to_dict(),
        curve=curve,
        lookup=lookup_report,
    )
    if best.expected_speedup < 1.0:
        report["warning"] = (f"expected speedup {best.expected_speedup:.2f}x < 1: on this device drafting costs "
                             "more than it saves with this drafter; the tree kept is the least bad one")
    return TreeConfig(paths=[list(p) for p in paths]), report
