"""Trees from acceptance: nested trees by node value, the one with the most tokens per millisecond, presets.

A node's value is the product of p along its path, its probability of being accepted. A child's value never
exceeds its parent's, so taking nodes in decreasing value gives nested prefix-closed trees T_1 ⊂ T_2 ⊂ ...,
T_n holding the n most valuable nodes (within the depth and per-depth rank bounds).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from falcon.tree import TreeConfig
from pipelines.tree_tuning.config import PRESETS, TreeTuningError, ranks_per_depth
from pipelines.tree_tuning.costs import CostModel


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


def paper_like_prior(depth: int, num_ranks: int, block_size: int) -> np.ndarray:
    """A fixed acceptance prior (not measured): top-1 0.75, the remaining mass decaying geometrically
    over ranks, and the second token of each k-block (drafted one step further ahead) 10 % less likely."""
    rank_prior = np.array([0.75] + [0.2 * 0.4 * 0.6 ** (r - 1) for r in range(1, num_ranks)])
    block_factor = np.array([1.0 if d % block_size == 0 else 0.9 for d in range(depth)])
    return block_factor[:, None] * rank_prior[None, :]


def preset_tree(name: str) -> TreeConfig:
    if name not in PRESETS:
        raise TreeTuningError(f"unknown tree preset {name!r}; known: {sorted(PRESETS)}")
    preset = PRESETS[name]
    prior = paper_like_prior(preset.depth, max(preset.max_ranks), preset.block_size)
    order = greedy_node_order(prior, preset.nodes, ranks_per_depth(preset.max_ranks, preset.depth))
    return TreeConfig(paths=[list(path) for path, _ in order])
