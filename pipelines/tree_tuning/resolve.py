"""`resolve_tree`: the tree (and the lookup chain chosen with it) a package ships, with its report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from falcon.drafter import Drafter
from falcon.tree import TreeConfig, build_tree
from pipelines.lookup_tuning import LookupTuningConfig, TreeCandidates, lookup_candidates, resolve_lookup
from pipelines.tree_tuning.acceptance import AcceptanceStats, measure_acceptance
from pipelines.tree_tuning.config import TreeTuningConfig, TreeTuningError, ranks_per_depth
from pipelines.tree_tuning.construction import choose_tree, expected_tau, preset_tree
from pipelines.tree_tuning.costs import CostModel, measure_costs, pass_branch_counts


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
            "empirical_tau": "the same, replayed on the held-out ranks and lookup matches (greedy acceptance), "
                             "over the steps of a decode walked through each held-out sample",
            "expected_speedup": "expected_tau x verify_ms(1) / (draft_ms + verify_ms(nodes + 1 + chain)), "
                                "averaged over those steps; loop overhead excluded, so an upper bound",
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
