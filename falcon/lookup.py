"""Context lookup: propose the tokens that followed the latest earlier occurrence of the context's last n-gram.

Small targets repeat themselves and their prompts (code, lists, quoted names), and a drafter trained on a few
thousand replies misses exactly those copies. A lookup chain hung off the tree's root catches them for the cost
of verifying a few more tokens, and costs nothing when the context holds no match (the step then verifies the
drafter's tree alone). The proposals are only proposals: verification keeps the output lossless.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LookupConfig:
    num_tokens: int = 0  # tokens proposed per step when the context has a match; 0: lookup off
    max_ngram: int = 3  # the longest suffix matched first...
    min_ngram: int = 1  # ...then shorter ones down to this (demo MT-Bench τ 2.10 with 1, 1.83 with 2)

    def __post_init__(self) -> None:
        if self.num_tokens < 0:
            raise ValueError(f"lookup num_tokens must be >= 0, got {self.num_tokens}")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"lookup needs 1 <= min_ngram <= max_ngram, got {self.min_ngram} and {self.max_ngram}")

    @property
    def enabled(self) -> bool:
        return self.num_tokens > 0


class NgramIndex:
    """Latest earlier occurrence of every n-gram of a growing token sequence, in O(max_ngram) per token.

    An n-gram ending at position i is indexed only once position i + 1 exists, so the context's own suffix
    never matches itself and every match has at least one token after it.
    """

    def __init__(self, config: LookupConfig, tokens: list[int] | None = None):
        self.config = config
        self.tokens: list[int] = []
        self._end: dict[tuple[int, ...], int] = {}  # n-gram -> end position of its latest indexed occurrence
        self.extend(tokens or [])

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            end = len(self.tokens) - 1  # the n-grams ending here gain a following token now
            for n in range(self.config.min_ngram, self.config.max_ngram + 1):
                if end - n + 1 >= 0:
                    self._end[tuple(self.tokens[end - n + 1:end + 1])] = end
            self.tokens.append(token)

    def continuation(self) -> list[int]:
        """Up to num_tokens tokens after the latest earlier occurrence of the longest matching suffix."""
        if not self.config.enabled:
            return []
        for n in range(min(self.config.max_ngram, len(self.tokens)), self.config.min_ngram - 1, -1):
            end = self._end.get(tuple(self.tokens[-n:]))
            if end is not None:
                return self.tokens[end + 1:end + 1 + self.config.num_tokens]
        return []
