import pytest
import torch

from falcon.drafter import relaxed_causal_mask
from falcon.tree import TreeConfig, TreeError, build_tree, tree_attention_mask


def test_relaxed_causal_mask_blocks_from_start():
    mask = relaxed_causal_mask(5, 2)
    expected = torch.tensor([
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_relaxed_causal_mask_aligned_to_end_makes_last_k_one_block():
    mask = relaxed_causal_mask(5, 2, align_end=True)
    assert mask[3:, 3:].all()  # the last two positions see each other
    assert mask[1, 2] and not mask[0, 1] and not mask[2, 3]  # blocks {0}, {1, 2}, {3, 4}
    assert torch.equal(relaxed_causal_mask(4, 1), torch.ones(4, 4).tril().bool())


def test_tree_mask_positions_and_tables():
    # root -> a(0), b(1); a -> c(0,0); c -> d(0,0,0)
    tree = build_tree(TreeConfig(paths=[[0], [1], [0, 0], [0, 0, 0]]), block_size=2)
    assert tree.num_nodes == 4 and tree.depth == 3 and tree.num_passes == 2
    assert tree.parents.tolist() == [-1, 0, 0, 1, 3]
    assert tree.depths.tolist() == [0, 1, 1, 2, 3]
    expected = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [1, 1, 0, 1, 0],
        [1, 1, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(tree.tree_mask, expected)
    # pass 0 proposes depths 1-2 from the root; pass 1 proposes depth 3 from node (0, 0)
    assert tree.node_ids[0].tolist() == [1, 2, 3] and tree.node_offset[0].tolist() == [0, 0, 1]
    assert tree.node_rank[0].tolist() == [0, 1, 0] and tree.top_ranks[0] == 2
    assert tree.branch_nodes[1].tolist() == [3] and tree.input_nodes[1].tolist() == [[1, 3]]
    assert tree.node_ids[1].tolist() == [4]

    mask = tree_attention_mask(tree.tree_mask, past_length=3, dtype=torch.float32)
    assert mask.shape == (1, 1, 5, 8)
    assert (mask[0, 0, :, :3] == 0).all()  # everyone sees the whole prefix
    assert torch.equal(mask[0, 0, :, 3:] == 0, expected)


def test_branching_expands_to_product():
    tree = build_tree(TreeConfig(branching=[3, 2, 1]), block_size=1)
    assert tree.num_nodes == 3 + 6 + 6
    assert tree.num_passes == 3
    assert tree.branch_nodes[2].numel() == 6


@pytest.mark.parametrize("config, message", [
    (TreeConfig(paths=[[0], [0, 0, 1]]), "prefix-closed"),
    (TreeConfig(), "exactly one"),
    (TreeConfig(branching=[2, 0]), ">= 1"),
])
def test_bad_tree_configs_are_refused(config, message):
    with pytest.raises(TreeError, match=message):
        build_tree(config, block_size=2)


def test_tree_deeper_than_drafter_supports():
    with pytest.raises(TreeError, match="deeper than the drafter supports"):
        build_tree(TreeConfig.chain(9), block_size=2, max_depth=8)


@pytest.mark.parametrize("paths", [[[0], [0, "1"]], [[0], [1.5]], [[True]], [0, 1], {"0": [0]}])
def test_malformed_paths_are_refused_not_cast(paths):
    with pytest.raises(TreeError, match="tree path"):
        build_tree(TreeConfig(paths=paths), block_size=2)


def test_ranks_beyond_the_draft_vocabulary_are_refused():
    build_tree([[0], [3], [3, 3]], block_size=2, num_candidates=4)
    with pytest.raises(TreeError, match="rank 4 in the tree, but the drafter proposes only 4 candidates"):
        build_tree([[0], [0, 4]], block_size=2, num_candidates=4)


def test_node_count_is_bounded():
    build_tree(TreeConfig(branching=[4, 2]), block_size=2, max_nodes=12)
    with pytest.raises(TreeError, match="the tree has 13 nodes, more than the 12 allowed"):
        build_tree(TreeConfig(branching=[13]), block_size=2, max_nodes=12)
