"""Tree tuning (pipelines.tree_tuning): acceptance measured along the truth against draft_tree, the tables,
the construction and the cost model, on a tiny target and a briefly trained drafter, or on synthetic tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from falcon.drafter import load_drafter
from falcon.drafting import DrafterState, draft_tree
from falcon.target import load_target
from falcon.tree import TreeConfig, build_tree
from pipelines.tree_tuning.acceptance import (
    AcceptanceStats,
    decoding_positions,
    measure_acceptance,
    true_path_ranks,
)
from pipelines.tree_tuning.config import ranks_per_depth
from pipelines.tree_tuning.construction import choose_tree, expected_tau, greedy_node_order, preset_tree
from pipelines.tree_tuning.costs import CostModel
from tests.store_fixtures import trained_drafter_workspace

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return trained_drafter_workspace(tmp_path_factory.mktemp("tree_tuning"))


@pytest.fixture(scope="module")
def loaded_drafter(workspace):
    target, _ = load_target(workspace["target_dir"])
    return target, load_drafter(workspace["drafter_dir"], target)


# ---------------------------------------------------------------------------------------------------
# Acceptance measurement


def test_true_path_ranks_match_draft_tree(workspace, loaded_drafter):
    """Every rank measured along the truth is where draft_tree puts the true token, in every pass."""
    target, drafter = loaded_drafter
    store = workspace["store"]
    depth, max_rank = 6, 512  # the whole draft vocabulary: the true token always has a rank (or is absent)
    checked = 0
    for index in range(2):
        sample = store.sample(index)
        ids = torch.from_numpy(sample["input_ids"].astype(np.int64))
        hidden = torch.from_numpy(sample["hidden_states"])
        positions = decoding_positions(sample["loss_mask"], depth, 2, quota=5)
        ranks = true_path_ranks(drafter, hidden, ids, positions, depth, max_rank, batch_positions=3)
        for L, rank_row in zip(positions, ranks.tolist(), strict=True):
            found = next((d for d, r in enumerate(rank_row) if r == max_rank), depth)  # depths with a rank
            paths = set()
            for d in range(found):
                for r in {0, 1, rank_row[d]}:
                    paths.add(tuple(rank_row[:d]) + (r,))
            tree = build_tree(TreeConfig(paths=[list(p) for p in paths]), 2)
            state = DrafterState(hidden[None, :L], ids[None, 1:L + 1])
            with torch.inference_mode():
                node_tokens = draft_tree(drafter, tree, state, L)
            for node, path in enumerate(tree.paths, start=1):
                is_true_path = list(path) == rank_row[: len(path)]
                assert (int(node_tokens[node]) == int(ids[L + len(path)])) == is_true_path, (L, path)
                checked += 1
    assert checked > 20


def test_acceptance_table_is_a_probability_table(workspace, loaded_drafter):
    _, drafter = loaded_drafter
    stats = measure_acceptance(drafter, workspace["store"], range(4), depth=6, max_rank=4, max_positions=60)
    assert stats.ranks.shape == (stats.num_positions, 6) and 0 < stats.num_positions <= 60 + 4
    for table in (stats.conditional(), stats.unconditional()):
        assert table.shape == (6, 4)
        assert (table >= 0).all() and (table <= 1).all()
        assert (table.sum(1) <= 1 + 1e-9).all()  # ranks are disjoint events
    counts = stats.parent_counts()
    assert counts[0] == stats.num_positions and (np.diff(counts) <= 0).all()
    assert stats.empirical_tau([]) == 1.0


def test_conditional_table_and_replay_by_hand():
    ranks = np.array([[0, 0, 1], [0, 2, 0], [1, 0, 0], [2, 2, 2]])  # max_rank 2: rank 2 means "not found"
    stats = AcceptanceStats(ranks=ranks, max_rank=2, num_samples=1)
    # depth 1: all 4 rows; depth 2: rows 0-2 (depth-1 found); depth 3: rows 0 and 2 (row 1 lost at depth 2)
    assert stats.parent_counts().tolist() == [4, 3, 2]
    np.testing.assert_allclose(stats.conditional(), [[0.5, 0.25], [2 / 3, 0.0], [0.5, 0.5]])
    # chain (0), (0,0), (0,0,0): row 0 accepts 2, row 1 accepts 1, rows 2-3 accept 0
    assert stats.empirical_tau([[0], [0, 0], [0, 0, 0]]) == pytest.approx(1 + 3 / 4)
    assert stats.empirical_tau([[0], [1], [1, 0], [1, 0, 0]]) == pytest.approx(1 + (1 + 1 + 3) / 4)


# ---------------------------------------------------------------------------------------------------
# Construction


def test_greedy_order_respects_bounds_and_is_prefix_closed():
    rng = np.random.default_rng(0)
    accept = rng.uniform(0.0, 0.3, size=(6, 4))
    max_ranks = ranks_per_depth([4, 2, 1], 6)
    order = greedy_node_order(accept, 25, max_ranks)
    assert len(order) == 25
    values = [value for _, value in order]
    assert values == sorted(values, reverse=True)
    for n in range(1, len(order) + 1):
        paths = [path for path, _ in order[:n]]
        build_tree(TreeConfig(paths=[list(p) for p in paths]), 2, max_depth=6)  # raises unless prefix-closed
    assert all(len(p) <= 6 and all(r < max_ranks[d] for d, r in enumerate(p)) for p, _ in order)
    assert greedy_node_order(np.zeros((3, 2)), 10, [2, 2, 2]) == []


def synthetic_costs() -> CostModel:
    # verify(n): 10 ms for 1-2 tokens, 12 for 4, 20 for 8; one drafter pass of pass 0: 2 ms
    return CostModel(cache_length=0, verify_sizes=[1, 2, 4, 8], verify_ms=[10.0, 10.0, 12.0, 20.0],
                     first_pass_ms=2.0, pass_branches=[1, 2, 4], pass_ms=[3.0, 4.0, 6.0])


def test_chosen_tree_is_the_hand_computed_optimum():
    # Values: (0) .6, (1) .3, (0,0) .3, (1,0) .15, (0,1) .06, (1,1) .03. Greedy order (ties: shallower
    # first): (0), (1), (0,0), (1,0), (0,1), (1,1); E = 1.6, 1.9, 2.2, 2.35, 2.41, 2.44;
    # step = 2 + verify(n+1) = 12, 13, 14, 16, 18, 20 ms; E/step is largest at n = 3 (2.2 / 14).
    accept = np.array([[0.6, 0.3], [0.5, 0.1]])
    choice = choose_tree(accept, synthetic_costs(), block_size=2, max_nodes=6, max_ranks=[2, 2])
    assert choice.paths == [(0,), (1,), (0, 0)]
    assert choice.expected_tau == pytest.approx(2.2)
    assert choice.step_ms == pytest.approx(14.0)
    assert choice.expected_speedup == pytest.approx(2.2 / 14 * 10)
    assert [round(row["expected_tau"], 6) for row in choice.curve] == [1.6, 1.9, 2.2, 2.35, 2.41, 2.44]
    chain = [(0,), (0, 0)]
    chain_rate = expected_tau(chain, accept) / synthetic_costs().step(chain, 2)
    assert choice.expected_tau / choice.step_ms > chain_rate


def test_tree_beats_chain_of_same_size_when_second_ranks_are_likely():
    accept = np.array([[0.5, 0.4, 0.05]] * 4)
    for n in range(1, 5):
        greedy = [p for p, _ in greedy_node_order(accept, n, [3] * 4)]
        assert expected_tau(greedy, accept) >= expected_tau([(0,) * d for d in range(1, n + 1)], accept)
    greedy4 = [p for p, _ in greedy_node_order(accept, 4, [3] * 4)]
    assert expected_tau(greedy4, accept) > expected_tau([(0,) * d for d in range(1, 5)], accept) + 0.1


def test_draft_cost_counts_branches_per_pass():
    costs = synthetic_costs()
    paths = [(0,), (1,), (0, 0), (1, 0), (0, 0, 0), (1, 0, 0)]  # pass 1 branches: (0,0) and (1,0)
    assert costs.draft(paths, 2) == pytest.approx(2.0 + 4.0)
    assert costs.draft([], 2) == 0.0
    assert costs.verify(16) == pytest.approx(20.0 + 2.0 * 8)  # linear past the last measured size


def test_preset_resembles_the_paper_k2_tree():
    paths = [tuple(p) for p in preset_tree("falcon-k2").paths]
    assert len(paths) == 166 and max(len(p) for p in paths) == 8
    assert max(p[0] for p in paths) < 20 and all(r < 10 for p in paths for r in p[1:])
    build_tree(TreeConfig(paths=[list(p) for p in paths]), 2, max_depth=8)
