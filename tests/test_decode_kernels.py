"""falcon.decode_kernels: the grouped one-token attention equals SDPA, and the growing KV cache decodes as
transformers' DynamicCache does, through row drops and crops."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from falcon.decode_kernels import GROUPED_DECODE, GrowingLayer, grouped_decode_attention, growing_cache
from pipelines.extract.target_features import left_padded
from tests.conftest import tiny_causal_lm


class _Module:
    num_key_value_groups = 3
    is_causal = True


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("mask_rows", [1, 5])
def test_grouped_attention_equals_sdpa_on_one_token_queries(dtype, tolerance, mask_rows):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(5, 9, 1, 16, generator=generator).to(dtype)
    key, value = (torch.randn(5, 3, 40, 16, generator=generator).to(dtype) for _ in range(2))
    mask = torch.rand(mask_rows, 1, 1, 40, generator=generator) > 0.3
    mask[..., -1] = True  # every row sees its own token
    out, _ = grouped_decode_attention(_Module(), query, key, value, mask)
    expected = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), attn_mask=mask,
                                              enable_gqa=True).transpose(1, 2)
    assert out.shape == (5, 1, 9, 16) and out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=tolerance, atol=tolerance)


def test_several_query_tokens_go_to_sdpa():
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(2, 9, 4, 16, generator=generator)
    key, value = (torch.randn(2, 3, 10, 16, generator=generator) for _ in range(2))
    mask = torch.ones(2, 1, 4, 10, dtype=torch.bool).tril(6)
    out, _ = grouped_decode_attention(_Module(), query, key, value, mask)
    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, expected)


def _decode(model, cache, prompts, steps, drop_after=None, crop_at=None):
    """Left-padded batched greedy decode; returns each row's logits per step (rows dropped stay dropped)."""
    input_ids, attention_mask = left_padded(prompts, 0, "cpu")
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, past_key_values=cache)
    logits, rows, position, history = out.logits[:, -1], list(range(len(prompts))), positions[:, -1:], []
    for step in range(steps):
        history.append(dict(zip(rows, logits, strict=True)))
        if step == crop_at:  # feed a token, then take it back: the cache must return to where it was
            model(input_ids=logits.argmax(-1)[:, None], attention_mask=torch.cat(
                [attention_mask, torch.ones_like(attention_mask[:, :1])], 1), position_ids=position + 1,
                past_key_values=cache)
            cache.crop(-1)
        if step == drop_after:
            keep = torch.tensor([0, 2])
            cache.batch_select_indices(keep)
            attention_mask, position, logits = attention_mask[keep], position[keep], logits[keep]
            rows = [rows[i] for i in keep.tolist()]
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], 1)
        position = position + 1
        out = model(input_ids=logits.argmax(-1)[:, None], attention_mask=attention_mask, position_ids=position,
                    past_key_values=cache)
        logits = out.logits[:, -1]
    return history


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_growing_cache_decodes_like_dynamic_cache(family, monkeypatch):
    monkeypatch.setattr(GrowingLayer, "spare_tokens", 3)  # several reallocations within the test
    model = tiny_causal_lm(family, seed=2)
    prompts = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22]]
    with torch.inference_mode():
        expected = _decode(model, DynamicCache(), prompts, 12, drop_after=4, crop_at=7)
        model.set_attn_implementation(GROUPED_DECODE)
        got = _decode(model, growing_cache(), prompts, 12, drop_after=4, crop_at=7)
    for step_expected, step_got in zip(expected, got, strict=True):
        assert step_expected.keys() == step_got.keys()
        for row in step_expected:
            torch.testing.assert_close(step_got[row], step_expected[row], rtol=1e-5, atol=1e-5)
