"""Lossless speculative generation: Falcon's greedy output must equal plain greedy decoding token for token."""

import math

import pytest
import torch

from falcon.csgd import CSGDConfig, csgd_step
from falcon.drafter import (
    Drafter,
    DrafterConfig,
    DrafterMismatchError,
    build_draft_vocab,
    load_drafter,
    save_drafter,
)
from falcon.generate import FalconDecoder, SamplingConfig, autoregressive_generate, warp_probs
from falcon.tree import TreeConfig, TreeError
from tests.conftest import tiny_causal_lm

TREES = {
    "chain": TreeConfig.chain(6),
    "wide": TreeConfig(branching=[4, 2, 2, 1, 1, 1]),
    "paths": TreeConfig(paths=[[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0, 0],
                               [0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]),
}
PROMPT_LENGTHS = (1, 2, 3, 7, 16, 33)


def prompts(vocab_size: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (1, n), generator=generator) for n in PROMPT_LENGTHS]


def new_drafter(target, k: int, draft_vocab: torch.Tensor | None = None, seed: int = 0) -> Drafter:
    torch.manual_seed(seed)
    config = DrafterConfig.from_target(
        target.config, block_size=k, max_passes=6,
        draft_vocab_size=None if draft_vocab is None else draft_vocab.numel(),
    )
    drafter = Drafter(config)
    if draft_vocab is not None:
        drafter.set_draft_vocab(draft_vocab)
    return drafter.attach_target(target.get_input_embeddings(), target.get_output_embeddings())


def train_briefly(target, drafter: Drafter, sequences: list[torch.Tensor], steps: int = 60) -> Drafter:
    """A few CSGD steps on the target's own greedy continuations: enough for long accepted paths."""
    batches = []
    with torch.no_grad():
        for ids in sequences:
            hidden_states = target.get_decoder()(ids).last_hidden_state
            batches.append(dict(hidden_states=hidden_states, input_ids=ids, loss_mask=torch.ones_like(ids)))
    lm_head_weight = target.get_output_embeddings().weight.detach()
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=3e-3)
    config = CSGDConfig(noise_bound=0.0, dist_weight=1.0, kl_weight=0.0)  # hard labels learn fastest here
    generator = torch.Generator().manual_seed(0)
    drafter.train()
    for step in range(steps):
        loss = sum(csgd_step(drafter, batch, config, step / steps, lm_head_weight, generator)["loss"] for batch in batches)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return drafter.eval()


def greedy_continuations(target, prompt_list, max_new_tokens=40):
    return [torch.cat([p, torch.tensor([autoregressive_generate(target, p, max_new_tokens).tokens])], 1)
            for p in prompt_list]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def target(request):
    return tiny_causal_lm(request.param, seed={"llama": 0, "qwen2": 1}[request.param])


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("tree_name", sorted(TREES))
def test_random_drafter_is_lossless(target, k, tree_name):
    decoder = FalconDecoder(target, new_drafter(target, k, seed=k), TREES[tree_name])
    for prompt in prompts(target.config.vocab_size, seed=k):
        expected = autoregressive_generate(target, prompt, 24).tokens
        assert decoder.generate(prompt, 24).tokens == expected


@pytest.fixture(scope="module")
def trained(target):
    """Drafters trained briefly on the target's continuations of the test prompts: long accepted paths."""
    prompt_list = prompts(target.config.vocab_size, seed=7)
    sequences = greedy_continuations(target, prompt_list)
    counts = torch.bincount(torch.cat([s.flatten() for s in sequences]), minlength=target.config.vocab_size)
    draft_vocab = build_draft_vocab(counts, 96)
    drafters = {
        (k, reduced): train_briefly(target, new_drafter(target, k, draft_vocab if reduced else None), sequences)
        for k in (1, 2, 3) for reduced in (False, True)
    }
    return prompt_list, drafters


@pytest.mark.parametrize("reduced", [False, True], ids=["full-vocab", "draft-vocab"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_trained_drafter_is_lossless_and_accepts(target, trained, k, reduced):
    prompt_list, drafters = trained
    taus = []
    for tree_name, tree in TREES.items():
        decoder = FalconDecoder(target, drafters[(k, reduced)], tree)
        for prompt in prompt_list:
            expected = autoregressive_generate(target, prompt, 40).tokens
            result = decoder.generate(prompt, 40)
            assert result.tokens == expected, (tree_name, prompt.shape)
            taus.append(result.mean_accepted)
    # the drafter really drafts: paths several tokens long get accepted, so acceptance logic is exercised
    assert max(taus) >= 3.0 and sum(taus) / len(taus) >= 2.0


@pytest.mark.parametrize("k", [1, 2, 3])
def test_eos_inside_tree_and_max_new_tokens_mid_tree(target, trained, k):
    prompt_list, drafters = trained
    decoder = FalconDecoder(target, drafters[(k, False)], TREES["wide"])
    for prompt in prompt_list:
        full = autoregressive_generate(target, prompt, 40).tokens
        for eos_position in (3, 11, 20):
            eos = full[eos_position]
            expected = autoregressive_generate(target, prompt, 40, eos_token_id=eos).tokens
            assert expected[-1] == eos
            assert decoder.generate(prompt, 40, eos_token_id=[eos, 10_000]).tokens == expected
        for max_new in (1, 2, 5, 13, 29):
            result = decoder.generate(prompt, max_new)
            assert result.tokens == full[:max_new]


def test_drafter_save_load_round_trip(tmp_path, target, trained):
    _, drafters = trained
    drafter = drafters[(2, True)]
    drafter.config.target_fingerprint = "tiny-target"
    save_drafter(drafter, tmp_path)
    loaded = load_drafter(tmp_path, target, target_fingerprint="tiny-target")
    assert torch.equal(loaded.draft_to_target, drafter.draft_to_target)
    hidden_states = torch.randn(1, 9, target.config.hidden_size)
    next_ids = torch.randint(0, target.config.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.allclose(loaded.logits(loaded(hidden_states, next_ids)), drafter.logits(drafter(hidden_states, next_ids)))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "model.safetensors"))
    assert not any("embed" in name or "head" in name for name in saved)  # the target's weights are not copied
    with pytest.raises(DrafterMismatchError, match="trained for target 'tiny-target'"):
        load_drafter(tmp_path, target, target_fingerprint="another-target")


def test_bad_inputs_get_clear_errors(target):
    drafter = new_drafter(target, 2)
    decoder = FalconDecoder(target, drafter, TREES["chain"])
    with pytest.raises(ValueError, match="prompt is empty"):
        decoder.generate(torch.zeros(1, 0, dtype=torch.long), 5)
    with pytest.raises(TreeError, match="deeper than the drafter supports"):
        FalconDecoder(target, drafter, TreeConfig.chain(13))
    drafter.config.target_fingerprint = "trained-for-another"
    with pytest.raises(DrafterMismatchError):
        FalconDecoder(target, drafter, TREES["chain"], target_fingerprint="this-target")


def exact_sequence_probs(target, prompt, length, sampling):
    """P(first `length` sampled tokens = s) for every s, by enumeration over a tiny vocabulary."""
    vocab = target.config.vocab_size
    probs = {(): 1.0}
    for _ in range(length):
        grown = {}
        for prefix, p in probs.items():
            ids = torch.cat([prompt, torch.tensor([list(prefix)], dtype=torch.long)], 1)
            with torch.no_grad():
                step = warp_probs(target(ids).logits[0, -1], sampling).double()
            for token in range(vocab):
                grown[prefix + (token,)] = p * float(step[token])
        probs = grown
    return probs


def chi_square_pvalue(counts: dict, expected_probs: dict, n: int) -> float:
    """Pearson chi-square, bins with expected count < 5 pooled; p-value via the regularised gamma function."""
    stat, pooled_obs, pooled_exp, bins = 0.0, 0.0, 0.0, 0
    for outcome, p in expected_probs.items():
        expected = p * n
        if expected < 5:
            pooled_obs += counts.get(outcome, 0)
            pooled_exp += expected
            continue
        stat += (counts.get(outcome, 0) - expected) ** 2 / expected
        bins += 1
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        bins += 1
    dof = bins - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.slow  # statistical: thousands of sampled decodes (make test runs it, test-fast does not)
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_speculative_sampling_keeps_the_target_distribution(temperature, top_p):
    target = tiny_causal_lm("llama", vocab_size=8, seed=3)
    sampling = SamplingConfig(temperature=temperature, top_p=top_p)
    prompt = torch.tensor([[1, 5, 2, 7]])
    length, n = 3, 1500
    exact = exact_sequence_probs(target, prompt, length, sampling)
    decoder = FalconDecoder(target, new_drafter(target, 2), TreeConfig(branching=[3, 2, 2]))
    counts: dict = {}
    accepted = 0
    for seed in range(n):
        result = decoder.generate(prompt, length, sampling=SamplingConfig(temperature, top_p, seed=seed))
        counts[tuple(result.tokens)] = counts.get(tuple(result.tokens), 0) + 1
        accepted += sum(s.accepted for s in result.steps)
    assert accepted > n // 4  # the tree really proposed tokens the target accepted
    assert chi_square_pvalue(counts, exact, n) > 1e-3
    # the test has power: the same samples clearly reject a slightly different distribution
    wrong = exact_sequence_probs(target, prompt, length, SamplingConfig(temperature * 1.25, top_p))
    assert chi_square_pvalue(counts, wrong, n) < 1e-6
    assert math.isclose(sum(exact.values()), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_drafter_state_reads_each_position_into_the_lstm_once(target, k):
    """draft_tree caches the LSTM outputs of uncommitted positions: step by step they equal one LSTM pass."""
    from falcon.drafting import DrafterState, draft_tree
    from falcon.tree import build_tree

    drafter = new_drafter(target, k)
    hidden_size = drafter.config.hidden_size
    generator = torch.Generator().manual_seed(3)
    hidden_states = torch.randn(1, 12, hidden_size, generator=generator)
    next_ids = torch.randint(0, target.config.vocab_size, (1, 12), generator=generator)
    tree = build_tree(TreeConfig.chain(2 * k), k, drafter.config.max_tree_depth)
    state = DrafterState(hidden_states[:, :5], next_ids[:, :5])
    with torch.no_grad():
        for known, length in ((5, 5), (5, 6), (6, 9), (9, 12)):  # each step appends what a verification accepted
            state.hidden_states = torch.cat([state.hidden_states, hidden_states[:, known:length]], 1)
            state.next_ids = torch.cat([state.next_ids, next_ids[:, known:length]], 1)
            draft_tree(drafter, tree, state, length)
            whole, (h, c) = drafter.fuse(hidden_states[:, :length], next_ids[:, :length])
            assert state.committed == length - k and state.fused.shape[1] == k
            torch.testing.assert_close(state.fused, whole[:, state.committed:])
            torch.testing.assert_close(state.lstm[0], h)
            torch.testing.assert_close(state.lstm[1], c)


def test_fused_is_contiguous_for_tree_branches(target):
    """A batch_first LSTM returns time-major memory for batch > 1 (one row per tree branch); bf16 CPU matmuls
    on that layout were 20-60x slower, so `fuse` hands the decoder contiguous rows."""
    drafter = new_drafter(target, 2)
    hidden_states = torch.randn(4, 2, drafter.config.hidden_size)
    with torch.no_grad():
        fused, _ = drafter.fuse(hidden_states, torch.zeros(4, 2, dtype=torch.long))
    assert fused.shape == (4, 2, drafter.config.hidden_size) and fused.is_contiguous()
