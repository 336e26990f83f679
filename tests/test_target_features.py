"""Greedy replies with the features of the decode that wrote them: the replies of plain greedy decoding and the
features of one forward over prompt + reply, on tiny fp32 Llama and Qwen2 targets."""

import pytest
import torch

from falcon.decode_kernels import GROUPED_DECODE
from falcon.generate import autoregressive_generate
from falcon.target import target_parts
from pipelines.extract.target_features import (
    forward_batches,
    forward_features,
    generation_batches,
    greedy_replies_with_features,
)
from tests.conftest import tiny_causal_lm

TOPK = 5


def prompt_set(vocab_size: int, n: int = 7) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab_size, (length,), generator=generator).tolist()
            for length in (1, 4, 9, 3, 17, 9, 30)[:n]]


@pytest.mark.parametrize("attention", ["sdpa", GROUPED_DECODE])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_replies_are_plain_greedy_and_features_those_of_one_forward(family, attention):
    model = tiny_causal_lm(family, seed=3)
    model.set_attn_implementation(attention)  # the extraction actor's target runs grouped_decode
    decoder, _, lm_head = target_parts(model)
    prompts = prompt_set(model.config.vocab_size)
    budgets = [2 + 3 * i for i in range(len(prompts))]  # finished rows leave the batch at different steps
    # An EOS the target does emit, so that some replies stop before their budget.
    first = autoregressive_generate(model, torch.tensor([prompts[4]]), 6).tokens
    eos = {first[3]}
    outputs = greedy_replies_with_features(decoder, lm_head, prompts, budgets, eos, TOPK, max_rows=3)

    stopped_early = 0
    for prompt, budget, (reply, features) in zip(prompts, budgets, outputs, strict=True):
        assert reply == autoregressive_generate(model, torch.tensor([prompt]), budget, eos).tokens
        stopped_early += len(reply) < budget
        expected = forward_features(decoder, lm_head, [torch.tensor(prompt + reply)], TOPK)[0]
        assert features["hidden_states"].shape == (len(prompt) + len(reply), model.config.hidden_size)
        torch.testing.assert_close(features["hidden_states"], expected["hidden_states"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(features["topk_values"], expected["topk_values"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(features["logsumexp"], expected["logsumexp"], rtol=1e-5, atol=1e-5)
        assert torch.equal(features["topk_indices"], expected["topk_indices"])
    assert stopped_early, "the EOS must end some replies before their budget"


def test_without_topk_only_hidden_states_are_kept():
    model = tiny_causal_lm("llama")
    decoder, _, lm_head = target_parts(model)
    (reply, features), = greedy_replies_with_features(decoder, lm_head, [[5, 6, 7]], [4], set(), topk=0)
    assert len(reply) == 4 and set(features) == {"hidden_states"} and features["hidden_states"].shape[0] == 7


def test_generation_batches_group_similar_prompts_within_rows_and_tokens():
    lengths, budgets = [50, 3, 40, 5, 4, 45, 2], [10] * 7
    batches = generation_batches(lengths, budgets, max_rows=3, max_tokens=100)
    assert sorted(i for batch in batches for i in batch) == list(range(7))
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) == 1 or len(batch) * (max(lengths[i] for i in batch) + 10) <= 100
    # Shortest prompts first, together; the two longest would hold 2 x (50 + 10) > 100 tokens.
    assert batches == [[6, 1, 4], [3, 2], [5], [0]]


def test_forward_batches_bucket_by_length_within_the_budget():
    lengths = [5, 40, 7, 38, 100, 6]
    batches = forward_batches(lengths, max_tokens=80)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert batches[0] == [4]  # longer than the budget allows with company: alone
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) == 1 or len(batch) * longest <= 80
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
    assert [4] in batches and [1, 3] in batches and [2, 5, 0] in batches
