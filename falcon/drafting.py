"""What the drafter drafts in one decoding step: its state across steps, its first pass, and every later pass.

`draft_tree` is the inference path (one context, the tree's branches); the tree tuner
(`pipelines.tree_tuning.acceptance`) drafts along the true continuation of many positions at once. Both run the
passes after the first through `next_pass`, so the tuner measures exactly what decoding drafts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from falcon.drafter import Drafter, relaxed_causal_mask
from falcon.tree import Tree


@dataclass
class DrafterState:
    """What the drafter has seen. Positions < committed are in its KV cache for good; the target features and
    next tokens of the positions after them wait in `hidden_states` / `next_ids`. The LSTM is causal, so
    every known position goes through it once: `fused` holds its outputs for the first uncommitted ones."""

    hidden_states: torch.Tensor  # (1, L - committed, h): target features f_i of the uncommitted positions
    next_ids: torch.Tensor  # (1, L - committed): the token after each of them, x_{i+1}
    committed: int = 0
    kv: list | None = None  # per layer (keys, values), each (1, kv_heads, committed, d)
    fused: torch.Tensor | None = None  # (1, F, h): LSTM outputs of uncommitted positions committed..committed+F-1
    lstm: tuple | None = None  # LSTM (h, c) after position committed + F - 1

    def append(self, hidden_states: torch.Tensor, next_ids: torch.Tensor) -> None:
        """Positions the target just verified: their features (1, n, h) and the token after each (1, n)."""
        self.hidden_states = torch.cat([self.hidden_states, hidden_states], 1)
        self.next_ids = torch.cat([self.next_ids, next_ids], 1)

    def commit(self, count: int, chunk_kv: list, fused: torch.Tensor) -> None:
        """Move the oldest `count` pending positions into the cache: chunk_kv holds per layer the keys and values
        of all pending positions (1, kv_heads, pending, d), fused their LSTM outputs (1, pending, h)."""
        new_kv = [(keys[:, :, :count], values[:, :, :count]) for keys, values in chunk_kv]
        self.kv = new_kv if self.kv is None else [
            (torch.cat([old_keys, keys], 2), torch.cat([old_values, values], 2))
            for (old_keys, old_values), (keys, values) in zip(self.kv, new_kv, strict=True)
        ]
        self.committed += count
        self.hidden_states, self.next_ids = self.hidden_states[:, count:], self.next_ids[:, count:]
        self.fused = fused[:, count:]


def next_pass(drafter: Drafter, block_features: torch.Tensor, lstm_state: tuple, tokens: torch.Tensor,
              positions: torch.Tensor, context_kv: list, ancestor_kv: list[list],
              attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple, list]:
    """One drafter pass after the first, for B branches at once.

    block_features (B, k, h): the previous pass's outputs along each branch; lstm_state: the LSTM (h, c), each
    (layers, B, h), at the end of that block; tokens (B, k): the tokens at its depths (drafted, or the truth);
    positions (B, k); context_kv: per layer (keys, values) of the context, (1 or B, kv_heads, C, d);
    ancestor_kv: per earlier pass p >= 1, per layer (keys, values) (B, kv_heads, k, d) along each branch;
    attn_mask: None (every key visible) or bool (B, 1, 1, C + k * (len(ancestor_kv) + 1)), this pass's keys last.
    Returns this pass's features (B, k, h), the LSTM state after it and its per-layer (keys, values).
    """
    num_branches = tokens.shape[0]
    fused, lstm_state = drafter.fuse(block_features, tokens, lstm_state)
    past = [
        (torch.cat([ctx_keys.expand(num_branches, -1, -1, -1), *(kv[layer][0] for kv in ancestor_kv)], 2),
         torch.cat([ctx_values.expand(num_branches, -1, -1, -1), *(kv[layer][1] for kv in ancestor_kv)], 2))
        for layer, (ctx_keys, ctx_values) in enumerate(context_kv)
    ]
    features, kv = drafter.decode(fused, positions, past, attn_mask)
    return features, lstm_state, kv


def draft_tree(drafter: Drafter, tree: Tree, state: DrafterState, length: int) -> torch.Tensor:
    """Fill the tree with drafted tokens. Returns target ids (N+1,), index 0 left for the root.

    The newest k positions (length-k .. length-1) form the block of pass 0; older uncommitted positions are
    committed to the drafter's cache on the way.
    """
    k = tree.block_size
    pending = state.hidden_states.shape[1]
    n_commit = pending - k
    device = state.hidden_states.device

    # Pass 0 over the uncommitted positions; the LSTM only reads those it has not seen (one call per step).
    seen = 0 if state.fused is None else state.fused.shape[1]
    fused_new, state.lstm = drafter.fuse(state.hidden_states[:, seen:], state.next_ids[:, seen:], state.lstm)
    fused = fused_new if state.fused is None else torch.cat([state.fused, fused_new], dim=1)  # (1, pending, h)
    positions = torch.arange(state.committed, length, device=device)[None]
    chunk_mask = torch.cat(
        [torch.ones(pending, state.committed, dtype=torch.bool, device=device),
         relaxed_causal_mask(pending, k, device, align_end=True)], dim=1,
    )
    features, chunk_kv = drafter.decode(fused, positions, state.kv, chunk_mask[None, None])
    state.commit(n_commit, chunk_kv, fused)
    context_kv = [
        (torch.cat([keys, chunk_keys[:, :, n_commit:]], 2), torch.cat([values, chunk_values[:, :, n_commit:]], 2))
        for (keys, values), (chunk_keys, chunk_values) in zip(state.kv, chunk_kv, strict=True)
    ]

    node_tokens = torch.zeros(tree.num_nodes + 1, dtype=torch.long, device=device)
    block_features, lstm_state = features[:, n_commit:], state.lstm  # (1, k, h): predicts depths 1..k
    pass_kv: list[list] = []  # pass_kv[q - 1]: per layer (keys, values) of pass q, (B_q, kv_heads, k, d)
    for p in range(tree.num_passes):
        if p > 0:
            parent = tree.parent_branch[p]  # (B_p,) the branch of pass p-1 each branch of pass p continues
            ancestor_kv = [[(keys[ancestor], values[ancestor]) for keys, values in pass_kv[q - 1]]
                           for q, ancestor in enumerate(tree.ancestor_branch[p], start=1)]
            positions = (length + (p - 1) * k + torch.arange(k, device=device)).expand(parent.numel(), k)
            block_features, lstm_state, kv = next_pass(
                drafter, block_features[parent], (lstm_state[0][:, parent], lstm_state[1][:, parent]),
                node_tokens[tree.input_nodes[p]], positions, context_kv, ancestor_kv)
            pass_kv.append(kv)
        top = drafter.logits(block_features).topk(tree.top_ranks[p], dim=-1).indices  # (B_p, k, R)
        draft_ids = top[tree.node_branch[p], tree.node_offset[p], tree.node_rank[p]]
        node_tokens[tree.node_ids[p]] = drafter.to_target_ids(draft_ids)
    return node_tokens
