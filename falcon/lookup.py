"""Context lookup: propose the tokens that followed the latest earlier occurrence of the context's last n-gram.

Small targets repeat themselves and their prompts (code, lists, quoted names), and a drafter trained on a few
thousand replies misses exactly those copies. A lookup chain hung off the tree's root catches them for the cost
of verifying a few more tokens, and costs nothing when the context holds no match (the step then verifies the
drafter's tree alone). The proposals are only proposals: verification keeps the output lossless.

How long the chain is, and whether the drafter's tree is still worth drafting, depends on the match length: how
many context tokens before the root agree with the earlier occurrence. A copy that has gone on for m tokens is
taken to go on for about growth x m more, so each fully accepted chain lengthens the next one (PLD-style growth,
1, 2, 4, 8 ... tokens with growth 1), and a rejection starts a new, short match. The policy is a function of the
context alone, so `pipelines.lookup_tuning` can replay it exactly on held-out replies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The longest chain a package may ask for: every step may verify it, and the decoder prebuilds one tree per length.
MAX_CHAIN_TOKENS = 128


@dataclass
class LookupConfig:
    num_tokens: int = 0  # chain length after a fresh (short) match; 0: lookup off
    max_ngram: int = 3  # the longest suffix matched first...
    min_ngram: int = 1  # ...then shorter ones down to this (demo MT-Bench τ 2.10 with 1, 1.83 with 2)
    max_tokens: int | None = None  # the longest chain once a match has lasted; None: num_tokens (a fixed length)
    growth: float = 1.0  # chain length = growth x match length, kept within [num_tokens, max_tokens]
    chain_only_match: int | None = None  # from this match length on, verify the chain without the drafter's tree

    def __post_init__(self) -> None:
        if self.max_tokens is None:
            self.max_tokens = self.num_tokens
        if self.num_tokens < 0:
            raise ValueError(f"lookup num_tokens must be >= 0, got {self.num_tokens}")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"lookup needs 1 <= min_ngram <= max_ngram, got {self.min_ngram} and {self.max_ngram}")
        if not self.num_tokens <= self.max_tokens <= MAX_CHAIN_TOKENS:
            raise ValueError(f"lookup needs num_tokens <= max_tokens <= {MAX_CHAIN_TOKENS}, got {self.num_tokens} "
                             f"and {self.max_tokens}")
        if not self.growth > 0:
            raise ValueError(f"lookup growth must be > 0, got {self.growth}")
        if self.chain_only_match is not None and self.chain_only_match < 1:
            raise ValueError(f"lookup chain_only_match must be >= 1 or null, got {self.chain_only_match}")

    @property
    def enabled(self) -> bool:
        return self.num_tokens > 0

    @property
    def match_cap(self) -> int:
        """Match lengths beyond this change neither the chain length nor the chain-only decision."""
        return max(math.ceil(self.max_tokens / self.growth), self.chain_only_match or 0, 1)

    def chain_length(self, match_length: int) -> int:
        """Tokens proposed after a match of `match_length` context tokens (0: no match)."""
        if not self.enabled or match_length < self.min_ngram:
            return 0
        return min(self.max_tokens, max(self.num_tokens, int(self.growth * match_length)))

    def chain_only(self, match_length: int) -> bool:
        """The match is long enough that the chain alone is verified: the drafter's pass is not worth its cost."""
        return self.chain_only_match is not None and match_length >= self.chain_only_match \
            and self.chain_length(match_length) > 0


@dataclass(frozen=True)
class Proposal:
    tokens: list[int]  # the chain to verify: the tokens that followed the matched occurrence
    chain_only: bool  # verify it without the drafter's tree


NO_PROPOSAL = Proposal([], False)


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

    def match(self, cap: int | None = None) -> tuple[int, int]:
        """(end, length): the latest earlier occurrence of the longest matching suffix, and how many context
        tokens agree with it counting back from its end, up to `cap` (default: the config's match_cap);
        (-1, 0) without a match."""
        tokens, cap = self.tokens, cap or self.config.match_cap
        for n in range(min(self.config.max_ngram, len(tokens)), self.config.min_ngram - 1, -1):
            end = self._end.get(tuple(tokens[-n:]))
            if end is not None:
                length = n
                while length < cap and length <= end and \
                        tokens[end - length] == tokens[-1 - length]:
                    length += 1
                return end, length
        return -1, 0

    def continuation(self, end: int, length: int) -> list[int]:
        """`length` tokens after the occurrence ending at `end`. A source running into the context's end repeats
        with its period: the context is in a loop, and the copy goes on copying itself."""
        period = len(self.tokens) - 1 - end
        return [self.tokens[end + 1 + i % period] for i in range(length)]

    def propose(self) -> Proposal:
        """This step's chain, as long as the match length calls for."""
        if not self.config.enabled:
            return NO_PROPOSAL
        end, match_length = self.match()
        chain_length = self.config.chain_length(match_length)
        if not chain_length:
            return NO_PROPOSAL
        return Proposal(self.continuation(end, chain_length), self.config.chain_only(match_length))
