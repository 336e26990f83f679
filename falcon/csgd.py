"""CSGD: Coupled Sequential Glancing Distillation, the Falcon drafter's training objective (paper §3.2).

Indexing. A training window holds tokens x_0..x_{T-1}, the target's features f_0..f_{T-1} (the last hidden
state its LM head consumes, so lm_head(f_i) are the logits for x_{i+1}) and a loss mask m (1 on assistant
tokens, 0 on prompt and padding). The drafter sequence has S = T-1 positions: position q reads (f_q, x_{q+1})
and predicts f_{q+k}; the teacher there is lm_head(f_{q+k}) and the hard label x_{q+k+1}. Position q has loss
iff q+k+1 <= T-1 and m_{q+k+1} = 1. Blocks are [ck, ck+k) from the window start, as the relaxed-causal mask.

One step (the official training loop, per row for any batch):
1. no-grad first pass on the noised teacher-forced inputs; a row's Hamming distance d counts its loss
   positions whose argmax differs from the teacher's;
2. N = floor(λ·d) positions are glanced (glance_ratio, glance_positions): runs from block starts;
3. the second pass reads the SAME inputs, except that a glanced position q reads its answer, feature f_{q+k}
   and token x_{q+k+1} together, so later positions of its block see the truth of the earlier ones;
4. the loss L = SmoothL1(f̂, f) + ω·(α·KL(teacher ‖ drafter) + (1-α)·CE(x)) is taken on the second pass.
`glancing=False` is the plain teacher-forced step (the "CSGD off" ablation). pass1_weight > 0 adds the loss of
falcon.passes' pass 1 (each block reads the drafter's own outputs for the previous one; not part of CSGD).

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
from falcon.glancing import glance_positions, glanced_inputs, uniform
from falcon.passes import TeacherForcedPass, head_argmax, predicted_block_pass, teacher_forced_pass

IGNORE_INDEX = -100
NOISE_SCALINGS = ("none", "seq_len")
TEACHERS = ("auto", "topk", "lm_head")
# λ(p) = floor + (λ_0 - floor)·(1 - p): (default λ_0, floor). Paper 0.4·(1-p); official code 0.35·(1-p) + 0.1.
LAMBDA_SCHEDULES = {"paper": (0.4, 0.0), "official": (0.45, 0.1)}


@dataclass
class CSGDConfig:
    glancing: bool = True  # False: plain teacher-forced SAR training (the "CSGD off" ablation)
    lambda_schedule: str = "paper"  # "paper" or "official", see LAMBDA_SCHEDULES
    lambda_max: float | None = None  # λ at the start of training; None: the schedule's (0.4 paper, 0.45 official)
    glance_in_loss: bool = True  # the official code keeps glanced positions in the loss; False drops them (GLAT)
    noise_bound: float = 0.1  # a in U(-a, a), added to the input features
    noise_scaling: str = "none"  # "seq_len": a·noise_reference_length/seq_len, as EAGLE and the official code
    noise_reference_length: int = 512
    dist_weight: float = 0.1  # ω: L = L_reg + ω·L_dist
    kl_weight: float = 0.9  # α: L_dist = α·KL + (1-α)·CE
    smooth_l1_beta: float = 1.0
    # "topk": the batch's stored top-k logits (renormalised: KL over the teacher's top-k tokens); "lm_head":
    # recompute full-vocabulary logits from the features; "auto": top-k when the batch has them.
    teacher: str = "auto"
    pass1_weight: float = 0.0  # weight of the predicted-block loss (falcon.passes) added to the step's; 0: off
    pass1_start: float = 0.0  # training progress (fraction of all steps, in [0, 1]) from which it is on

    def __post_init__(self):
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {TEACHERS}, got {self.teacher!r}")
        if self.noise_scaling not in NOISE_SCALINGS:
            raise ValueError(f"noise_scaling must be one of {NOISE_SCALINGS}, got {self.noise_scaling!r}")
        if self.lambda_schedule not in LAMBDA_SCHEDULES:
            raise ValueError(f"lambda_schedule must be one of {tuple(LAMBDA_SCHEDULES)}, got {self.lambda_schedule!r}")
        floor = LAMBDA_SCHEDULES[self.lambda_schedule][1]
        if self.lambda_max is not None and self.lambda_max < floor:
            raise ValueError(f"lambda_max {self.lambda_max} is below the {self.lambda_schedule} schedule's final "
                             f"λ {floor}; give a larger lambda_max or leave it unset")
        if not 0.0 <= self.kl_weight <= 1.0:
            raise ValueError(f"kl_weight (alpha) must be in [0, 1], got {self.kl_weight}")
        if not 0.0 <= self.pass1_start <= 1.0:
            raise ValueError(f"pass1_start is a fraction of training, in [0, 1]; got {self.pass1_start}")
        for name in ("noise_bound", "dist_weight", "smooth_l1_beta", "pass1_weight"):
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
def add_uniform_noise(features: torch.Tensor, config: CSGDConfig,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """features (B, S, h) + U(-a, a); with "seq_len" scaling a = noise_bound·reference_length/S."""
    bound = config.noise_bound
    if config.noise_scaling == "seq_len":
        bound = bound * config.noise_reference_length / features.shape[-2]
    noise = (uniform(features.shape, generator, features.device) * 2 - 1) * bound
    return features + noise.to(features.dtype)


def glance_ratio(progress: float, config: CSGDConfig) -> float:
    """λ at training progress p in [0, 1] (steps done / all steps): floor + (lambda_max - floor)·(1 - p)."""
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"training progress must be a fraction in [0, 1] (step / total steps), got {progress}")
    default_start, floor = LAMBDA_SCHEDULES[config.lambda_schedule]
    start = default_start if config.lambda_max is None else config.lambda_max
    return floor + (start - floor) * (1.0 - progress)


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


def _restrict(aligned: dict[str, torch.Tensor], teacher: tuple[torch.Tensor, torch.Tensor | None],
              keep: torch.Tensor) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]:
    """The loss positions and teacher rows restricted to `keep` (B, S), a subset of the loss positions."""
    rows = keep[aligned["position_mask"]]
    logits, ids = teacher
    return dict(aligned, position_mask=keep), (logits[rows], None if ids is None else ids[rows])


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


def _pass1_metrics(drafter: Drafter, pass0: TeacherForcedPass, aligned: dict[str, torch.Tensor],
                   teacher: tuple[torch.Tensor, torch.Tensor | None], config: CSGDConfig) -> dict[str, torch.Tensor]:
    """The loss and top-1 of pass 1 (falcon.passes) at the loss positions after the first block."""
    keep = aligned["position_mask"].clone()
    keep[:, :drafter.config.block_size] = False  # the first block has no previous block to read
    return _loss_on_masked(drafter, predicted_block_pass(drafter, pass0), *_restrict(aligned, teacher, keep), config)


def _first_pass(drafter: Drafter, features: torch.Tensor, next_ids: torch.Tensor,
                with_pass1: bool) -> tuple[torch.Tensor, TeacherForcedPass | None]:
    """The teacher-forced pass's features; also what pass 1 needs when it is on (a slower, blockwise LSTM)."""
    if not with_pass1:
        return drafter(features, next_ids), None
    pass0 = teacher_forced_pass(drafter, features, next_ids)
    return pass0.features, pass0


def _glancing_step(drafter: Drafter, aligned: dict[str, torch.Tensor], noised: torch.Tensor,
                   teacher: tuple[torch.Tensor, torch.Tensor | None], config: CSGDConfig, progress: float,
                   generator: torch.Generator | None, with_pass1: bool) -> tuple[dict, TeacherForcedPass | None]:
    """CSGD's two passes (module docstring); also pass 0 for pass 1 when asked (the first pass is it)."""
    k, mask, next_ids = drafter.config.block_size, aligned["position_mask"], aligned["next_ids"]
    with torch.no_grad():
        first_features, pass0 = _first_pass(drafter, noised, next_ids, with_pass1)
        first_ids = drafter.to_target_ids(head_argmax(drafter.logits, first_features))  # (B, S) target ids
    teacher_ids = torch.zeros_like(next_ids)
    teacher_ids[mask] = teacher_argmax(*teacher)
    hamming = ((first_ids != teacher_ids) & mask).sum(-1)  # (B,)
    ratio = glance_ratio(progress, config)
    glanced = glance_positions(hamming, mask, k, ratio, generator)
    second = drafter(*glanced_inputs(noised, next_ids, aligned["target_features"], aligned["target_ids"], glanced))
    scored = mask if config.glance_in_loss else mask & ~glanced
    metrics = _loss_on_masked(drafter, second, *_restrict(aligned, teacher, scored), config)
    num_glanced = glanced.sum(-1)
    metrics.update(
        glance_ratio=torch.tensor(ratio, device=mask.device),
        hamming=hamming.float().mean(),
        num_glanced=num_glanced.float().mean(),
        glanced_fraction=num_glanced.sum() / mask.sum().clamp(min=1),
    )
    return metrics, pass0


def csgd_step(drafter: Drafter, batch: dict[str, torch.Tensor], config: CSGDConfig, progress: float,
              lm_head_weight: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """One CSGD training step's loss and metrics.

    batch: hidden_states (B, T, h), input_ids (B, T), loss_mask (B, T), right-padded windows; optionally the
    store's topk_values / topk_indices (B, T, K) for the top-k teacher (see CSGDConfig.teacher).
    progress: the fraction of training done, step / total steps, in [0, 1]: drives λ and pass1_start.
    lm_head_weight: the target's full, frozen LM head (V, h), for the LM-head teacher (unused with top-k);
    the drafter's attached head may hold only the draft-vocabulary rows, and may be untied from the embedding.
    generator: drives the noise and the glancing draw (a CPU generator works for any device).
    Returns `loss` (float32, with grad) and detached metrics: reg, dist, kl, ce, top1, acc_at (k,) = top-1
    by q % k, top1_correct_at/top1_count_at (k,), num_positions; with glancing glance_ratio, hamming and
    num_glanced (means per window), glanced_fraction (of loss positions); with pass 1 pass1_loss, pass1_top1.
    """
    aligned = _prepare(drafter, batch, lm_head_weight)
    teacher = _teacher(aligned, batch, lm_head_weight, config, drafter.config.block_size)
    noised = add_uniform_noise(aligned["input_features"], config, generator)
    with_pass1 = config.pass1_weight > 0 and progress >= config.pass1_start
    if config.glancing:
        metrics, pass0 = _glancing_step(drafter, aligned, noised, teacher, config, progress, generator, with_pass1)
    else:
        features, pass0 = _first_pass(drafter, noised, aligned["next_ids"], with_pass1)
        metrics = _loss_on_masked(drafter, features, aligned, teacher, config)
    if with_pass1:
        pass1 = _pass1_metrics(drafter, pass0, aligned, teacher, config)
        metrics.update(loss=metrics["loss"] + config.pass1_weight * pass1["loss"],
                       pass1_loss=pass1["loss"].detach(), pass1_top1=pass1["top1"])
    return metrics


@torch.no_grad()
def csgd_eval_metrics(drafter: Drafter, batch: dict[str, torch.Tensor], config: CSGDConfig,
                      lm_head_weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Held-out metrics on true inputs, no noise, no glancing (all detached).

    The teacher-forced keys of the glancing=False csgd_step (pass 0: depths 1..k), plus top-1 at every depth a
    two-pass tree uses: top1_depth_d for d = 1..2k, depths k+1..2k from pass 1 (falcon.passes: the previous
    block's own outputs, fed as decoding feeds them), and their counts top1_depth_correct/_count (2k,).
    """
    aligned = _prepare(drafter, batch, lm_head_weight)
    teacher = _teacher(aligned, batch, lm_head_weight, config, drafter.config.block_size)
    pass0 = teacher_forced_pass(drafter, aligned["input_features"], aligned["next_ids"])
    metrics = _loss_on_masked(drafter, pass0.features, aligned, teacher, config)
    pass1 = _pass1_metrics(drafter, pass0, aligned, teacher, config)
    correct = torch.cat([metrics["top1_correct_at"], pass1["top1_correct_at"]])
    count = torch.cat([metrics["top1_count_at"], pass1["top1_count_at"]])
    metrics.update(top1_depth_correct=correct, top1_depth_count=count, pass1_loss=pass1["loss"])
    accuracy = torch.where(count > 0, correct / count.clamp(min=1), math.nan)
    metrics.update({f"top1_depth_{depth}": value for depth, value in enumerate(accuracy, start=1)})
    return metrics
