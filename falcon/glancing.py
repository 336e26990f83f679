"""Glancing, CSGD's second-pass inputs (paper §3.2, Fig. 3; the official training loop), per batch row.

Drafter position q reads (f_q, x_{q+1}); its answer is (f_{q+k}, x_{q+k+1}). Blocks are [ck, ck+k) from the
window start, the blocks of the relaxed-causal mask. A glanced position reads its answer instead of its
teacher-forced input, so the later positions of its block see the truth of the earlier ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# floor(λ·d) must not lose a glance to rounding (0.29·100 is 28.999999999999996 in floating point).
COUNT_EPSILON = 1e-9


def uniform(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """U[0, 1) float32 on `device`, drawn on the generator's device so a CPU generator serves any device."""
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source, dtype=torch.float32).to(device)


def glance_runs_wanted(hamming: torch.Tensor, ratio: float, block_size: int) -> torch.Tensor:
    """Runs to glance per row (B,) from its Hamming distance d (B,): N = floor(λ·d) single positions for
    k = 2, N // k runs of 1..k-1 positions for k > 2 (the paper's Fig. 3 and the official code)."""
    if ratio < 0:
        raise ValueError(f"glance ratio must be >= 0, got {ratio}")
    count = torch.floor(hamming.double() * ratio + COUNT_EPSILON).long()
    return count if block_size == 2 else count // block_size


def glance_positions(hamming: torch.Tensor, position_mask: torch.Tensor, block_size: int, ratio: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Which second-pass positions read their answer: (B, S) bool.

    A candidate is a block start [ck] that is a loss position. Per row, glance_runs_wanted candidates are drawn
    uniformly (all of them if there are fewer); each covers a run of r positions from its block start, r = 1
    for k = 2, uniform in 1..k-1 for k > 2, cut at the first position without loss. A block's last position is
    never glanced, so every block keeps something to predict (nothing can be glanced for k = 1).
    """
    k, (batch, length) = block_size, position_mask.shape
    num_blocks = -(-length // k)
    blocks = F.pad(position_mask, (0, num_blocks * k - length)).view(batch, num_blocks, k)
    reachable = blocks.long().cumprod(-1).bool()  # loss positions contiguous from the block start
    reachable[..., k - 1] = False
    candidates = reachable[..., 0]  # (B, num_blocks)
    wanted = glance_runs_wanted(hamming, ratio, k)  # (B,)
    # A random order per row with non-candidates last; a start is chosen if its rank is below the row's quota.
    scores = uniform(candidates.shape, generator, position_mask.device).masked_fill(~candidates, -1.0)
    ranks = scores.argsort(dim=-1, descending=True).argsort(dim=-1)
    chosen = candidates & (ranks < wanted[:, None])
    run_lengths = 1 + (uniform(candidates.shape, generator, position_mask.device) * (k - 1)).long()
    offsets = torch.arange(k, device=position_mask.device)
    glanced = chosen[..., None] & (offsets < run_lengths[..., None]) & reachable
    return glanced.view(batch, num_blocks * k)[:, :length]


def glanced_inputs(features: torch.Tensor, next_ids: torch.Tensor, target_features: torch.Tensor,
                   target_ids: torch.Tensor, glanced: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Second-pass inputs: the first pass's (features (B, S, h), next_ids (B, S)), except that glanced
    positions (B, S) read their answer (f_{q+k}, x_{q+k+1}), feature and token together."""
    features = torch.where(glanced[..., None], target_features.to(features.dtype), features)
    return features, torch.where(glanced, target_ids, next_ids)
