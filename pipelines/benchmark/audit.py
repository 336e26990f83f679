"""The losslessness audit: where an output first leaves plain greedy decoding, and whether that is a numerical tie.

At the first divergence the target is re-run on prompt + common prefix in the inference dtype and in higher
precision; the divergence is a tie when the exact margin between the two tokens is within `tie_factor` times
(the rounding error the inference dtype made on that margin + one ulp of the logits), else real.
"""

from __future__ import annotations

import math
from typing import Any

import torch

REFERENCE_DTYPE = {torch.bfloat16: torch.float32, torch.float16: torch.float32, torch.float32: torch.float64}


MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


def ulp(dtype: torch.dtype, magnitude: float) -> float:
    """Spacing of `dtype` numbers at |magnitude|: the rounding step of a logit stored in that dtype."""
    exponent = math.floor(math.log2(max(abs(magnitude), torch.finfo(dtype).tiny)))
    return 2.0 ** (exponent - MANTISSA_BITS[dtype])


def first_divergence(reference: list[int], other: list[int]) -> int | None:
    for i, (a, b) in enumerate(zip(reference, other, strict=False)):
        if a != b:
            return i
    return None if len(reference) == len(other) else min(len(reference), len(other))


class DivergenceAuditor:
    """Classifies the first divergence of a method's output from plain greedy decoding.

    At the divergence the reference chose token a and the method token b. Both are greedy choices, made from
    logits computed along different paths (one token at a time vs. a batched tree), so they can differ only
    through rounding. The target is re-run on prompt + common prefix twice: in the inference dtype, and in a
    higher precision (float32 for bf16/fp16, float64 for float32) standing in for exact arithmetic. Let m be
    the exact margin logit(a) - logit(b), e the rounding error the inference dtype made on that margin along
    this path (|m_inference - m|), and u one unit in the last place of the logits in the inference dtype (each
    path rounds its output logits independently: in bf16 logits near 20 come in steps of 0.125). The
    divergence is a numerical tie when |m| <= tie_factor x (e + u): rounding of the size observed there can
    flip the choice. Otherwise it is real: a bug, not arithmetic. An output that is a strict
    prefix of the other is real too (both stop at the same EOS tokens, so no close choice explains it).
    """

    def __init__(self, target, tie_factor: float):
        self.target, self.tie_factor = target, tie_factor
        self._reference_model = None

    def _reference(self):
        if self._reference_model is None:  # made once, at the first divergence: it costs a copy of the weights
            import copy

            self._reference_model = copy.deepcopy(self.target).to(REFERENCE_DTYPE[self.target.dtype])
        return self._reference_model

    @staticmethod
    def _last_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(input_ids=input_ids).logits[0, -1].double()  # (vocab,)

    def audit(self, prompt_ids: torch.Tensor, reference: list[int], other: list[int], index: int) -> dict[str, Any]:
        prefix = torch.tensor([reference[:index]], dtype=prompt_ids.dtype, device=prompt_ids.device)
        input_ids = torch.cat([prompt_ids, prefix], dim=1)  # (1, prompt + index)
        inference = self._last_logits(self.target, input_ids)
        exact = self._last_logits(self._reference(), input_ids)
        a = reference[index] if index < len(reference) else None
        b = other[index] if index < len(other) else None
        if a is None or b is None:  # one output is a strict prefix of the other: no choice was close, a bug
            return {"index": index, "reference_token": a, "method_token": b, "kind": "real"}
        exact_margin = float(exact[a] - exact[b])
        error = abs(float(inference[a] - inference[b]) - exact_margin)
        logit_ulp = ulp(self.target.dtype, max(abs(float(inference[a])), abs(float(inference[b]))))
        bound = self.tie_factor * (error + logit_ulp)
        tie = abs(exact_margin) <= bound
        return {
            "index": index, "reference_token": a, "method_token": b,
            "exact_margin": exact_margin, "rounding_error": error, "logit_ulp": logit_ulp, "tie_bound": bound,
            "inference_margin": float(inference[a] - inference[b]),
            "exact_top1": int(exact.argmax()), "kind": "tie" if tie else "real",
        }
