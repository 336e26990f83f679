"""CSGD: alignment, glancing, second-pass inputs, noise, the loss by hand, real steps on a tiny drafter."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from falcon.csgd import (
    CSGDConfig,
    add_uniform_noise,
    align_targets,
    candidate_blocks,
    csgd_eval_metrics,
    csgd_loss,
    csgd_step,
    glance_ratio,
    glance_reveal_mask,
    second_pass_inputs,
    to_draft_ids,
    top1_by_block_offset,
)
from falcon.drafter import Drafter, DrafterConfig, build_draft_vocab

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
def _reveal_case():
    """Three rows, S = 16, k = 2 (8 blocks), different loss masks and Hamming distances."""
    position_mask = torch.zeros(3, 16, dtype=torch.bool)
    position_mask[0, :14] = True  # slots in blocks 0..6 -> candidate blocks 1..7
    position_mask[1, 2:6] = True  # slots in blocks 1, 2 -> candidates 2, 3
    position_mask[2, 5] = True  # block 2 -> candidate 3
    position_mask[2, 9] = True  # block 4 -> candidate 5
    wrong = torch.zeros(3, 16, dtype=torch.bool)
    wrong[0, :11] = True  # d = 11
    wrong[1, :] = True  # d = 4 (only masked positions count)
    wrong[2, 5] = True  # d = 1
    return wrong, position_mask


def test_reveal_counts_contiguity_and_candidates():
    wrong, position_mask = _reveal_case()
    k, ratio = 2, 0.5
    generator = torch.Generator().manual_seed(0)
    reveal, num_revealed = glance_reveal_mask(wrong, position_mask, k, ratio, generator)

    candidates = candidate_blocks(position_mask, k)
    assert candidates.tolist() == [
        [False, True, True, True, True, True, True, True],
        [False, False, True, True, False, False, False, False],
        [False, False, False, True, False, True, False, False],
    ]
    blocks = reveal.view(3, 8, k)
    assert torch.equal(blocks.all(-1), blocks.any(-1))  # whole aligned k-blocks only
    chosen = blocks.all(-1)
    assert not (chosen & ~candidates).any()  # never a block without a loss slot, never block 0
    for row, d in enumerate([11, 4, 1]):
        wanted = math.ceil(round(ratio * d) / k)  # d 11 -> N 6 -> 3, 4 -> 2 -> 1, 1 -> 0 (half to even)
        expected_blocks = min(wanted, int(candidates[row].sum()))
        assert int(chosen[row].sum()) == expected_blocks
        assert int(num_revealed[row]) == expected_blocks * k == int(reveal[row].sum())
    assert num_revealed.tolist() == [6, 2, 0]


def test_reveal_whole_candidates_when_the_quota_exceeds_them():
    wrong, position_mask = _reveal_case()
    reveal, num_revealed = glance_reveal_mask(wrong, position_mask, 2, 3.0, torch.Generator().manual_seed(1))
    # ratio 3 wants 17, 6 and 2 blocks, more than or as many as the 7, 2 and 2 candidates: all of them.
    assert torch.equal(reveal.view(3, 8, 2).all(-1), candidate_blocks(position_mask, 2))
    assert num_revealed.tolist() == [14, 4, 4]
    # At ratio 1 row 2 (d = 1) wants ceil(1/2) = 1 of its 2 candidate blocks.
    _, num_revealed = glance_reveal_mask(wrong, position_mask, 2, 1.0, torch.Generator().manual_seed(1))
    assert num_revealed.tolist() == [12, 4, 2]


def test_reveal_ratio_zero_reveals_nothing():
    wrong, position_mask = _reveal_case()
    reveal, num_revealed = glance_reveal_mask(wrong, position_mask, 2, 0.0)
    assert not reveal.any() and num_revealed.tolist() == [0, 0, 0]


def test_reveal_is_deterministic_and_draws_every_candidate():
    wrong, position_mask = _reveal_case()
    first = glance_reveal_mask(wrong, position_mask, 2, 0.5, torch.Generator().manual_seed(7))
    again = glance_reveal_mask(wrong, position_mask, 2, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    generator = torch.Generator().manual_seed(3)
    seen = torch.zeros(3, 8, dtype=torch.bool)
    for _ in range(50):
        seen |= glance_reveal_mask(wrong, position_mask, 2, 0.5, generator)[0].view(3, 8, 2).all(-1)
    # Rows 0 and 1 draw 3 of 7 and 1 of 2 candidates: over 50 draws every candidate comes up.
    assert torch.equal(seen[:2], candidate_blocks(position_mask, 2)[:2])


def test_reveal_partial_last_block():
    # S = 10, k = 3: blocks [0,3) [3,6) [6,9) [9]; every slot with loss up to S - k.
    position_mask = torch.zeros(1, 10, dtype=torch.bool)
    position_mask[0, :7] = True
    reveal, num_revealed = glance_reveal_mask(position_mask, position_mask, 3, 1.0)
    assert reveal[0].tolist() == [False] * 3 + [True] * 7  # blocks 1, 2 and the clipped block 3
    assert num_revealed.tolist() == [7]


# -- second-pass inputs --------------------------------------------------------------------------------------
def test_second_pass_inputs_shift_reveal_and_head():
    batch, length, hidden, k = 2, 8, 3, 2
    true_features = torch.arange(batch * length * hidden, dtype=torch.float32).view(batch, length, hidden)
    predicted_features = -1 - true_features
    true_ids = torch.arange(batch * length).view(batch, length)
    predicted_ids = 1000 + true_ids
    reveal = torch.zeros(batch, length, dtype=torch.bool)
    reveal[0, 4:6] = True
    reveal[1, 2:4] = True
    reveal[1, 6:8] = True

    features, ids = second_pass_inputs(true_features, true_ids, predicted_features, predicted_ids, reveal, k)

    for b in range(batch):
        for q in range(length):
            if q < k or reveal[b, q]:
                assert torch.equal(features[b, q], true_features[b, q]) and ids[b, q] == true_ids[b, q]
            else:
                assert torch.equal(features[b, q], predicted_features[b, q - k])
                assert ids[b, q] == predicted_ids[b, q - k]


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


def test_glance_ratio_schedule():
    paper = CSGDConfig()
    assert glance_ratio(0, 20, paper) == pytest.approx(0.4)
    assert glance_ratio(10, 20, paper) == pytest.approx(0.2)
    assert glance_ratio(20, 20, paper) == pytest.approx(0.0)
    official = CSGDConfig(lambda_max=0.35, lambda_min=0.1)
    assert glance_ratio(0, 20, official) == pytest.approx(0.45)
    assert glance_ratio(19, 20, official) == pytest.approx(0.1175)
    with pytest.raises(ValueError):
        glance_ratio(21, 20, paper)
    with pytest.raises(ValueError):
        glance_ratio(0, 0, paper)


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
    drafter = Drafter(DrafterConfig.from_target(target.config, block_size=2, **overrides))
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
    out = csgd_step(drafter, _batch(padded_batch), CSGDConfig(), epoch=0, num_epochs=4, lm_head_weight=head,
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
    assert 0 < out["revealed_fraction"].item() <= 1


def test_csgd_step_is_deterministic_with_a_generator(target, padded_batch):
    drafter = _drafter(target)
    losses = [
        csgd_step(drafter, _batch(padded_batch), CSGDConfig(), 1, 4, target.lm_head.weight,
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
        out = csgd_step(drafter, _batch(padded_batch), CSGDConfig(), epoch=step / 25, num_epochs=1,
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
    out = csgd_step(drafter, _batch(padded_batch), CSGDConfig(glancing=False), 0, 4, target.lm_head.weight)
    assert torch.isfinite(out["loss"]) and "hamming" not in out
    out["loss"].backward()
    assert all(param.grad is not None for param in drafter.parameters())

    reduced = _drafter(target, draft_vocab_size=64)
    assert reduced.head_weight.shape == (64, 64)
    out = csgd_step(reduced, _batch(padded_batch), CSGDConfig(), 0, 4, target.lm_head.weight,
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
        steps[teacher] = csgd_step(drafter, batch, config, 0, 4, target.lm_head.weight,
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
        csgd_step(drafter, _batch(padded_batch), CSGDConfig(teacher="topk"), 0, 4, target.lm_head.weight)
    with pytest.raises(ValueError, match="lm_head_weight"):
        csgd_step(drafter, _batch(padded_batch), CSGDConfig(), 0, 4)


def test_step_rejects_bad_batches(target, padded_batch):
    drafter = _drafter(target)
    batch = _batch(padded_batch)
    with pytest.raises(ValueError, match="loss_mask"):
        csgd_step(drafter, {k: v for k, v in batch.items() if k != "loss_mask"}, CSGDConfig(), 0, 4,
                  target.lm_head.weight)
    with pytest.raises(ValueError, match="full head"):
        csgd_step(drafter, batch, CSGDConfig(), 0, 4, target.lm_head.weight[:64])
    with pytest.raises(ValueError, match="hidden size"):
        csgd_step(drafter, dict(batch, hidden_states=batch["hidden_states"][..., :32]), CSGDConfig(), 0, 4,
                  target.lm_head.weight)


def test_batch_without_loss_positions_gives_zero_loss(target, padded_batch):
    drafter = _drafter(target)
    batch = dict(_batch(padded_batch), loss_mask=torch.zeros_like(padded_batch["loss_mask"]))
    out = csgd_step(drafter, batch, CSGDConfig(), 0, 4, target.lm_head.weight)
    assert out["loss"].item() == 0.0 and out["num_positions"].item() == 0
    out["loss"].backward()
    assert all(param.grad is not None and not param.grad.any() for param in drafter.parameters())


def test_bf16_drafter_trains_with_float32_loss(target, padded_batch):
    drafter = _drafter(target).to(torch.bfloat16)
    out = csgd_step(drafter, _batch(padded_batch), CSGDConfig(), 0, 4, target.lm_head.weight,
                    torch.Generator().manual_seed(0))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    for param in drafter.parameters():
        assert param.grad is not None and param.grad.dtype == torch.bfloat16


def test_full_reveal_is_teacher_forcing_and_no_reveal_is_not(target, padded_batch):
    """With every block revealed the second pass reads exactly the true inputs; with none it reads predictions."""
    drafter = _drafter(target)
    window = {key: value[:1] for key, value in _batch(padded_batch).items()}
    window["loss_mask"] = torch.ones_like(window["loss_mask"])  # every block is a candidate
    head = target.lm_head.weight
    teacher_forced = csgd_eval_metrics(drafter, window, CSGDConfig(), head)["loss"]

    reveal_all = CSGDConfig(noise_bound=0.0, lambda_max=100.0)
    out = csgd_step(drafter, window, reveal_all, 0, 4, head, torch.Generator().manual_seed(0))
    assert out["hamming"] > 0 and out["revealed_fraction"] == 1
    assert out["loss"].item() == pytest.approx(teacher_forced.item(), rel=1e-5)

    reveal_none = CSGDConfig(noise_bound=0.0, lambda_max=0.0)
    out = csgd_step(drafter, window, reveal_none, 0, 4, head, torch.Generator().manual_seed(0))
    assert out["num_revealed"] == 0
    assert out["loss"].item() != pytest.approx(teacher_forced.item(), rel=1e-3)


def test_draft_vocabulary_map_must_be_sorted(target):
    drafter = Drafter(DrafterConfig.from_target(target.config, block_size=2, draft_vocab_size=4))
    with pytest.raises(ValueError, match="strictly increasing"):
        drafter.set_draft_vocab(torch.tensor([3, 1, 5, 7]))
    drafter.set_draft_vocab(torch.tensor([1, 3, 5, 7]))
    assert to_draft_ids(drafter.draft_to_target, torch.tensor([7, 2, 1])).tolist() == [3, -100, 0]
