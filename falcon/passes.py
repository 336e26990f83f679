"""The drafter's passes over a training window as decoding uses them.

Pass 0 is the teacher-forced pass: drafter position q reads (f_q, x_{q+1}) and, through the relaxed-causal mask
(blocks [ck, ck+k) aligned at the window start), predicts f_{q+k}. Its outputs at block c are exactly what
inference's first drafter pass proposes after a true prefix of (c+1)·k positions.

Pass 1 is what inference's second drafter pass sees: block c >= 1 reads the drafter's own pass-0 outputs for
block c-1 (the predicted features and the tokens drafted from them, i.e. their argmax), attends to the TRUE
keys of positions < ck plus its own block, and its LSTM starts from the true state at ck (falcon.generate's
draft_tree: the fused state after the committed prefix, the context cache, one predicted block). Its output
at position q has the same target as pass 0's at q. All blocks run at once: the LSTM of every predicted
block is one batched call from the true states, the attention one call with a block mask.

Pass 1 reads pass 0 detached (features, keys, values, LSTM states): it teaches reading one's own outputs
against a fixed true context, and lets CSGD's no-grad first pass serve as pass 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from falcon.drafter import Drafter, relaxed_causal_mask

# Rows per LM-head chunk when only the argmax is needed: bounds the (rows, vocab) logits held at once.
ARGMAX_CHUNK_ROWS = 2048


@torch.no_grad()
def head_argmax(logits_fn, features: torch.Tensor) -> torch.Tensor:
    """argmax(logits_fn(features)) (...) computed in row chunks to bound the logits memory."""
    rows = features.reshape(-1, features.shape[-1])  # (B*S, h)
    ids = [logits_fn(chunk).argmax(-1) for chunk in rows.split(ARGMAX_CHUNK_ROWS)]
    return torch.cat(ids).view(features.shape[:-1])


@torch.no_grad()
def lstm_states_every(lstm: nn.LSTM, inputs: torch.Tensor, every: int) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.LSTM's (h, c) from a zero state after steps every, 2·every, .. (< T) of inputs (B, T, in): each
    (layers, B, n, h), n = ceil(T / every) - 1. nn.LSTM returns only the last step's state, and running it block
    by block (one call per block, with autograd when pass 0 trains) made a pass-1 training step 2.8x (CSGD) to
    6x (teacher-forced) a plain one; this runs the cell by hand without grad: the input's share of every step's
    gates in one matmul per layer, then one small matmul per step (SmolLM2 sizes, k = 2, 2 x 512 tokens, 1 CPU
    thread: a CSGD + pass-1 step 8.5 s -> 5.6 s, teacher-forced + pass 1 19.0 s -> 4.3 s; CSGD alone 3.1 s)."""
    if lstm.proj_size or lstm.bidirectional or not lstm.batch_first:
        raise ValueError("lstm_states_every supports batch-first, unidirectional LSTMs without projections")
    batch, length, _ = inputs.shape
    ends = set(range(every - 1, length - 1, every))  # the step that ends each block but the last
    layer_input, h_states, c_states = inputs, [], []
    for layer in range(lstm.num_layers):
        weight_hh = getattr(lstm, f"weight_hh_l{layer}")
        bias = (getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")) if lstm.bias else None
        input_gates = F.linear(layer_input, getattr(lstm, f"weight_ih_l{layer}"), bias)  # (B, T, 4h)
        h = c = inputs.new_zeros(batch, lstm.hidden_size)
        outputs, h_at, c_at = [], [], []
        for step in range(length):
            # PyTorch's gate order: input, forget, cell, output
            i, f, g, o = (input_gates[:, step] + F.linear(h, weight_hh)).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
            if step in ends:
                h_at.append(h)
                c_at.append(c)
        layer_input = torch.stack(outputs, dim=1)  # (B, T, h): the next layer's input
        empty = inputs.new_zeros(batch, 0, lstm.hidden_size)
        h_states.append(torch.stack(h_at, dim=1) if h_at else empty)
        c_states.append(torch.stack(c_at, dim=1) if c_at else empty)
    return torch.stack(h_states), torch.stack(c_states)  # (layers, B, n, h)


@dataclass
class TeacherForcedPass:
    features: torch.Tensor  # (B, S, h): output at q predicts f_{q+k}
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each (B, kv_heads, S, head_dim)
    block_states: tuple[torch.Tensor, torch.Tensor]  # LSTM (h, c) at block starts k, 2k, ..: (layers, B, nb-1, h)


def teacher_forced_pass(drafter: Drafter, features: torch.Tensor, next_ids: torch.Tensor) -> TeacherForcedPass:
    """Pass 0 over windows (B, S, h) + (B, S), keeping what pass 1 needs; its features equal Drafter.forward."""
    k, (batch, length) = drafter.config.block_size, next_ids.shape
    fused, _ = drafter.fuse(features, next_ids)
    block_states = lstm_states_every(drafter.fusion, drafter.fusion_inputs(features, next_ids), k)
    positions = torch.arange(length, device=next_ids.device).expand(batch, length)
    mask = relaxed_causal_mask(length, k, next_ids.device)
    predicted, kv = drafter.decode(fused, positions, attn_mask=mask)
    return TeacherForcedPass(predicted, kv, block_states)


def predicted_block_mask(length: int, block_size: int, device=None) -> torch.Tensor:
    """Bool (S-k, S + S-k): pass-1 query at position q (block c = q // k >= 1) sees the true keys of
    positions < ck and the pass-1 keys of its own block."""
    k = block_size
    blocks = torch.arange(k, length, device=device) // k  # (S-k,)
    sees_truth = torch.arange(length, device=device)[None, :] < (blocks * k)[:, None]
    sees_own_block = blocks[None, :] == blocks[:, None]
    return torch.cat([sees_truth, sees_own_block], dim=1)


def predicted_block_pass(drafter: Drafter, pass0: TeacherForcedPass) -> torch.Tensor:
    """Pass 1: predicted features (B, S, h); positions q >= k as described above, the first block zeros."""
    k = drafter.config.block_size
    batch, length, hidden = pass0.features.shape
    if length <= k:  # a single block: nothing precedes it to predict from
        return torch.zeros_like(pass0.features)
    own = pass0.features[:, :-k].detach()  # position q reads pass 0's output at q-k: f̂_q
    own_ids = drafter.to_target_ids(head_argmax(drafter.logits, own))  # the token drafted from it
    num_blocks = -(-(length - k) // k)
    pad = num_blocks * k - (length - k)  # a partial last block: padding after it cannot reach it (causal)
    own = F.pad(own, (0, 0, 0, pad)).reshape(batch * num_blocks, k, hidden)
    own_ids = F.pad(own_ids, (0, pad)).reshape(batch * num_blocks, k)
    h0, c0 = (state.detach().flatten(1, 2) for state in pass0.block_states)  # (layers, B·blocks, h)
    fused, _ = drafter.fuse(own, own_ids, (h0, c0))
    fused = fused.reshape(batch, num_blocks * k, hidden)[:, :length - k]
    positions = torch.arange(k, length, device=fused.device).expand(batch, length - k)
    context = [(keys.detach(), values.detach()) for keys, values in pass0.kv]
    mask = predicted_block_mask(length, k, fused.device)
    predicted, _ = drafter.decode(fused, positions, context, mask)
    return F.pad(predicted, (0, 0, k, 0))
