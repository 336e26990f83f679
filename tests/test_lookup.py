"""Context lookup: n-gram matching, the tree's lookup chain, and lossless decoding with both."""

import pytest
import torch

from falcon.generate import FalconDecoder, SamplingConfig, autoregressive_generate
from falcon.lookup import LookupConfig, NgramIndex
from falcon.tree import TreeConfig, TreeError, build_tree, with_chain
from tests.conftest import tiny_causal_lm
from tests.test_generate import chi_square_pvalue, exact_sequence_probs, new_drafter, prompts


def test_latest_earlier_occurrence_of_the_longest_suffix():
    index = NgramIndex(LookupConfig(num_tokens=3, max_ngram=3, min_ngram=1), [1, 2, 3, 9, 8, 2, 3, 7, 1, 2, 3])
    assert index.continuation() == [9, 8, 2]  # (1, 2, 3) ends at 2; the later (2, 3) at 6 is a shorter match
    index.extend([4])
    assert index.continuation() == []  # 4 never occurred before
    index.extend([1, 2])
    assert index.continuation() == [3, 4, 1]  # (4, 1, 2) ends at 13: its continuation runs into the suffix


def test_own_suffix_never_matches_and_bounds_hold():
    assert NgramIndex(LookupConfig(num_tokens=4, min_ngram=1), [5, 6, 7]).continuation() == []
    assert NgramIndex(LookupConfig(num_tokens=4, min_ngram=2), [5, 6, 9, 6]).continuation() == []  # 1-gram only
    assert NgramIndex(LookupConfig(num_tokens=4, min_ngram=1), [5, 6, 9, 6]).continuation() == [9, 6]
    assert NgramIndex(LookupConfig(num_tokens=0, min_ngram=1), [5, 5, 5]).continuation() == []  # off
    index = NgramIndex(LookupConfig(num_tokens=2, min_ngram=1))
    index.extend([3, 3, 3])
    assert index.continuation() == [3]  # the latest earlier (3, 3) ends at 1: one token follows it


@pytest.mark.parametrize("values", [dict(num_tokens=-1), dict(min_ngram=0), dict(min_ngram=4, max_ngram=3)])
def test_bad_lookup_config_is_refused(values):
    with pytest.raises(ValueError, match="lookup"):
        LookupConfig(**values)


def test_chain_sits_under_the_root_beside_the_drafter_tree():
    tree = build_tree(TreeConfig(paths=[[0], [1], [0, 0]]), 2)
    chained = with_chain(tree, 3)
    assert chained.num_nodes == 6 and chained.max_path_length == 3 and chained.depth == 2
    assert chained.parents.tolist() == [-1, 0, 0, 1, 0, 4, 5]
    assert chained.depths.tolist() == [0, 1, 1, 2, 1, 2, 3]
    assert chained.children[0] == [1, 2, 4] and chained.children[5] == [6]
    assert chained.tree_mask[6].nonzero().flatten().tolist() == [0, 4, 5, 6]
    assert chained.tree_mask[:4, :4].equal(tree.tree_mask) and not chained.tree_mask[:4, 4:].any()
    assert with_chain(tree, 0) is tree
    with pytest.raises(TreeError, match="already"):
        with_chain(chained, 1)


def test_greedy_acceptance_walks_down_the_chain():
    from falcon.generate import accept_greedy

    tree = with_chain(build_tree(TreeConfig(paths=[[0], [1], [0, 0]]), 2), 3)
    node_tokens = torch.tensor([7, 1, 2, 3, 4, 5, 6])  # nodes 4..6: the chain 4 -> 5 -> 6
    logits = torch.zeros(7, 10)
    target_next = {0: 4, 4: 5, 5: 9, 1: 3}  # the target agrees with the chain for two tokens, then says 9
    for node, token in target_next.items():
        logits[node, token] = 1.0
    assert accept_greedy(tree, node_tokens, logits) == ([0, 4, 5], 9)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def target(request):
    return tiny_causal_lm(request.param, seed={"llama": 0, "qwen2": 1}[request.param])


@pytest.mark.parametrize("k", [1, 2])
def test_lookup_is_lossless_and_its_chain_gets_accepted(target, k):
    """Random drafters accept next to nothing; tiny random targets fall into greedy loops that lookup copies."""
    tree = TreeConfig(branching=[2, 1, 1])
    plain = FalconDecoder(target, new_drafter(target, k, seed=k), tree)
    looked = FalconDecoder(target, new_drafter(target, k, seed=k), tree, lookup=LookupConfig(num_tokens=5, min_ngram=1))
    accepted = {"plain": 0, "lookup": 0}
    for prompt in prompts(target.config.vocab_size, seed=5):
        expected = autoregressive_generate(target, prompt, 48).tokens
        for name, decoder in (("plain", plain), ("lookup", looked)):
            result = decoder.generate(prompt, 48)
            assert result.tokens == expected, name
            accepted[name] += sum(step.accepted for step in result.steps)
            assert all(step.accepted <= step.depth for step in result.steps)
        eos = expected[len(expected) // 2]  # EOS and max_new_tokens landing inside a lookup chain
        assert looked.generate(prompt, 48, eos_token_id=eos).tokens == \
            autoregressive_generate(target, prompt, 48, eos_token_id=eos).tokens
        assert looked.generate(prompt, 17).tokens == expected[:17]
    assert accepted["lookup"] > accepted["plain"]  # chain tokens were accepted (random drafters: seeded, fixed)


def test_lookup_keeps_the_sampling_distribution():
    target = tiny_causal_lm("llama", vocab_size=6, seed=3)
    sampling = SamplingConfig(temperature=0.8)
    prompt = torch.tensor([[1, 5, 2, 1, 5]])
    length, n = 3, 1200
    exact = exact_sequence_probs(target, prompt, length, sampling)
    decoder = FalconDecoder(target, new_drafter(target, 2), TreeConfig(branching=[2, 1]),
                            lookup=LookupConfig(num_tokens=3, min_ngram=1))
    counts: dict = {}
    for seed in range(n):
        result = decoder.generate(prompt, length, sampling=SamplingConfig(0.8, seed=seed))
        counts[tuple(result.tokens)] = counts.get(tuple(result.tokens), 0) + 1
    assert chi_square_pvalue(counts, exact, n) > 1e-3
    wrong = exact_sequence_probs(target, prompt, length, SamplingConfig(1.0))
    assert chi_square_pvalue(counts, wrong, n) < 1e-6
