"""A normalised conversation as token ids, with the loss mask on the assistant's tokens only."""

from __future__ import annotations

from typing import Any, TypedDict

import jinja2
import numpy as np

from pipelines.data import DataError, Rejected


class TokenizedSample(TypedDict):
    sample_id: str
    input_ids: np.ndarray  # (seq,) int32
    loss_mask: np.ndarray  # (seq,) uint8, 1 on assistant content and its end-of-turn token
    needs_generation: bool  # prompt ends with the generation prompt; a reply is still to be generated
    truncated: bool


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _assistant_char_spans(
    messages: list[dict[str, str]], tokenizer: Any, add_generation_prompt: bool
) -> tuple[str, list[tuple[int, int]]] | Rejected:
    """The rendered conversation and, per assistant turn, the [start, end) characters to train on.

    Template-agnostic: the turn starts where the rendering of the messages before it, plus the
    generation prompt, ends (so the role header is excluded) and stops where the rendering through it
    ends, minus trailing whitespace (so the end-of-turn token is included, the newline after it not).
    This needs every prefix rendering to be a prefix of the whole; templates that rewrite earlier turns
    (e.g. dropping past reasoning) are rejected rather than masked wrongly.
    """
    text = _render(tokenizer, messages, add_generation_prompt)
    spans = []
    for position, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        header_end = _render(tokenizer, messages[:position], True)
        turn_end = _render(tokenizer, messages[: position + 1], False).rstrip()
        if not (text.startswith(header_end) and text.startswith(turn_end) and len(header_end) < len(turn_end)):
            return Rejected("chat_template_mismatch", f"rendering up to message {position} is not a prefix")
        spans.append((len(header_end), len(turn_end)))
    return text, spans


def tokenize_conversation(
    messages: list[dict[str, str]], tokenizer: Any, max_len: int, *, sample_id: str
) -> TokenizedSample | Rejected:
    """Token ids of the chat-templated conversation and a mask of the tokens to train on.

    A conversation ending in a user (or system) turn is rendered with the generation prompt and flagged
    `needs_generation`. Longer than `max_len`: cut to `max_len` if assistant tokens remain and no reply
    is still to be generated, else rejected as "over_long".
    """
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("tokenize_conversation needs a fast (Rust) tokenizer for character offsets")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; set tokenizer.chat_template")
    needs_generation = messages[-1]["role"] != "assistant"
    try:
        rendered = _assistant_char_spans(messages, tokenizer, needs_generation)
    except jinja2.TemplateError as exc:
        return Rejected("chat_template_error", str(exc))
    if isinstance(rendered, Rejected):
        return rendered
    text, spans = rendered
    # The template writes its own special tokens (BOS etc.), exactly as apply_chat_template(tokenize=True).
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = np.asarray(encoding["input_ids"], dtype=np.int32)
    token_starts = np.asarray([start for start, _ in encoding["offset_mapping"]], dtype=np.int64)
    in_assistant_turn = np.zeros(len(input_ids), dtype=bool)
    for start, end in spans:
        in_assistant_turn |= (token_starts >= start) & (token_starts < end)
    loss_mask = in_assistant_turn.astype(np.uint8)
    truncated = len(input_ids) > max_len
    if truncated:
        if needs_generation or not loss_mask[:max_len].any():
            return Rejected("over_long", f"{len(input_ids)} tokens > max_len {max_len}")
        input_ids, loss_mask = input_ids[:max_len], loss_mask[:max_len]
    return TokenizedSample(
        sample_id=sample_id,
        input_ids=input_ids,
        loss_mask=loss_mask,
        needs_generation=needs_generation,
        truncated=truncated,
    )
