"""What a tree costs on this device: the target verifying n tokens, the drafter's passes (steps 2 and 3 of the tuner).

Verification: the target's forward of n new tokens under a tree mask over a cache of `cache_length` tokens,
median over repeats. Drafting: `draft_tree` on a tree with pass 0 only, and on trees whose pass 1 has b branches.
Sizes are timed in interleaved rounds, so that load from other processes hits all of them alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from falcon.devices import synchronize
from falcon.drafter import Drafter
from falcon.drafting import DrafterState, draft_tree
from falcon.tree import TreeConfig, build_tree, tree_attention_mask


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


def _interleaved_median_ms(runs: Sequence, repeats: int, device: torch.device, desc: str) -> list[float]:
    """Median ms of each callable over `repeats` rounds that time every one of them once.

    Timing one size after another let a slow spell of a shared machine land on a single size (a one-token
    verify timed 23.6 ms just after the prefill, 19.5-21.6 ms in the decode loop), and ratios between sizes
    are what the tree is chosen on. Rounds alternate direction so a drift in speed hits all sizes alike.
    """
    for run in runs:  # warm-up
        run()
    synchronize(device)
    times: list[list[float]] = [[] for _ in runs]
    for round_index in tqdm(range(repeats), desc=desc, unit="round"):
        order = range(len(runs)) if round_index % 2 == 0 else reversed(range(len(runs)))
        for i in order:
            start = time.perf_counter()
            runs[i]()
            synchronize(device)
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
