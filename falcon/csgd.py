"""CSGD: Coupled Sequential Glancing Distillation, the Falcon drafter's training objective (paper §3.2).

Indexing. A training window holds tokens x_0..x_{T-1}, the target's features f_0..f_{T-1} (the last hidden
state its LM head consumes, so lm_head(f_i) are the logits for x_{i+1}) and a loss mask m (1 on assistant
tokens, 0 on prompt and padding). The drafter sequence has S = T-1 positions: position q reads (f_q, x_{q+1})
and predicts f_{q+k}; the teacher there is lm_head(f_{q+k}) and the hard label x_{q+k+1}. Position q has loss
iff q+k+1 <= T-1 and m_{q+k+1} = 1.

One step:
1. no-grad pass on noised true inputs; its argmax against the teacher's gives the Hamming distance d;
2. the second pass reads the drafter's OWN first-pass output, as inference does from the second drafter pass
   on: position q >= k gets (f̂_q, x̂_{q+1}) = (first-pass output at q-k, its argmax token); positions q < k
   keep the truth;
3. glancing gives back the truth, feature AND token together, on ceil(round(λ·d)/k) whole k-blocks;
4. the loss L = SmoothL1(f̂, f) + ω·(α·KL(teacher ‖ drafter) + (1-α)·CE(x)) is taken on the second pass.
`glancing=False` is the plain teacher-forced step (the "CSGD off" ablation).

The teacher at position q is the target's distribution for x_{q+k+1}: either its top-k logits at q+k as the
feature store keeps them (exact, and no full-vocabulary matmul: that was ~27% of a demo training step on CPU),
or lm_head(f_{q+k}) recomputed over the whole vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from falcon.drafter import Drafter

IGNORE_INDEX = -100
NOISE_SCALINGS = ("none", "seq_len")
TEACHERS = ("auto", "topk", "lm_head")
# Rows per LM-head chunk when only the argmax is needed: bounds the (rows, vocab) logits held at once.
ARGMAX_CHUNK_ROWS = 2048


@dataclass
class CSGDConfig:
    glancing: bool = True  # False: plain teacher-forced SAR training (the "CSGD off" ablation)
    # λ(e) = lambda_max·(E-e)/E + lambda_min; the paper uses 0.4 and 0, the official code 0.35 and 0.1.
    lambda_max: float = 0.4
    lambda_min: float = 0.0
    noise_bound: float = 0.1  # a in U(-a, a), added to the input features
    noise_scaling: str = "none"  # "seq_len": a·noise_reference_length/seq_len, as EAGLE and the official code
    noise_reference_length: int = 512
    dist_weight: float = 0.1  # ω: L = L_reg + ω·L_dist
    kl_weight: float = 0.9  # α: L_dist = α·KL + (1-α)·CE
    smooth_l1_beta: float = 1.0
    # "topk": the batch's stored top-k logits (renormalised: KL over the teacher's top-k tokens); "lm_head":
    # recompute full-vocabulary logits from the features; "auto": top-k when the batch has them.
    teacher: str = "auto"

    def __post_init__(self):
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {TEACHERS}, got {self.teacher!r}")
        if self.noise_scaling not in NOISE_SCALINGS:
            raise ValueError(f"noise_scaling must be one of {NOISE_SCALINGS}, got {self.noise_scaling!r}")
        if not 0.0 <= self.kl_weight <= 1.0:
            raise ValueError(f"kl_weight (alpha) must be in [0, 1], got {self.kl_weight}")
        for name in ("lambda_max", "lambda_min", "noise_bound", "dist_weight", "smooth_l1_beta"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.noise_reference_length <= 0:
            raise ValueError(f"noise_reference_length must be > 0, got {self.noise_reference_length}")


# -- alignment ----------------------------------------------------------------------------------------------
def align_targets(hidden_states: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                  block_size: int) -> dict[str, torch.Tensor]:
    """Drafter inputs and targets of a right-padded batch of windows (padding must carry loss_mask 0).

    hidden_states (B, T, h), input_ids (B, T), loss_mask (B, T) -> with S = T-1:
    input_features (B, S, h) = f_q, next_ids (B, S) = x_{q+1}, target_features (B, S, h) = f_{q+k},
    target_ids (B, S) = x_{q+k+1}, position_mask (B, S) bool. Targets are 0 where position_mask is False.
    """
    if hidden_states.dim() != 3:
        raise ValueError(f"hidden_states must be (batch, tokens, hidden), got {tuple(hidden_states.shape)}")
    batch, length, _ = hidden_states.shape
    for name, tensor in (("input_ids", input_ids), ("loss_mask", loss_mask)):
        if tuple(tensor.shape) != (batch, length):
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected ({batch}, {length})")
    if length < 2:
        raise ValueError(f"windows need at least 2 tokens, got {length}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    k, seq = block_size, length - 1
    supervised = max(seq - k, 0)  # positions q < S-k have a label x_{q+k+1} inside the window
    target_features = hidden_states.new_zeros(batch, seq, hidden_states.shape[-1])
    target_ids = input_ids.new_zeros(batch, seq)
    position_mask = torch.zeros(batch, seq, dtype=torch.bool, device=input_ids.device)
    target_features[:, :supervised] = hidden_states[:, k:k + supervised]
    target_ids[:, :supervised] = input_ids[:, k + 1:]
    position_mask[:, :supervised] = loss_mask[:, k + 1:].bool()
    target_ids = target_ids.masked_fill(~position_mask, 0)
    target_features = target_features.masked_fill(~position_mask[..., None], 0)
    return dict(
        input_features=hidden_states[:, :-1],
        next_ids=input_ids[:, 1:],
        target_features=target_features,
        target_ids=target_ids,
        position_mask=position_mask,
    )


# -- augmentation and schedule -------------------------------------------------------------------------------
def _uniform(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """U[0, 1) float32 on `device`, drawn on the generator's device so a CPU generator serves any device."""
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source, dtype=torch.float32).to(device)


def add_uniform_noise(features: torch.Tensor, config: CSGDConfig,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """features (B, S, h) + U(-a, a); with "seq_len" scaling a = noise_bound·reference_length/S."""
    bound = config.noise_bound
    if config.noise_scaling == "seq_len":
        bound = bound * config.noise_reference_length / features.shape[-2]
    noise = (_uniform(features.shape, generator, features.device) * 2 - 1) * bound
    return features + noise.to(features.dtype)


def glance_ratio(epoch: float, num_epochs: int, config: CSGDConfig) -> float:
    """λ for epoch e (0-based, may be fractional) of E: lambda_max·(E-e)/E + lambda_min."""
    if num_epochs <= 0:
        raise ValueError(f"num_epochs must be > 0, got {num_epochs}")
    if not 0 <= epoch <= num_epochs:
        raise ValueError(f"epoch must be in [0, {num_epochs}], got {epoch}")
    return config.lambda_max * (num_epochs - epoch) / num_epochs + config.lambda_min


# -- glancing ------------------------------------------------------------------------------------------------
def glance_reveal_mask(first_pass_wrong: torch.Tensor, position_mask: torch.Tensor, block_size: int,
                       ratio: float, generator: torch.Generator | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which second-pass input positions read the truth instead of first-pass predictions.

    Per row: d = wrong loss positions, N = round(ratio·d) (half to even); reveal ceil(N/k) whole k-blocks
    [jk, jk+k), j >= 1, drawn uniformly among the candidate blocks (those whose prediction slots q-k, i.e.
    block j-1 of position_mask, hold a loss position); fewer if there are not that many candidates.
    Returns reveal_mask (B, S) bool and num_revealed (B,) positions.
    """
    if ratio < 0:
        raise ValueError(f"glance ratio must be >= 0, got {ratio}")
    hamming = (first_pass_wrong & position_mask).sum(-1)  # (B,)
    blocks_wanted = torch.ceil(torch.round(hamming.double() * ratio) / block_size).long()  # (B,)
    candidates = candidate_blocks(position_mask, block_size)  # (B, num_blocks)
    # A random order per row with non-candidates last; a block is chosen if its rank is below the row's quota.
    scores = _uniform(candidates.shape, generator, position_mask.device).masked_fill(~candidates, -1.0)
    ranks = scores.argsort(dim=-1, descending=True).argsort(dim=-1)  # (B, num_blocks)
    chosen = candidates & (ranks < blocks_wanted[:, None])
    reveal_mask = _blocks_to_positions(chosen, block_size, position_mask.shape[-1])
    return reveal_mask, reveal_mask.sum(-1)


def candidate_blocks(position_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, ceil(S/k)) bool: block j >= 1 reads the predictions of block j-1; a candidate iff one has loss."""
    batch, length = position_mask.shape
    num_blocks = -(-length // block_size)
    padded = F.pad(position_mask, (0, num_blocks * block_size - length))
    slots_have_loss = padded.view(batch, num_blocks, block_size).any(-1)  # (B, num_blocks)
    candidates = torch.zeros_like(slots_have_loss)
    candidates[:, 1:] = slots_have_loss[:, :-1]
    return candidates


def _blocks_to_positions(blocks: torch.Tensor, block_size: int, length: int) -> torch.Tensor:
    """(B, num_blocks) bool -> (B, S) bool, each block covering its k positions (the last one clipped)."""
    return blocks.repeat_interleave(block_size, dim=1)[:, :length]


def second_pass_inputs(true_features: torch.Tensor, true_next_ids: torch.Tensor,
                       predicted_features: torch.Tensor, predicted_next_ids: torch.Tensor,
                       reveal_mask: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Second-pass (features (B, S, h), next_ids (B, S)).

    Position q >= k reads the first pass's output at q-k (its feature and its argmax token, in target ids);
    positions q < k and revealed positions read the truth (true_* are the first pass's inputs).
    """
    k = block_size
    # Position q reads slot q-k: shift the predictions right by k, truth in the first k positions.
    shifted_features = torch.cat([true_features[:, :k], predicted_features[:, :-k]], dim=1)
    shifted_ids = torch.cat([true_next_ids[:, :k], predicted_next_ids[:, :-k]], dim=1)
    reads_truth = reveal_mask.clone()
    reads_truth[:, :k] = True
    features = torch.where(reads_truth[..., None], true_features, shifted_features)
    next_ids = torch.where(reads_truth, true_next_ids, shifted_ids)
    return features, next_ids


# -- loss ----------------------------------------------------------------------------------------------------
def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where, not multiply: rows outside the mask may hold inf/nan (padding) and 0·inf is nan.
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def to_draft_ids(draft_to_target: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Draft ids (same shape) of target ids under the sorted map `draft_to_target` (V_draft,); IGNORE_INDEX
    for target ids outside the draft vocabulary."""
    index = torch.searchsorted(draft_to_target, target_ids).clamp(max=draft_to_target.numel() - 1)
    return torch.where(draft_to_target[index] == target_ids, index, IGNORE_INDEX)


def teacher_argmax(teacher_logits: torch.Tensor, teacher_ids: torch.Tensor | None) -> torch.Tensor:
    """The teacher's top token (...) in target ids, from dense (..., V) logits or sparse (..., K) ones + ids."""
    best = teacher_logits.argmax(-1)
    return best if teacher_ids is None else teacher_ids.gather(-1, best.unsqueeze(-1)).squeeze(-1)


def csgd_loss(pred_features: torch.Tensor, target_features: torch.Tensor, drafter_logits: torch.Tensor,
              teacher_logits: torch.Tensor, target_ids: torch.Tensor, position_mask: torch.Tensor,
              config: CSGDConfig, draft_to_target: torch.Tensor | None = None,
              teacher_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """L = L_reg + ω·(α·KL(teacher ‖ drafter) + (1-α)·CE), in float32, over positions where position_mask.

    Any leading shape (...): pred/target_features (..., h), drafter_logits (..., V_draft), teacher_logits
    (..., V) over the full target vocabulary, target_ids (...) target ids, position_mask (...) bool.
    A sparse teacher: teacher_logits (..., K) are the logits of the target ids `teacher_ids` (..., K) (the
    stored top-k); the teacher distribution is then renormalised over those K tokens.
    With a reduced draft vocabulary (`draft_to_target`, (V_draft,) target ids) the teacher distribution is
    renormalised over the draft vocabulary and CE ignores labels outside it.
    reg and kl are means over masked positions (reg also over hidden dims), ce over masked positions whose
    label is in the draft vocabulary. `correct` (...) is the drafter argmax == teacher argmax (in target ids).
    """
    position_mask = position_mask.bool()
    reg = F.smooth_l1_loss(pred_features.float(), target_features.float(), reduction="none",
                           beta=config.smooth_l1_beta).mean(-1)  # (...)
    reg = _masked_mean(reg, position_mask)

    teacher_logits = teacher_logits.float()
    labels = torch.where(position_mask, target_ids, 0)
    drafter_log_probs = F.log_softmax(drafter_logits.float(), dim=-1)
    teacher_top = teacher_argmax(teacher_logits, teacher_ids)
    if teacher_ids is None:
        if draft_to_target is not None:
            teacher_logits = teacher_logits.index_select(-1, draft_to_target)
        teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
        kl = F.kl_div(drafter_log_probs, teacher_log_probs, reduction="none", log_target=True).sum(-1)  # (...)
    else:
        kl = _sparse_kl(drafter_log_probs, teacher_logits, teacher_ids, draft_to_target)
    kl = _masked_mean(kl, position_mask)
    if draft_to_target is not None:
        labels = to_draft_ids(draft_to_target, labels)
    labels = labels.masked_fill(~position_mask, IGNORE_INDEX)
    labelled = labels != IGNORE_INDEX
    ce = F.nll_loss(drafter_log_probs.reshape(-1, drafter_log_probs.shape[-1]), labels.reshape(-1),
                    ignore_index=IGNORE_INDEX, reduction="sum") / labelled.sum().clamp(min=1)

    dist = config.kl_weight * kl + (1 - config.kl_weight) * ce
    draft_ids = drafter_logits.argmax(-1)
    if draft_to_target is not None:
        draft_ids = draft_to_target[draft_ids]
    correct = (draft_ids == teacher_top) & position_mask
    return dict(
        loss=reg + config.dist_weight * dist,
        reg=reg,
        dist=dist,
        kl=kl,
        ce=ce,
        top1=correct.sum() / position_mask.sum().clamp(min=1),
        correct=correct,
    )


def _sparse_kl(drafter_log_probs: torch.Tensor, teacher_logits: torch.Tensor, teacher_ids: torch.Tensor,
               draft_to_target: torch.Tensor | None) -> torch.Tensor:
    """KL(teacher ‖ drafter) (...) with the teacher known on K tokens (..., K) only, renormalised over those
    of them the drafter can emit; 0 where it can emit none of them."""
    draft_index = teacher_ids if draft_to_target is None else to_draft_ids(draft_to_target, teacher_ids)
    emittable = draft_index != IGNORE_INDEX
    with torch.no_grad():
        teacher_probs = torch.softmax(teacher_logits.masked_fill(~emittable, -math.inf), dim=-1)
        teacher_probs = torch.nan_to_num(teacher_probs, nan=0.0)  # rows with nothing emittable
    drafter_at = drafter_log_probs.gather(-1, draft_index.clamp(min=0))  # (..., K)
    return (torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * drafter_at).sum(-1)


def top1_by_block_offset(correct: torch.Tensor, position_mask: torch.Tensor,
                         block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Correct and total counts (k,) of masked positions q grouped by q % k; correct/position_mask (B, S)."""
    offsets = torch.arange(position_mask.shape[-1], device=position_mask.device) % block_size
    offsets = offsets.expand_as(position_mask)
    correct_at = torch.bincount(offsets[correct & position_mask], minlength=block_size)
    count_at = torch.bincount(offsets[position_mask], minlength=block_size)
    return correct_at, count_at


# -- steps ---------------------------------------------------------------------------------------------------
TOPK_KEYS = ("topk_values", "topk_indices")


def _prepare(drafter: Drafter, batch: dict[str, torch.Tensor],
             lm_head_weight: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Batch on the drafter's device, features in its dtype, aligned to drafter positions."""
    missing = sorted({"hidden_states", "input_ids", "loss_mask"} - set(batch))
    if missing:
        raise ValueError(f"batch lacks {missing}; it needs hidden_states, input_ids and loss_mask")
    weight = next(drafter.parameters())
    hidden_size = drafter.config.hidden_size
    feature_size = batch["hidden_states"].shape[-1]
    if feature_size != hidden_size:
        raise ValueError(f"features have hidden size {feature_size}, the drafter {hidden_size}")
    if lm_head_weight is not None:
        if tuple(lm_head_weight.shape) != (drafter.config.vocab_size, hidden_size):
            raise ValueError(f"lm_head_weight has shape {tuple(lm_head_weight.shape)}, expected the target's "
                             f"full head ({drafter.config.vocab_size}, {hidden_size})")
        if lm_head_weight.device != weight.device:
            raise ValueError(f"lm_head_weight is on {lm_head_weight.device}, the drafter on {weight.device}")
    return align_targets(
        batch["hidden_states"].to(device=weight.device, dtype=weight.dtype),
        batch["input_ids"].to(weight.device),
        batch["loss_mask"].to(weight.device),
        drafter.config.block_size,
    )


@torch.no_grad()
def _teacher(aligned: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], lm_head_weight: torch.Tensor | None,
             config: CSGDConfig, block_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The target's logits at the N loss positions: (N, K) stored top-k logits and their (N, K) target ids, or
    (N, V) full-vocabulary logits from its LM head over the post-norm features and None."""
    mask = aligned["position_mask"]
    has_topk = all(key in batch for key in TOPK_KEYS)
    if config.teacher == "topk" and not has_topk:
        raise ValueError("csgd.teacher is 'topk' but the batch has no topk_values/topk_indices: the feature store "
                         "was written with topk 0; use teacher 'lm_head'")
    if config.teacher == "topk" or (config.teacher == "auto" and has_topk):
        # The teacher of drafter position q is the target at window position q+k; q < S-k holds every loss.
        supervised = mask[:, :max(mask.shape[1] - block_size, 0)]  # (B, S-k)
        shift = slice(block_size, block_size + supervised.shape[1])
        values = batch["topk_values"][:, shift].to(mask.device)[supervised]  # (N, K)
        ids = batch["topk_indices"][:, shift].to(mask.device)[supervised]
        return values.float(), ids.long()
    if lm_head_weight is None:
        raise ValueError("the LM-head teacher needs lm_head_weight (the batch has no stored top-k logits)")
    target_rows = aligned["target_features"][mask]  # (N, h)
    return F.linear(target_rows.to(lm_head_weight.dtype), lm_head_weight), None


@torch.no_grad()
def _head_argmax(logits_fn, features: torch.Tensor) -> torch.Tensor:
    """argmax(logits_fn(features)) (...) computed in row chunks to bound the logits memory."""
    rows = features.reshape(-1, features.shape[-1])  # (B*S, h)
    ids = [logits_fn(chunk).argmax(-1) for chunk in rows.split(ARGMAX_CHUNK_ROWS)]
    return torch.cat(ids).view(features.shape[:-1])


def _loss_on_masked(drafter: Drafter, pred_features: torch.Tensor, aligned: dict[str, torch.Tensor],
                    teacher: tuple[torch.Tensor, torch.Tensor | None], config: CSGDConfig) -> dict[str, torch.Tensor]:
    """csgd_loss on the loss positions only (the LM heads never see the others) + per-block-offset top-1."""
    mask = aligned["position_mask"]
    pred = pred_features[mask]  # (N, h)
    every_row = torch.ones(pred.shape[0], dtype=torch.bool, device=pred.device)
    teacher_logits, teacher_ids = teacher
    parts = csgd_loss(pred, aligned["target_features"][mask], drafter.logits(pred), teacher_logits,
                      aligned["target_ids"][mask], every_row, config, drafter.draft_to_target, teacher_ids)
    correct = torch.zeros_like(mask)
    correct[mask] = parts.pop("correct")
    correct_at, count_at = top1_by_block_offset(correct, mask, drafter.config.block_size)
    metrics = {name: value.detach() for name, value in parts.items()}
    metrics.update(
        loss=parts["loss"],
        acc_at=torch.where(count_at > 0, correct_at / count_at.clamp(min=1), math.nan),
        top1_correct_at=correct_at,
        top1_count_at=count_at,
        num_positions=mask.sum(),
    )
    return metrics


def csgd_step(drafter: Drafter, batch: dict[str, torch.Tensor], config: CSGDConfig, epoch: float,
              num_epochs: int, lm_head_weight: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """One CSGD training step's loss and metrics.

    batch: hidden_states (B, T, h), input_ids (B, T), loss_mask (B, T), right-padded windows; optionally the
    store's topk_values / topk_indices (B, T, K) for the top-k teacher (see CSGDConfig.teacher).
    lm_head_weight: the target's full, frozen LM head (V, h), for the LM-head teacher (unused with top-k);
    the drafter's attached head may hold only the draft-vocabulary rows, and may be untied from the embedding.
    generator: drives the noise and the glancing draw (a CPU generator works for any device).
    Returns `loss` (float32, with grad) and detached metrics: reg, dist, kl, ce, top1, acc_at (k,) = top-1
    over positions q with q % k == j, top1_correct_at/top1_count_at (k,) to aggregate, num_positions;
    with glancing also glance_ratio, hamming (mean first-pass d per window), num_revealed (mean per window)
    and revealed_fraction (revealed / positions in candidate blocks).
    """
    aligned = _prepare(drafter, batch, lm_head_weight)
    mask, next_ids = aligned["position_mask"], aligned["next_ids"]
    teacher = _teacher(aligned, batch, lm_head_weight, config, drafter.config.block_size)
    noised = add_uniform_noise(aligned["input_features"], config, generator)
    if not config.glancing:
        return _loss_on_masked(drafter, drafter(noised, next_ids), aligned, teacher, config)

    k = drafter.config.block_size
    with torch.no_grad():
        first_features = drafter(noised, next_ids)  # (B, S, h); output at q predicts f_{q+k}
        first_ids = drafter.to_target_ids(_head_argmax(drafter.logits, first_features))  # (B, S) target ids
    teacher_ids = torch.zeros_like(next_ids)
    teacher_ids[mask] = teacher_argmax(*teacher)
    first_pass_wrong = first_ids != teacher_ids
    ratio = glance_ratio(epoch, num_epochs, config)
    reveal_mask, num_revealed = glance_reveal_mask(first_pass_wrong, mask, k, ratio, generator)
    features, second_ids = second_pass_inputs(noised, next_ids, first_features, first_ids, reveal_mask, k)

    metrics = _loss_on_masked(drafter, drafter(features, second_ids), aligned, teacher, config)
    candidate_positions = _blocks_to_positions(candidate_blocks(mask, k), k, mask.shape[-1])
    metrics.update(
        glance_ratio=torch.tensor(ratio, device=mask.device),
        hamming=(first_pass_wrong & mask).sum(-1).float().mean(),
        num_revealed=num_revealed.float().mean(),
        revealed_fraction=num_revealed.sum() / candidate_positions.sum().clamp(min=1),
    )
    return metrics


@torch.no_grad()
def csgd_eval_metrics(drafter: Drafter, batch: dict[str, torch.Tensor], config: CSGDConfig,
                      lm_head_weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Teacher-forced metrics on held-out windows: true inputs, no noise, no glancing; same keys as the
    glancing=False csgd_step (all detached)."""
    aligned = _prepare(drafter, batch, lm_head_weight)
    pred_features = drafter(aligned["input_features"], aligned["next_ids"])
    teacher = _teacher(aligned, batch, lm_head_weight, config, drafter.config.block_size)
    return _loss_on_masked(drafter, pred_features, aligned, teacher, config)
