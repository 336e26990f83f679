"""The target's per-token features: final-norm hidden states, top-k logits and the full-vocabulary logsumexp.

Two ways to get them, pure torch:
- `forward_features`: one forward over sequences that are already complete (a dataset's own replies);
- `greedy_replies_with_features`: the target writes greedy replies and its features are kept from that same
  decode (prefill + one step per token over the KV cache), so a generated reply is never run a second time.
  On 2 CPU threads the second forward cost 60 % of the generation time (SmolLM2-135M, fp32, 64 prompts).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from falcon.decode_kernels import growing_cache

LOGITS_CHUNK_BYTES = 1 << 26  # float32 logits computed at once (64 MiB)


def forward_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Positions of samples grouped into forward batches, longest first, so that each batch's padded size
    (rows x its longest sample) stays within max_tokens; a longer sample goes alone."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        # Descending order: a batch's first sample is its longest.
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def forward_features(decoder, lm_head, sequences: Sequence, topk: int) -> list[dict[str, Any]]:
    """Per sequence: `hidden_states` (T, h) in the model's dtype, the final-norm states the LM head reads,
    and with topk > 0 float32 `topk_values` (T, k) logits, `topk_indices` (T, k), `logsumexp` (T,).

    The sequences run as one right-padded batch; real tokens never attend to padding (causal mask),
    so each equals its unbatched forward up to floating-point rounding.
    """
    device = lm_head.weight.device
    lengths = [len(sequence) for sequence in sequences]
    input_ids = torch.zeros(len(sequences), max(lengths), dtype=torch.long, device=device)  # (B, T)
    attention_mask = torch.zeros_like(input_ids)
    for row, sequence in enumerate(sequences):
        input_ids[row, : lengths[row]] = torch.as_tensor(sequence, device=device)
        attention_mask[row, : lengths[row]] = 1
    with torch.inference_mode():
        hidden_states = decoder(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state  # (B, T, h)
        real_tokens = hidden_states[attention_mask.bool()]  # (sum of lengths, h), sequence after sequence
        features = {"hidden_states": real_tokens}
        if topk:
            features |= logit_summary(lm_head, real_tokens, topk)
    per_sequence = {name: torch.split(values, lengths) for name, values in features.items()}
    return [{name: per_sequence[name][row] for name in features} for row in range(len(sequences))]


def summarise_logits(logits: torch.Tensor, topk: int) -> dict[str, torch.Tensor]:
    """(N, vocab) logits -> float32 top-k values (N, k), int32 indices (N, k) and logsumexp (N,)."""
    logits = logits.float()
    top = logits.topk(topk, dim=-1)
    return {"topk_values": top.values, "topk_indices": top.indices.to(torch.int32),
            "logsumexp": logits.logsumexp(dim=-1)}


def logit_summary(lm_head, hidden_states, topk: int) -> dict[str, Any]:
    """`summarise_logits` of the LM head over (T, h) hidden states, in chunks of bounded memory."""
    chunk = max(1, LOGITS_CHUNK_BYTES // (4 * lm_head.weight.shape[0]))
    parts = [summarise_logits(lm_head(hidden_states[start : start + chunk]), topk)
             for start in range(0, hidden_states.shape[0], chunk)]
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


def generation_batches(prompt_lengths: Sequence[int], budgets: Sequence[int], max_rows: int,
                       max_tokens: int) -> list[list[int]]:
    """Prompts grouped for batched decoding, similar lengths together (less padding): at most max_rows per
    batch and rows x (longest prompt + largest budget) <= max_tokens, which bounds the KV cache."""
    order = sorted(range(len(prompt_lengths)), key=lambda i: (prompt_lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches:
            batch = batches[-1] + [i]  # ascending order: the new prompt is the longest
            size = len(batch) * (prompt_lengths[i] + max(budgets[j] for j in batch))
            if len(batch) <= max_rows and size <= max_tokens:
                batches[-1] = batch
                continue
        batches.append([i])
    return batches


@torch.inference_mode()
def greedy_replies_with_features(decoder, lm_head, prompts: Sequence[Sequence[int]], budgets: Sequence[int],
                                 eos_token_ids: set[int], topk: int, max_rows: int = 64,
                                 max_tokens: int = 16384) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
    """Per prompt: (greedy reply ids, features over prompt + reply tokens), as `forward_features` gives them.

    A reply stops at its first EOS (kept) or at its own budget. Prompts are left-padded in batches; a batch
    drops its finished rows from the KV cache, so short replies do not cost the long ones' steps. A batched
    reply can differ from the unbatched one where two logits are within float noise of each other (padding
    changes the reduction order); either is the target's own greedy output, which is what the drafter learns.
    """
    results: list[Any] = [None] * len(prompts)
    for batch in generation_batches([len(p) for p in prompts], budgets, max_rows, max_tokens):
        outputs = _decode_batch(decoder, lm_head, [prompts[i] for i in batch], [budgets[i] for i in batch],
                                eos_token_ids, topk)
        for i, output in zip(batch, outputs, strict=True):
            results[i] = output
    return results


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (n, longest): prompts right-aligned so their next tokens line up."""
    longest = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt):] = torch.as_tensor(prompt, device=device)
        attention_mask[row, longest - len(prompt):] = 1
    return input_ids, attention_mask


def _decode_batch(decoder, lm_head, prompts, budgets, eos_token_ids: set[int], topk: int):
    device = lm_head.weight.device
    input_ids, attention_mask = left_padded(prompts, 0, device)  # (n, longest)
    n, longest = input_ids.shape
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (n, longest): each prompt starts at 0
    cache = growing_cache()
    hidden_states = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                            past_key_values=cache, use_cache=True).last_hidden_state  # (n, longest, h)
    prompt_features = [hidden_states[row, longest - len(prompt):] for row, prompt in enumerate(prompts)]
    logits = lm_head(hidden_states[:, -1])  # (n, vocab): the first reply token of every row
    replies: list[list[int]] = [[] for _ in prompts]
    step_features: list[list[dict[str, torch.Tensor]]] = [[] for _ in prompts]
    live, position = list(range(n)), positions[:, -1:]  # rows still decoding; (n_live, 1)
    while live:
        next_tokens = logits.argmax(-1)  # (n_live,)
        for row, token in zip(live, next_tokens.tolist(), strict=True):
            replies[row].append(token)
        # Feed every live row its new token: the state it yields is that token's feature, and its logits
        # pick the next token of the rows that go on.
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        position = position + 1
        hidden = decoder(input_ids=next_tokens[:, None], attention_mask=attention_mask, position_ids=position,
                         past_key_values=cache, use_cache=True).last_hidden_state[:, -1]  # (n_live, h)
        logits = lm_head(hidden)  # (n_live, vocab)
        summary = summarise_logits(logits, topk) if topk else {}
        for j, row in enumerate(live):
            step_features[row].append({"hidden_states": hidden[j], **{k: v[j] for k, v in summary.items()}})
        going_on = [j for j, row in enumerate(live)
                    if replies[row][-1] not in eos_token_ids and len(replies[row]) < budgets[row]]
        if len(going_on) < len(live):
            keep = torch.as_tensor(going_on, dtype=torch.long, device=device)
            cache.batch_select_indices(keep)
            attention_mask, position, logits = attention_mask[keep], position[keep], logits[keep]
            live = [live[j] for j in going_on]
    outputs = []
    for row in range(n):
        # The last reply token's state was computed like the others; the prompt's logits come from its states.
        features = {"hidden_states": torch.cat([prompt_features[row],
                                                torch.stack([f["hidden_states"] for f in step_features[row]])])}
        if topk:
            prompt_summary = logit_summary(lm_head, prompt_features[row], topk)
            features |= {name: torch.cat([prompt_summary[name], torch.stack([f[name] for f in step_features[row]])])
                         for name in prompt_summary}
        outputs.append((replies[row], features))
    return outputs


def hidden_for_storage(hidden_states, hidden_dtype: str) -> np.ndarray:
    """(T, h) hidden states in the store's storage dtype: bfloat16 bits as uint16, or float16."""
    if hidden_dtype == "bfloat16":
        return hidden_states.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    half = hidden_states.to(torch.float16)
    if not torch.isfinite(half).all():
        raise ValueError(
            f"hidden states overflow float16 (max |x| = {hidden_states.abs().max().item():.4g}); "
            "set hidden_dtype: bfloat16"
        )
    return half.cpu().numpy()
