"""CSGD: alignment, glancing on hand-built batches, noise and λ, the loss by hand, real steps and pass 1 on a tiny
drafter (checked against the decode loop)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from falcon.csgd import (
    CSGDConfig,
    add_uniform_noise,
    align_targets,
    csgd_eval_metrics,
    csgd_loss,
    csgd_step,
    glance_ratio,
    to_draft_ids,
    top1_by_block_offset,
)
from falcon.drafter import Drafter, DrafterConfig, build_draft_vocab
from falcon.drafting import DrafterState, draft_tree
from falcon.glancing import glance_positions, glance_runs_wanted, glanced_inputs
from falcon.passes import lstm_states_every, predicted_block_pass, teacher_forced_pass
from falcon.tree import TreeConfig, build_tree

VOCAB = 300


# -- alignment -----------------------------------------------------------------------------------------------
def test_align_targets_hand_example():
    k, length, hidden = 2, 8, 3
    # Row 0: a full window; row 1: 5 real tokens then right padding (loss_mask 0 there).
    hidden_states = torch.arange(length, dtype=torch.float32)[None, :, None].expand(2, length, hidden).clone()
    hidden_states[1] += 0.5
    input_ids = torch.tensor([[100 + i for i in range(length)], [200, 201, 202, 203, 204, 0, 0, 0]])
    loss_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 1], [0, 1, 1, 1, 1, 0, 0, 0]])

    out = align_targets(hidden_states, input_ids, loss_mask, k)

    assert out["input_features"].shape == (2, 7, hidden)
    assert torch.equal(out["input_features"][0, :, 0], torch.arange(7.0))  # f_q
    assert torch.equal(out["next_ids"][0], torch.tensor([101, 102, 103, 104, 105, 106, 107]))  # x_{q+1}
    # Position q has loss iff q + 3 <= 7 and m_{q+3}: row 0 -> m3..m7 = 1 1 1 0 1, the last k positions none.
    assert out["position_mask"].tolist() == [
        [True, True, True, False, True, False, False],
        [True, True, False, False, False, False, False],  # m3 m4 = 1, m5.. = padding
    ]
    assert out["target_ids"].tolist() == [[103, 104, 105, 0, 107, 0, 0], [203, 204, 0, 0, 0, 0, 0]]
    # f_{q+k} where masked, 0 elsewhere.
    assert out["target_features"][0, :, 0].tolist() == [2.0, 3.0, 4.0, 0.0, 6.0, 0.0, 0.0]
    assert out["target_features"][1, :, 0].tolist() == [2.5, 3.5, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_align_targets_rejects_bad_shapes():
    with pytest.raises(ValueError, match="loss_mask"):
        align_targets(torch.zeros(1, 6, 4), torch.zeros(1, 6, dtype=torch.long), torch.zeros(1, 5), 2)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        align_targets(torch.zeros(1, 1, 4), torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1), 2)


def test_window_shorter_than_block_has_no_loss_positions():
    out = align_targets(torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3), 2)
    assert out["position_mask"].shape == (1, 2) and not out["position_mask"].any()


# -- glancing ------------------------------------------------------------------------------------------------
def _glance_case():
    """Three rows, S = 16, k = 2 (8 blocks), different loss masks and Hamming distances."""
    position_mask = torch.zeros(3, 16, dtype=torch.bool)
    position_mask[0, :14] = True  # block starts 0, 2, .., 12 are loss positions: 7 candidates
    position_mask[1, 3:9] = True  # starts 4, 6, 8: 3 candidates (3 is a block's last position)
    position_mask[2, 5] = True  # a block's last position only: no candidate
    hamming = torch.tensor([11, 4, 1])
    return hamming, position_mask


def _runs(glanced_row: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """(start, length) of each glanced run of a (S,) row, checking a run never crosses a block."""
    runs, q = [], 0
    while q < glanced_row.numel():
        if glanced_row[q]:
            start = q
            while q < glanced_row.numel() and glanced_row[q] and (q == start or q % k):
                q += 1
            runs.append((start, q - start))
        else:
            q += 1
    return runs


def test_glance_counts_follow_lambda_d_per_row():
    # N = floor(λ·d): k = 2 glances N positions, k > 2 N // k runs; floor despite floating-point error.
    hamming = torch.tensor([11, 4, 1, 0])
    assert glance_runs_wanted(hamming, 0.5, 2).tolist() == [5, 2, 0, 0]
    assert glance_runs_wanted(hamming, 0.5, 3).tolist() == [1, 0, 0, 0]
    assert glance_runs_wanted(torch.tensor([100]), 0.29, 2).tolist() == [29]  # 0.29·100 = 28.999999999999996
    with pytest.raises(ValueError, match="ratio"):
        glance_runs_wanted(hamming, -0.1, 2)


def test_glance_positions_k2_block_starts_and_counts():
    hamming, position_mask = _glance_case()
    for seed in range(20):
        glanced = glance_positions(hamming, position_mask, 2, 0.5, torch.Generator().manual_seed(seed))
        assert not (glanced & ~position_mask).any()  # loss positions only
        assert not glanced[:, 1::2].any()  # k = 2: block starts only, never a block's last position
        # min(floor(0.5·d), candidates) per row: 11 -> 5 of 7, 4 -> 2 of 3, 1 -> 0.
        assert glanced.sum(-1).tolist() == [5, 2, 0]
    everything = glance_positions(hamming, position_mask, 2, 10.0, torch.Generator().manual_seed(0))
    assert everything.sum(-1).tolist() == [7, 3, 0]  # more wanted than candidates: all of them
    assert not glance_positions(hamming, position_mask, 2, 0.0).any()


def test_glance_positions_k4_runs_from_block_starts():
    k, length = 4, 24  # 6 blocks
    position_mask = torch.zeros(2, length, dtype=torch.bool)
    position_mask[0, :20] = True  # blocks 0..4 whole
    position_mask[1, 4:10] = True  # block 1 whole, block 2 only its first two positions
    hamming = torch.tensor([20, 6])
    lengths_seen = set()
    for seed in range(40):
        glanced = glance_positions(hamming, position_mask, k, 0.6, torch.Generator().manual_seed(seed))
        assert not (glanced & ~position_mask).any() and not glanced[:, k - 1::k].any()
        row0, row1 = _runs(glanced[0], k), _runs(glanced[1], k)
        assert len(row0) == 12 // k and len(row1) == 3 // k  # floor(0.6·20) = 12 -> 3 runs; floor(3.6) -> 0
        for start, run in row0:
            assert start % k == 0 and 1 <= run <= k - 1
            lengths_seen.add(run)
        assert row1 == []
    assert lengths_seen == {1, 2, 3}  # run lengths drawn over 1..k-1
    # Row 1 with every candidate wanted: a run never goes past the block's loss positions (block 2 has two).
    glanced = glance_positions(torch.tensor([0, 100]), position_mask, k, 1.0, torch.Generator().manual_seed(0))
    assert all(start in (4, 8) for start, _ in _runs(glanced[1], k)) and not glanced[1, 10:].any()


def test_glance_run_stops_at_the_first_position_without_loss():
    position_mask = torch.tensor([[True, False, True, True, True, True, True, False]])  # k = 4: 2 blocks
    for seed in range(10):
        glanced = glance_positions(torch.tensor([100]), position_mask, 4, 1.0, torch.Generator().manual_seed(seed))
        assert glanced[0, :4].tolist() == [True, False, False, False]  # position 1 has no loss: run of 1
        assert glanced[0, 4] and not glanced[0, 7]


def test_block_size_one_glances_nothing():
    position_mask = torch.ones(2, 8, dtype=torch.bool)
    assert not glance_positions(torch.tensor([8, 8]), position_mask, 1, 1.0).any()


def test_glance_rows_are_independent():
    """A row's glanced positions depend on its own mask and d only, not on the other rows of the batch."""
    hamming, position_mask = _glance_case()
    reference = glance_positions(hamming, position_mask, 2, 0.5, torch.Generator().manual_seed(3))
    other_rows = position_mask.clone()
    other_rows[1:] = ~other_rows[1:]
    changed = glance_positions(torch.tensor([11, 9, 2]), other_rows, 2, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(reference[0], changed[0])


def test_glanced_inputs_are_the_answers_and_the_rest_teacher_forced():
    batch, length, hidden = 2, 8, 3
    features = torch.arange(batch * length * hidden, dtype=torch.float32).view(batch, length, hidden)
    answers = -1 - features
    next_ids = torch.arange(batch * length).view(batch, length)
    answer_ids = 1000 + next_ids
    glanced = torch.zeros(batch, length, dtype=torch.bool)
    glanced[0, 4] = True
    glanced[1, [0, 2, 6]] = True

    second_features, second_ids = glanced_inputs(features, next_ids, answers, answer_ids, glanced)

    assert torch.equal(second_features[glanced], answers[glanced])
    assert torch.equal(second_ids[glanced], answer_ids[glanced])
    assert torch.equal(second_features[~glanced], features[~glanced])
    assert torch.equal(second_ids[~glanced], next_ids[~glanced])


# -- noise and schedule --------------------------------------------------------------------------------------
def test_uniform_noise_bounds_and_scaling():
    features = torch.zeros(2, 256, 16)
    noise = add_uniform_noise(features, CSGDConfig(), torch.Generator().manual_seed(0))
    assert noise.abs().max() <= 0.1 and noise.abs().max() > 0.099 and abs(noise.mean()) < 0.005
    assert (noise > 0).any() and (noise < 0).any()
    seq_len_scaling = CSGDConfig(noise_scaling="seq_len")
    scaled = add_uniform_noise(features, seq_len_scaling, torch.Generator().manual_seed(0))
    assert torch.allclose(scaled, noise * 2)  # 512 / 256, same draw
    long_features = torch.zeros(1, 1024, 16)
    scaled = add_uniform_noise(long_features, seq_len_scaling)
    assert scaled.abs().max() <= 0.05 and scaled.abs().max() > 0.049
    assert torch.equal(add_uniform_noise(features, CSGDConfig(noise_bound=0.0)), features)
    bf16 = add_uniform_noise(features.bfloat16(), CSGDConfig())
    assert bf16.dtype == torch.bfloat16


def test_config_validation():
    with pytest.raises(ValueError, match="noise_scaling"):
        CSGDConfig(noise_scaling="length")
    with pytest.raises(ValueError, match="kl_weight"):
        CSGDConfig(kl_weight=1.5)
    with pytest.raises(ValueError, match="teacher"):
        CSGDConfig(teacher="logits")
    with pytest.raises(ValueError, match="lambda_schedule"):
        CSGDConfig(lambda_schedule="linear")
    with pytest.raises(ValueError, match="final"):
        CSGDConfig(lambda_schedule="official", lambda_max=0.05)
    with pytest.raises(ValueError, match="pass1_start"):
        CSGDConfig(pass1_start=2.0)
    with pytest.raises(ValueError, match="pass1_weight"):
        CSGDConfig(pass1_weight=-1.0)


def test_glance_ratio_schedules():
    paper = CSGDConfig()
    assert glance_ratio(0.0, paper) == pytest.approx(0.4)
    assert glance_ratio(0.5, paper) == pytest.approx(0.2)
    assert glance_ratio(1.0, paper) == pytest.approx(0.0)
    official = CSGDConfig(lambda_schedule="official")  # 0.35·(1 - p) + 0.1
    assert glance_ratio(0.0, official) == pytest.approx(0.45)
    assert glance_ratio(0.95, official) == pytest.approx(0.1175)
    assert glance_ratio(1.0, official) == pytest.approx(0.1)
    assert glance_ratio(0.5, CSGDConfig(lambda_max=0.8)) == pytest.approx(0.4)
    assert glance_ratio(0.5, CSGDConfig(lambda_schedule="official", lambda_max=0.3)) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="progress"):
        glance_ratio(1.05, paper)  # an epoch count, not a fraction


# -- loss by hand --------------------------------------------------------------------------------------------
def _softmax(row):
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


def _smooth_l1(a, b, beta=1.0):
    diff = abs(a - b)
    return 0.5 * diff * diff / beta if diff < beta else diff - 0.5 * beta


PRED = [[0.2, -1.5, 0.0, 3.0], [9.0, 9.0, 9.0, 9.0], [1.0, 0.4, -0.3, 0.0]]
TARGET = [[0.0, 0.5, 0.1, 1.0], [0.0, 0.0, 0.0, 0.0], [1.5, 0.0, 0.2, -2.5]]
MASK = [True, False, True]


def _loss_inputs(drafter_logits):
    teacher = [[1.0, 0.5, -0.2, 2.0, 0.0], [0.0] * 5, [0.3, 2.5, 0.1, -1.0, 0.7]]
    # Position 1 is outside the mask and holds NaN, as garbage padding would: it must not leak.
    pred = torch.tensor(PRED)[None]
    pred[0, 1, 0] = math.nan
    return dict(
        pred_features=pred,
        target_features=torch.tensor(TARGET)[None],
        drafter_logits=torch.tensor(drafter_logits)[None],
        teacher_logits=torch.tensor(teacher)[None],
        target_ids=torch.tensor([[3, 0, 4]]),
        position_mask=torch.tensor([MASK]),
    ), teacher


def test_csgd_loss_matches_hand_computation():
    drafter_logits = [[0.1, 0.2, 0.3, 1.9, -0.5], [math.nan] * 5, [0.0, 0.3, 1.2, 0.4, 0.2]]
    inputs, teacher = _loss_inputs(drafter_logits)
    config = CSGDConfig()
    out = csgd_loss(**inputs, config=config)

    rows = [0, 2]
    reg = sum(_smooth_l1(PRED[q][i], TARGET[q][i]) for q in rows for i in range(4)) / (2 * 4)
    kl = ce = 0.0
    for q, label in zip(rows, [3, 4], strict=True):
        p, r = _softmax(teacher[q]), _softmax(drafter_logits[q])
        kl += sum(pi * (math.log(pi) - math.log(ri)) for pi, ri in zip(p, r, strict=True))
        ce += -math.log(r[label])
    kl, ce = kl / 2, ce / 2
    dist = 0.9 * kl + 0.1 * ce
    assert out["reg"].item() == pytest.approx(reg, rel=1e-5)
    assert out["kl"].item() == pytest.approx(kl, rel=1e-5)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert out["dist"].item() == pytest.approx(dist, rel=1e-5)
    assert out["loss"].item() == pytest.approx(reg + 0.1 * dist, rel=1e-5)
    # argmax: position 0 drafter 3 = teacher 3; position 2 drafter 2 != teacher 1.
    assert out["correct"].tolist() == [[True, False, False]]
    assert out["top1"].item() == pytest.approx(0.5)


def test_csgd_loss_reduced_vocab_matches_hand_computation():
    draft_to_target = torch.tensor([0, 1, 3])  # target ids 2 and 4 are outside the draft vocabulary
    drafter_logits = [[0.1, 0.2, 1.9], [math.nan] * 3, [0.3, 1.2, 0.4]]
    inputs, teacher = _loss_inputs(drafter_logits)
    out = csgd_loss(**inputs, config=CSGDConfig(kl_weight=0.7), draft_to_target=draft_to_target)

    kl = 0.0
    for q in (0, 2):
        p = _softmax([teacher[q][t] for t in (0, 1, 3)])  # teacher renormalised over the draft vocabulary
        r = _softmax(drafter_logits[q])
        kl += sum(pi * (math.log(pi) - math.log(ri)) for pi, ri in zip(p, r, strict=True))
    kl /= 2
    ce = -math.log(_softmax(drafter_logits[0])[2])  # label 3 -> draft id 2; label 4 is not in the draft vocab
    assert out["kl"].item() == pytest.approx(kl, rel=1e-5)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert out["dist"].item() == pytest.approx(0.7 * kl + 0.3 * ce, rel=1e-5)
    # The drafter's argmax maps to target 3 (teacher: 3) at position 0, target 1 (teacher: 1) at position 2.
    assert out["correct"].tolist() == [[True, False, True]]


def test_csgd_loss_sparse_teacher_matches_hand_computation():
    """A top-k teacher: KL over its K tokens, renormalised over those the draft vocabulary holds."""
    draft_to_target = torch.tensor([0, 1, 3])
    drafter_logits = [[0.1, 0.2, 1.9], [math.nan] * 3, [0.3, 1.2, 0.4]]
    inputs, _ = _loss_inputs(drafter_logits)
    # Position 0: top-3 target ids 3, 2, 0 (2 is outside the draft vocabulary); position 2: ids 4, 1, 3.
    teacher_ids = torch.tensor([[[3, 2, 0], [0, 1, 2], [4, 1, 3]]])
    teacher_values = torch.tensor([[[2.0, 1.5, 0.5], [0.0, 0.0, 0.0], [3.0, 1.0, -1.0]]])
    out = csgd_loss(**dict(inputs, teacher_logits=teacher_values), config=CSGDConfig(kl_weight=0.5),
                    draft_to_target=draft_to_target, teacher_ids=teacher_ids)

    kl = 0.0
    for q, kept, draft_ids in ((0, [2.0, 0.5], [2, 0]), (2, [1.0, -1.0], [1, 2])):
        p, r = _softmax(kept), _softmax(drafter_logits[q])
        kl += sum(pi * (math.log(pi) - math.log(r[d])) for pi, d in zip(p, draft_ids, strict=True))
    kl /= 2
    ce = -math.log(_softmax(drafter_logits[0])[2])
    assert out["kl"].item() == pytest.approx(kl, rel=1e-5)
    assert out["dist"].item() == pytest.approx(0.5 * kl + 0.5 * ce, rel=1e-5)
    # teacher argmax: target 3 at position 0 (drafter: 3), target 4 at position 2 (drafter: 1).
    assert out["correct"].tolist() == [[True, False, False]]


def test_sparse_teacher_with_nothing_emittable_has_zero_kl():
    draft_to_target = torch.tensor([0, 1])
    logits = torch.tensor([[0.5, -0.5]], requires_grad=True)
    out = csgd_loss(torch.zeros(1, 2), torch.zeros(1, 2), logits, torch.tensor([[1.0, 0.0]]), torch.tensor([5]),
                    torch.tensor([True]), CSGDConfig(), draft_to_target, teacher_ids=torch.tensor([[5, 6]]))
    assert out["kl"].item() == 0.0 and out["ce"].item() == 0.0
    out["loss"].backward()
    assert torch.isfinite(logits.grad).all()


def test_inverse_draft_map_and_offsets():
    assert to_draft_ids(torch.tensor([1, 4]), torch.arange(6)).tolist() == [-100, 0, -100, -100, 1, -100]
    correct = torch.tensor([[True, True, False, True, True, False]])
    mask = torch.tensor([[True, True, True, True, False, True]])
    correct_at, count_at = top1_by_block_offset(correct, mask, 2)
    assert correct_at.tolist() == [1, 2] and count_at.tolist() == [2, 3]


# -- steps on a real tiny drafter ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def _drafter(target, **overrides) -> Drafter:
    torch.manual_seed(1)
    drafter = Drafter(DrafterConfig.from_target(target.config, **{"block_size": 2, **overrides}))
    if drafter.draft_to_target is not None:
        counts = torch.arange(VOCAB).flip(0).float()  # the lowest ids are the most frequent
        drafter.set_draft_vocab(build_draft_vocab(counts, drafter.config.draft_vocab_size))
    return drafter.attach_target(target.get_input_embeddings(), target.get_output_embeddings())


@pytest.fixture(scope="module")
def padded_batch(target):
    """Three right-padded windows of 24/18/13 real tokens: prompt (no loss) then assistant tokens."""
    lengths, prompt, width = [24, 18, 13], 5, 24
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.zeros(3, width, dtype=torch.long)
    loss_mask = torch.zeros(3, width, dtype=torch.long)
    hidden_states = torch.zeros(3, width, 64)
    with torch.no_grad():
        for row, length in enumerate(lengths):
            ids = torch.randint(0, VOCAB, (1, length), generator=generator)
            input_ids[row, :length] = ids[0]
            loss_mask[row, prompt:length] = 1
            hidden_states[row, :length] = target.model(ids).last_hidden_state[0]
    return dict(hidden_states=hidden_states, input_ids=input_ids, loss_mask=loss_mask, lengths=lengths)


def _batch(padded_batch):
    return {key: padded_batch[key] for key in ("hidden_states", "input_ids", "loss_mask")}


def test_csgd_step_loss_grads_and_metrics(target, padded_batch):
    drafter = _drafter(target)
    head = target.lm_head.weight
    out = csgd_step(drafter, _batch(padded_batch), CSGDConfig(), progress=0.0, lm_head_weight=head,
                    generator=torch.Generator().manual_seed(0))
    assert out["loss"].requires_grad and torch.isfinite(out["loss"])
    out["loss"].backward()
    for name, param in drafter.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    assert all(param.grad is None for param in target.parameters())  # shared embedding / head stay frozen
    assert not drafter.embed_weight.requires_grad and not drafter.head_weight.requires_grad

    # Loss positions: 5 <= q + 3 <= length - 1 (5-token prompt), i.e. length - 5 per window.
    expected_positions = sum(length - 1 - 2 - 2 for length in padded_batch["lengths"])
    assert out["num_positions"].item() == expected_positions
    assert out["top1_count_at"].sum().item() == expected_positions and out["acc_at"].shape == (2,)
    assert not out["reg"].requires_grad and not out["kl"].requires_grad
    assert out["glance_ratio"].item() == pytest.approx(0.4)
    assert 0 < out["hamming"].item() <= expected_positions / 3
    # floor(0.4·d) block starts per window, each a loss position.
    assert 0 < out["num_glanced"].item() <= 0.4 * out["hamming"].item()
    assert 0 < out["glanced_fraction"].item() < 0.5


def test_csgd_step_is_deterministic_with_a_generator(target, padded_batch):
    drafter = _drafter(target)
    losses = [
        csgd_step(drafter, _batch(padded_batch), CSGDConfig(), 0.25, target.lm_head.weight,
                  torch.Generator().manual_seed(5))["loss"].item()
        for _ in range(2)
    ]
    assert losses[0] == losses[1]


def test_padding_does_not_leak(target, padded_batch):
    """Teacher-forced metrics of a padded batch equal those of each window alone, whatever padding holds."""
    drafter = _drafter(target)
    config, head = CSGDConfig(), target.lm_head.weight
    batch = _batch(padded_batch)
    batch["hidden_states"] = batch["hidden_states"].clone()
    for row, length in enumerate(padded_batch["lengths"]):
        batch["hidden_states"][row, length:] = 1e4  # garbage padding
    together = csgd_eval_metrics(drafter, batch, config, head)
    reg_sum = kl_sum = correct = 0.0
    for row, length in enumerate(padded_batch["lengths"]):
        alone = csgd_eval_metrics(drafter, {key: value[row:row + 1, :length] for key, value in batch.items()},
                                  config, head)
        n = alone["num_positions"].item()
        reg_sum += alone["reg"].item() * n
        kl_sum += alone["kl"].item() * n
        correct += alone["top1_correct_at"].sum().item()
    n = together["num_positions"].item()
    assert together["reg"].item() * n == pytest.approx(reg_sum, rel=1e-4)
    assert together["kl"].item() * n == pytest.approx(kl_sum, rel=1e-4)
    assert together["top1_correct_at"].sum().item() == correct


def test_training_steps_reduce_the_loss(target, padded_batch):
    drafter = _drafter(target)
    optimizer = torch.optim.Adam(drafter.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    head = target.lm_head.weight
    losses = []
    for step in range(25):
        out = csgd_step(drafter, _batch(padded_batch), CSGDConfig(), progress=step / 25,
                        lm_head_weight=head, generator=generator)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0]
    after = csgd_eval_metrics(drafter, _batch(padded_batch), CSGDConfig(), head)
    before = csgd_eval_metrics(_drafter(target), _batch(padded_batch), CSGDConfig(), head)
    assert after["loss"] < before["loss"] and not after["loss"].requires_grad


def test_teacher_forced_ablation_and_reduced_vocab(target, padded_batch):
    drafter = _drafter(target)
    out = csgd_step(drafter, _batch(padded_batch), CSGDConfig(glancing=False), 0.0, target.lm_head.weight)
    assert torch.isfinite(out["loss"]) and "hamming" not in out
    out["loss"].backward()
    assert all(param.grad is not None for param in drafter.parameters())

    reduced = _drafter(target, draft_vocab_size=64)
    assert reduced.head_weight.shape == (64, 64)
    out = csgd_step(reduced, _batch(padded_batch), CSGDConfig(), 0.0, target.lm_head.weight,
                    torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["ce"])
    out["loss"].backward()


def _with_topk(target, batch, k):
    """The batch plus the target's top-k logits per token, as the feature store keeps them."""
    with torch.no_grad():
        values, indices = target.lm_head(batch["hidden_states"]).topk(k, dim=-1)
    return dict(batch, topk_values=values, topk_indices=indices.int())


@pytest.mark.parametrize("glancing", [False, True])
def test_full_vocabulary_topk_teacher_equals_the_lm_head_teacher(target, padded_batch, glancing):
    batch = _with_topk(target, _batch(padded_batch), VOCAB)
    steps = {}
    for teacher in ("topk", "lm_head"):
        drafter = _drafter(target, draft_vocab_size=64)
        config = CSGDConfig(glancing=glancing, teacher=teacher)
        steps[teacher] = csgd_step(drafter, batch, config, 0.0, target.lm_head.weight,
                                   torch.Generator().manual_seed(0))
    for key in ("loss", "kl", "ce", "top1"):
        assert steps["topk"][key].item() == pytest.approx(steps["lm_head"][key].item(), rel=1e-5), key


def test_topk_teacher_needs_no_lm_head_and_is_chosen_automatically(target, padded_batch):
    batch = _with_topk(target, _batch(padded_batch), 8)
    drafter = _drafter(target)
    auto = csgd_eval_metrics(drafter, batch, CSGDConfig())  # no lm_head_weight: the stored top-k is the teacher
    topk = csgd_eval_metrics(drafter, batch, CSGDConfig(teacher="topk"), target.lm_head.weight)
    head = csgd_eval_metrics(drafter, batch, CSGDConfig(teacher="lm_head"), target.lm_head.weight)
    assert auto["kl"].item() == topk["kl"].item() != pytest.approx(head["kl"].item(), rel=1e-3)
    assert auto["top1"].item() == head["top1"].item()  # same argmax either way
    with pytest.raises(ValueError, match="topk 0"):
        csgd_step(drafter, _batch(padded_batch), CSGDConfig(teacher="topk"), 0.0, target.lm_head.weight)
    with pytest.raises(ValueError, match="lm_head_weight"):
        csgd_step(drafter, _batch(padded_batch), CSGDConfig(), 0.0)


def test_step_rejects_bad_batches(target, padded_batch):
    drafter = _drafter(target)
    batch = _batch(padded_batch)
    with pytest.raises(ValueError, match="loss_mask"):
        csgd_step(drafter, {k: v for k, v in batch.items() if k != "loss_mask"}, CSGDConfig(), 0.0,
                  target.lm_head.weight)
    with pytest.raises(ValueError, match="full head"):
        csgd_step(drafter, batch, CSGDConfig(), 0.0, target.lm_head.weight[:64])
    with pytest.raises(ValueError, match="hidden size"):
        csgd_step(drafter, dict(batch, hidden_states=batch["hidden_states"][..., :32]), CSGDConfig(), 0.0,
                  target.lm_head.weight)


def test_batch_without_loss_positions_gives_zero_loss(target, padded_batch):
    drafter = _drafter(target)
    batch = dict(_batch(padded_batch), loss_mask=torch.zeros_like(padded_batch["loss_mask"]))
    out = csgd_step(drafter, batch, CSGDConfig(), 0.0, target.lm_head.weight)
    assert out["loss"].item() == 0.0 and out["num_positions"].item() == 0
    out["loss"].backward()
    assert all(param.grad is not None and not param.grad.any() for param in drafter.parameters())


def test_bf16_drafter_trains_with_float32_loss(target, padded_batch):
    drafter = _drafter(target).to(torch.bfloat16)
    out = csgd_step(drafter, _batch(padded_batch), CSGDConfig(), 0.0, target.lm_head.weight,
                    torch.Generator().manual_seed(0))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    for param in drafter.parameters():
        assert param.grad is not None and param.grad.dtype == torch.bfloat16


def test_draft_vocabulary_map_must_be_sorted(target):
    drafter = Drafter(DrafterConfig.from_target(target.config, block_size=2, draft_vocab_size=4))
    with pytest.raises(ValueError, match="strictly increasing"):
        drafter.set_draft_vocab(torch.tensor([3, 1, 5, 7]))
    drafter.set_draft_vocab(torch.tensor([1, 3, 5, 7]))
    assert to_draft_ids(drafter.draft_to_target, torch.tensor([7, 2, 1])).tolist() == [3, -100, 0]


# -- the glancing step on a real tiny drafter ----------------------------------------------------------------
def _lm_head_loss(drafter, target, features, aligned, mask, config):
    """csgd_loss of predicted features (B, S, h) at `mask` with the LM-head teacher, computed directly."""
    pred = features[mask]
    teacher_logits = target.lm_head(aligned["target_features"][mask])
    every_row = torch.ones(pred.shape[0], dtype=torch.bool)
    return csgd_loss(pred, aligned["target_features"][mask], drafter.logits(pred), teacher_logits,
                     aligned["target_ids"][mask], every_row, config)["loss"]


def test_no_glance_is_teacher_forcing(target, padded_batch):
    """λ = 0: the second pass reads exactly the teacher-forced inputs (never the drafter's own outputs)."""
    drafter, head = _drafter(target), target.lm_head.weight
    no_glance = CSGDConfig(noise_bound=0.0, lambda_max=0.0)
    out = csgd_step(drafter, _batch(padded_batch), no_glance, 0.0, head, torch.Generator().manual_seed(0))
    teacher_forced = csgd_eval_metrics(drafter, _batch(padded_batch), no_glance, head)["loss"]
    assert out["hamming"] > 0 and out["num_glanced"] == 0
    assert out["loss"].item() == pytest.approx(teacher_forced.item(), rel=1e-6)


@pytest.mark.parametrize("glance_in_loss", [True, False])
def test_second_pass_reads_the_answers_at_the_glanced_positions(target, padded_batch, glance_in_loss):
    """k = 2 with every candidate glanced (no randomness left): the step's loss is the drafter's on the
    glanced inputs, over every loss position or only the unglanced ones."""
    drafter, head = _drafter(target), target.lm_head.weight
    config = CSGDConfig(noise_bound=0.0, lambda_max=100.0, glance_in_loss=glance_in_loss)
    out = csgd_step(drafter, _batch(padded_batch), config, 0.0, head, torch.Generator().manual_seed(0))

    aligned = align_targets(padded_batch["hidden_states"], padded_batch["input_ids"], padded_batch["loss_mask"], 2)
    mask = aligned["position_mask"]
    glanced = mask.clone()
    glanced[:, 1::2] = False  # every loss position at a block start
    inputs = glanced_inputs(aligned["input_features"], aligned["next_ids"], aligned["target_features"],
                            aligned["target_ids"], glanced)
    scored = mask if glance_in_loss else mask & ~glanced
    with torch.no_grad():
        expected = _lm_head_loss(drafter, target, drafter(*inputs), aligned, scored, config)
    assert out["num_glanced"].item() == pytest.approx(glanced.sum().item() / 3)
    assert out["num_positions"].item() == scored.sum().item()
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_rows_loss_terms_do_not_depend_on_the_other_rows(target, padded_batch):
    """Per row: the glancing step's summed loss terms over a batch are the sums over its rows alone."""
    drafter, head = _drafter(target), target.lm_head.weight
    config = CSGDConfig(noise_bound=0.0, lambda_max=100.0)  # all candidates: the same glances alone or batched
    batch = _batch(padded_batch)
    together = csgd_step(drafter, batch, config, 0.0, head, torch.Generator().manual_seed(0))
    reg_sum = hamming_sum = 0.0
    for row, length in enumerate(padded_batch["lengths"]):
        alone = csgd_step(drafter, {key: value[row:row + 1, :length] for key, value in batch.items()}, config,
                          0.0, head, torch.Generator().manual_seed(0))
        reg_sum += alone["reg"].item() * alone["num_positions"].item()
        hamming_sum += alone["hamming"].item()
    assert together["reg"].item() * together["num_positions"].item() == pytest.approx(reg_sum, rel=1e-4)
    assert together["hamming"].item() * 3 == pytest.approx(hamming_sum)


# -- pass 1: the drafter's own predictions as decoding feeds them --------------------------------------------
def _inference_passes(drafter, hidden_states, input_ids, prefix, k):
    """What decoding's drafter passes 0 and 1 output after a true prefix of `prefix` positions: (features of
    each pass (k, h), tokens drafted at depths 1..2k), recorded from falcon.drafting.draft_tree."""
    recorded = []
    hook = drafter.norm.register_forward_hook(lambda module, args, output: recorded.append(args[0][0].clone()))
    try:
        state = DrafterState(hidden_states[None, :prefix], input_ids[None, 1:prefix + 1])
        tree = build_tree(TreeConfig.chain(2 * k), k)
        tokens = draft_tree(drafter, tree, state, prefix)
    finally:
        hook.remove()
    return recorded, tokens[1:]


@pytest.mark.parametrize("layers,every,length", [(2, 2, 9), (1, 3, 12), (2, 1, 5), (2, 4, 3)])
def test_lstm_states_every_equal_nn_lstm_run_block_by_block(layers, every, length):
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(6, 5, num_layers=layers, batch_first=True)
    inputs = torch.randn(3, length, 6)
    h_at, c_at = lstm_states_every(lstm, inputs, every)
    expected, state = [], None
    for start in range(0, length, every):
        _, state = lstm(inputs[:, start:start + every], state)
        expected.append(state)
    expected = expected[:-1]  # the state after the last block starts no block
    assert h_at.shape == c_at.shape == (layers, 3, len(expected), 5)
    for index, (h, c) in enumerate(expected):
        assert torch.allclose(h_at[:, :, index], h, atol=1e-6) and torch.allclose(c_at[:, :, index], c, atol=1e-6)


@pytest.mark.parametrize("block_size,num_layers,draft_vocab_size", [(2, 1, None), (3, 2, None), (2, 1, 64)])
def test_pass1_equals_the_decode_loops_second_pass(target, padded_batch, block_size, num_layers, draft_vocab_size):
    """fp32: pass 0 at block c and pass 1 at block c+1 equal decoding's two drafter passes after a true
    prefix of (c+1)·k positions, for every block of every row of a padded batch."""
    drafter = _drafter(target, block_size=block_size, num_layers=num_layers, draft_vocab_size=draft_vocab_size).eval()
    k, batch = block_size, _batch(padded_batch)
    aligned = align_targets(batch["hidden_states"], batch["input_ids"], batch["loss_mask"], k)
    with torch.no_grad():
        pass0 = teacher_forced_pass(drafter, aligned["input_features"], aligned["next_ids"])
        pass1 = predicted_block_pass(drafter, pass0)
        assert torch.allclose(pass0.features, drafter(aligned["input_features"], aligned["next_ids"]), atol=1e-5)
        compared = 0
        for row, length in enumerate(padded_batch["lengths"]):
            for prefix in range(k, length - 2 * k + 1, k):  # both predicted blocks inside the real tokens
                (inference0, inference1), tokens = _inference_passes(
                    drafter, batch["hidden_states"][row], batch["input_ids"][row], prefix, k)
                assert torch.allclose(pass0.features[row, prefix - k:prefix], inference0, atol=1e-5)
                assert torch.allclose(pass1[row, prefix:prefix + k], inference1, atol=1e-5)
                own_tokens = drafter.to_target_ids(drafter.logits(pass1[row, prefix:prefix + k]).argmax(-1))
                assert torch.equal(tokens[k:], own_tokens)
                compared += 1
    assert compared >= 3 * 2


def test_pass1_reads_its_own_predictions_not_the_truth(target, padded_batch):
    """Pass 1 at block c+1 changes when pass 0's output for block c does, and not when the true inputs of
    block c+1 do (it never reads them)."""
    drafter = _drafter(target).eval()
    aligned = align_targets(padded_batch["hidden_states"], padded_batch["input_ids"], padded_batch["loss_mask"], 2)
    features, next_ids = aligned["input_features"], aligned["next_ids"]
    with torch.no_grad():
        pass0 = teacher_forced_pass(drafter, features, next_ids)
        reference = predicted_block_pass(drafter, pass0)
        changed_truth = features.clone()
        changed_truth[:, 6:8] += 1.0  # block 3's true inputs: pass 1 of block 3 reads predictions instead
        pass0_changed = teacher_forced_pass(drafter, changed_truth, next_ids)
        assert torch.allclose(predicted_block_pass(drafter, pass0_changed)[:, 6:8], reference[:, 6:8], atol=1e-6)
        pass0.features[:, 2:4] += 1.0  # pass 0's output for block 1 feeds pass 1 of block 2
        moved = predicted_block_pass(drafter, pass0)
    assert not torch.allclose(moved[:, 4:6], reference[:, 4:6], atol=1e-3)
    assert torch.equal(moved[:, 6:], reference[:, 6:])


def test_pass1_objective_in_the_step(target, padded_batch):
    drafter, head = _drafter(target), target.lm_head.weight
    batch = _batch(padded_batch)
    plain = CSGDConfig(glancing=False)
    with_pass1 = CSGDConfig(glancing=False, pass1_weight=0.5, pass1_start=0.5)
    before_start = csgd_step(drafter, batch, with_pass1, 0.25, head, torch.Generator().manual_seed(0))
    assert "pass1_loss" not in before_start
    out = csgd_step(drafter, batch, with_pass1, 0.5, head, torch.Generator().manual_seed(0))
    alone = csgd_step(drafter, batch, plain, 0.5, head, torch.Generator().manual_seed(0))
    assert out["loss"].item() == pytest.approx(alone["loss"].item() + 0.5 * out["pass1_loss"].item(), rel=1e-5)
    assert 0 <= out["pass1_top1"].item() <= 1
    out["loss"].backward()
    for name, param in drafter.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # With glancing the no-grad first pass is pass 0; the sum still has the pass-1 term.
    glancing = csgd_step(drafter, batch, CSGDConfig(pass1_weight=1.0), 0.0, head, torch.Generator().manual_seed(0))
    assert glancing["loss"].requires_grad and glancing["pass1_loss"] > 0


def test_eval_metrics_cover_every_depth_of_two_passes(target, padded_batch):
    drafter = _drafter(target)
    batch = _batch(padded_batch)
    batch["loss_mask"] = torch.zeros_like(batch["loss_mask"])  # loss from each window's start
    for row, length in enumerate(padded_batch["lengths"]):
        batch["loss_mask"][row, :length] = 1
    metrics = csgd_eval_metrics(drafter, batch, CSGDConfig(), target.lm_head.weight)
    depths = [f"top1_depth_{d}" for d in range(1, 5)]
    assert all(key in metrics for key in depths) and "top1_depth_5" not in metrics
    assert torch.equal(metrics["top1_depth_correct"][:2], metrics["top1_correct_at"])
    count = metrics["top1_depth_count"]
    assert torch.equal(count[:2], metrics["top1_count_at"])
    # Pass 0 scores q + 3 <= length - 1; pass 1 the same positions after each window's first block (q >= 2).
    assert count[:2].sum().item() == sum(length - 3 for length in padded_batch["lengths"])
    assert count[2:].sum().item() == sum(length - 3 - 2 for length in padded_batch["lengths"])
    for depth, key in enumerate(depths):
        expected = metrics["top1_depth_correct"][depth] / count[depth]
        assert metrics[key].item() == pytest.approx(expected.item())
