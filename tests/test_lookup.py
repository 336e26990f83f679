"""Context lookup: n-gram matching, the chain's length policy, the tree's lookup chain, and lossless decoding."""

import pytest
import torch

from falcon.generate import FalconDecoder, SamplingConfig, autoregressive_generate
from falcon.lookup import LookupConfig, NgramIndex
from falcon.tree import TreeConfig, TreeError, build_tree, with_chain
from tests.conftest import tiny_causal_lm
from tests.test_generate import chi_square_pvalue, exact_sequence_probs, new_drafter, prompts


def chain(index: NgramIndex) -> list[int]:
    return index.propose().tokens


def test_latest_earlier_occurrence_of_the_longest_suffix():
    index = NgramIndex(LookupConfig(num_tokens=3, max_ngram=3, min_ngram=1), [1, 2, 3, 9, 8, 2, 3, 7, 1, 2, 3])
    assert index.match() == (2, 3)  # (1, 2, 3) ends at 2; the later (2, 3) at 6 is a shorter match
    assert chain(index) == [9, 8, 2]
    index.extend([4])
    assert index.match() == (-1, 0) and chain(index) == []  # 4 never occurred before
    index.extend([1, 2])
    assert index.match() == (9, 2)  # (1, 2) ends at 9, and the 3 before it differs from the 4 before the suffix
    assert chain(index) == [3, 4, 1]  # its continuation runs into the suffix


def test_own_suffix_never_matches_and_bounds_hold():
    assert chain(NgramIndex(LookupConfig(num_tokens=4, min_ngram=1), [5, 6, 7])) == []
    assert chain(NgramIndex(LookupConfig(num_tokens=4, min_ngram=2), [5, 6, 9, 6])) == []  # 1-gram only
    assert chain(NgramIndex(LookupConfig(num_tokens=0, min_ngram=1), [5, 5, 5])) == []  # off


def test_a_continuation_running_into_the_end_repeats_its_period():
    # (6) ends at 1: what followed it is 9, 6, the context's own end; the loop 9, 6 goes on.
    assert chain(NgramIndex(LookupConfig(num_tokens=4, min_ngram=1), [5, 6, 9, 6])) == [9, 6, 9, 6]
    index = NgramIndex(LookupConfig(num_tokens=2, min_ngram=1))
    index.extend([3, 3, 3])
    assert index.match() == (1, 2) and chain(index) == [3, 3]  # the latest earlier (3, 3) ends at 1


def test_match_length_counts_back_beyond_max_ngram_up_to_the_cap():
    copy = list(range(100, 130))
    index = NgramIndex(LookupConfig(num_tokens=2, max_tokens=16, max_ngram=3), copy + [7] + copy[:12])
    assert index.match() == (11, 12)  # all 12 copied tokens agree with the source
    index = NgramIndex(LookupConfig(num_tokens=2, max_tokens=4, max_ngram=3), copy + [7] + copy[:12])
    assert index.match() == (11, 4)  # lengths past match_cap (4) change nothing: not counted


def test_chain_length_grows_with_the_match_and_starts_over_after_a_miss():
    config = LookupConfig(num_tokens=2, max_tokens=16, growth=1.0, chain_only_match=12)
    assert [config.chain_length(m) for m in (0, 1, 2, 3, 7, 15, 40)] == [0, 2, 2, 3, 7, 15, 16]
    assert [config.chain_only(m) for m in (0, 11, 12, 40)] == [False, False, True, True]
    assert LookupConfig(num_tokens=2, max_tokens=16, growth=0.5).chain_length(9) == 4
    assert LookupConfig(num_tokens=4, min_ngram=2).chain_length(1) == 0
    assert LookupConfig(num_tokens=4).chain_length(40) == 4  # max_tokens defaults to num_tokens: a fixed chain
    assert not LookupConfig(num_tokens=0, chain_only_match=1).chain_only(5)  # off

    # A reply copying a 60-token passage of the prompt, each chain accepted whole (+ the bonus token):
    # the chain doubles 3 -> 7 -> 15 -> 16 (max_tokens), the drafter is skipped from a match of 12 on,
    # and a token the passage does not have ends the match: the next chain starts short again.
    passage = list(range(100, 160))
    index = NgramIndex(config, passage + [7] + passage[:3])
    lengths, chain_only, copied = [], [], 3
    while copied < 36:
        proposal = index.propose()
        assert proposal.tokens == passage[copied:copied + len(proposal.tokens)]
        lengths.append(len(proposal.tokens))
        chain_only.append(proposal.chain_only)
        index.extend(proposal.tokens + [passage[copied + len(proposal.tokens)]])
        copied += len(proposal.tokens) + 1
    assert lengths == [3, 7, 15, 16] and chain_only == [False, False, True, True]
    index.extend([9, passage[0]])  # a miss, then a token seen once: a fresh 1-token match
    assert index.match()[1] == 1 and len(index.propose().tokens) == 2 and not index.propose().chain_only


@pytest.mark.parametrize("values", [dict(num_tokens=-1), dict(min_ngram=0), dict(min_ngram=4, max_ngram=3),
                                    dict(num_tokens=4, max_tokens=3), dict(num_tokens=2, max_tokens=10_000),
                                    dict(growth=0.0), dict(chain_only_match=0)])
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


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def looping_target(request):
    """With 8 tokens, greedy decoding falls into loops within a few dozen tokens: long matches."""
    return tiny_causal_lm(request.param, vocab_size=8, seed={"llama": 0, "qwen2": 1}[request.param])


@pytest.mark.parametrize("k", [1, 2])
def test_adaptive_chain_and_chain_only_steps_are_lossless(looping_target, k):
    """The chain grows on long matches and is verified alone on the longest; the output stays the target's."""
    target = looping_target
    lookup = LookupConfig(num_tokens=2, max_tokens=16, growth=1.0, chain_only_match=6)
    decoder = FalconDecoder(target, new_drafter(target, k, seed=k), TreeConfig(branching=[2, 1, 1]), lookup=lookup)
    steps = []
    for prompt in prompts(target.config.vocab_size, seed=5):
        expected = autoregressive_generate(target, prompt, 48).tokens
        result = decoder.generate(prompt, 48)
        assert result.tokens == expected
        assert all(step.accepted <= step.depth for step in result.steps)
        eos = expected[len(expected) // 2]
        assert decoder.generate(prompt, 48, eos_token_id=eos).tokens == \
            autoregressive_generate(target, prompt, 48, eos_token_id=eos).tokens
        steps += result.steps
    assert max(step.chain for step in steps) > lookup.num_tokens  # the chain grew
    chain_only = [step for step in steps if step.chain and step.drafted == step.chain]
    assert chain_only and any(step.accepted > 0 for step in chain_only)  # the drafter was skipped, the chain kept


@pytest.mark.slow  # statistical: thousands of sampled decodes (make test runs it, test-fast does not)
@pytest.mark.parametrize("lookup", [LookupConfig(num_tokens=3, min_ngram=1),
                                    LookupConfig(num_tokens=1, max_tokens=6, growth=2.0, chain_only_match=2)],
                         ids=["fixed", "adaptive-chain-only"])
def test_lookup_keeps_the_sampling_distribution(lookup):
    target = tiny_causal_lm("llama", vocab_size=6, seed=3)
    sampling = SamplingConfig(temperature=0.8)
    prompt = torch.tensor([[1, 5, 2, 1, 5]])
    length, n = 3, 1200
    exact = exact_sequence_probs(target, prompt, length, sampling)
    decoder = FalconDecoder(target, new_drafter(target, 2), TreeConfig(branching=[2, 1]), lookup=lookup)
    counts: dict = {}
    chain_only_steps = 0
    for seed in range(n):
        result = decoder.generate(prompt, length, sampling=SamplingConfig(0.8, seed=seed))
        counts[tuple(result.tokens)] = counts.get(tuple(result.tokens), 0) + 1
        chain_only_steps += sum(1 for step in result.steps if step.chain and step.drafted == step.chain)
    assert chi_square_pvalue(counts, exact, n) > 1e-3
    assert (chain_only_steps > 0) == (lookup.chain_only_match is not None)
    wrong = exact_sequence_probs(target, prompt, length, SamplingConfig(1.0))
    assert chi_square_pvalue(counts, wrong, n) < 1e-6
