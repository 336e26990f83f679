"""Choose the context-lookup chain (falcon.lookup) together with the drafter's tree, from measurement.

1. Replay, on the held-out positions the tree tuner measures the drafter at (`pipelines.tree_tuning`): at a
   decoding position L the context is x_0..x_L (prompt + the target's own greedy reply so far, the root x_L
   included), so the lookup finds the match the decoder would find there, and a chain token is accepted
   exactly when it equals the stored continuation x_{L+1}, x_{L+2}, ... Per position we keep the match length
   m (0: no match) and how many tokens of the longest chain considered agree with the truth. Every policy of
   `LookupConfig` is a function of m, so its chain length, its chain-only decision and its accepted tokens at
   each position follow exactly, without replaying again.
2. Joint choice: at each position a step accepts the longer of the drafter's accepted path (the tree tuner's
   replayed ranks, lost on a chain-only step) and the chain's accepted prefix, and costs drafting (none on a
   chain-only step) + verifying root, tree and chain, from the measured cost model. For every candidate
   lookup policy and every candidate tree, expected tokens per step / expected ms per step is computed over
   the steps of a decode; the pair with the most tokens per millisecond is kept. The tree's own expectation
   stays the tree tuner's model (1 + sum of node values); the chain adds its replayed gain over the tree, so
   with the chain off every figure is the tree tuner's.

   The steps are those of a walk of the decode over each sample (`decode_walk`), not every position: a step
   that accepts a tokens is followed by the step at L + a + 1, so a copy the chain accepts in one step counts
   once. An average over every position over-rates the chain: inside a repeated passage (greedy replies loop)
   each position accepts a whole chain, where a decode takes one step per chain.

Approximations: the tuner measures consecutive positions from a reply's start, and a sample's walk ends at the
last one (or, where a reply has a gap, lands on the next measured position after L + a + 1); a chain-only step
leaves the next drafter pass more positions to read, not costed; chains near a sample's end are cut by the
stored reply.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from falcon.lookup import MAX_CHAIN_TOKENS, LookupConfig, NgramIndex

LOOKUP_MODES = ("tuned", "fixed")
# The tuned policies: every combination of these within the bounds (plus lookup off).
FRESH_TOKENS = (1, 2, 3, 4, 6, 8, 12, 16)  # num_tokens: the chain after a short match
LONGEST_TOKENS = (4, 8, 16, 24, 32, 48, 64, 96, 128)  # max_tokens above num_tokens (or num_tokens: a fixed chain)
GROWTHS = (0.5, 1.0, 2.0)
CHAIN_ONLY_MATCHES = (None, 4, 8, 16, 32)
MATCH_BUCKETS = (1, 2, 3, 4, 8, 16, 32)  # report: chain acceptance by match length, from each bound up to the next


@dataclass
class LookupTuningConfig(LookupConfig):
    """package.lookup: the decoder's lookup settings as given (fixed), or chosen with the tree (tuned)."""

    mode: str = "fixed"  # fixed: the settings above | tuned: policy chosen with the tree (max_ngram and min_ngram: bounds)
    max_chain: int = 32  # tuned: the longest chain considered

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in LOOKUP_MODES:
            raise ValueError(f"lookup.mode must be one of {LOOKUP_MODES}, got {self.mode!r}")
        if not 1 <= self.max_chain <= MAX_CHAIN_TOKENS:
            raise ValueError(f"lookup.max_chain must be in [1, {MAX_CHAIN_TOKENS}], got {self.max_chain}")

    def settings(self) -> LookupConfig:
        """The decoder's settings given here (mode fixed)."""
        return LookupConfig(**{f.name: getattr(self, f.name) for f in fields(LookupConfig)})


def lookup_candidates(config: LookupTuningConfig) -> list[LookupConfig]:
    """The policies to choose among: the fixed settings alone, or lookup off and the tuned grid."""
    if config.mode == "fixed":
        return [config.settings()]
    bound = config.max_chain
    candidates = [LookupConfig(max_ngram=config.max_ngram, min_ngram=config.min_ngram)]
    for fresh, min_ngram, chain_only in itertools.product(
            [n for n in FRESH_TOKENS if n <= bound] or [bound], range(config.min_ngram, config.max_ngram + 1),
            CHAIN_ONLY_MATCHES):
        common = dict(num_tokens=fresh, max_ngram=config.max_ngram, min_ngram=min_ngram, chain_only_match=chain_only)
        candidates.append(LookupConfig(**common))
        for longest, growth in itertools.product([n for n in LONGEST_TOKENS if fresh < n <= bound], GROWTHS):
            candidates.append(LookupConfig(**common, max_tokens=longest, growth=growth))
    return candidates


# ---------------------------------------------------------------------------------------------------
# 1. Replay


@dataclass
class ChainReplay:
    """Per held-out decoding position: the lookup's match length and the chain tokens the truth agrees with."""

    match_length: np.ndarray  # (positions,) int64, 0: no match; counted up to the cap the candidates need
    agreed: np.ndarray  # (positions,) int64: leading tokens of a `max_chain`-token chain equal to the truth
    max_chain: int
    samples: np.ndarray  # (positions,) int64: the sample of each position, ascending
    positions: np.ndarray  # (positions,) int64: L, ascending within a sample

    _following: dict[int, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        sample_step, position_step = np.diff(self.samples), np.diff(self.positions)
        if not ((sample_step > 0) | ((sample_step == 0) & (position_step > 0))).all():
            raise ValueError("replay positions must be ordered by (sample, position) without repeats")

    def first_positions(self) -> np.ndarray:
        """(samples,) the index of each sample's first position."""
        return np.flatnonzero(np.r_[True, self.samples[1:] != self.samples[:-1]])

    def longest_sample(self) -> int:
        """The most positions of one sample."""
        return int(np.bincount(self.samples).max(initial=0)) if self.num_positions else 0

    def following(self, max_accepted: int) -> np.ndarray:
        """(positions + 1, max_accepted + 1) index of the step after a step at j accepting a tokens: the first
        position of the same sample at or after L_j + a + 1, or `positions` (row and value: the walk has ended)."""
        if max_accepted not in self._following:
            stride = int(self.positions.max()) + max_accepted + 2  # keys of one sample stay below the next's
            keys = self.samples * stride + self.positions  # (P,) ascending
            following = np.searchsorted(keys, keys[:, None] + np.arange(max_accepted + 1)[None] + 1)  # (P, A + 1)
            same_sample = self.samples[np.minimum(following, self.num_positions - 1)] == self.samples[:, None]
            following[(following == self.num_positions) | ~same_sample] = self.num_positions
            self._following[max_accepted] = np.concatenate(
                [following, np.full((1, max_accepted + 1), self.num_positions)])
        return self._following[max_accepted]

    @classmethod
    def concatenate(cls, parts: Sequence[ChainReplay], max_chain: int) -> ChainReplay:
        """The parts' positions in order, each part a sample of its own."""
        empty = np.zeros(0, dtype=np.int64)
        return cls(np.concatenate([p.match_length for p in parts] or [empty]),
                   np.concatenate([p.agreed for p in parts] or [empty]), max_chain,
                   np.concatenate([np.full(len(p.positions), i, dtype=np.int64) for i, p in enumerate(parts)]
                                  or [empty]),
                   np.concatenate([p.positions for p in parts] or [empty]))

    @property
    def num_positions(self) -> int:
        return len(self.match_length)

    def summary(self) -> dict[str, Any]:
        """Positions with a match, and per match length the chain tokens the truth agrees with."""
        if not self.max_chain:  # lookup off: nothing was checked
            return {"positions": self.num_positions, "with_match": int((self.match_length > 0).sum())}
        bounds = [b for b in MATCH_BUCKETS if b <= max(int(self.match_length.max(initial=0)), 1)]
        rows = []
        for low, high in zip(bounds, [*bounds[1:], None], strict=True):
            inside = (self.match_length >= low) & (self.match_length < (high or np.inf))
            if not inside.any():
                continue
            agreed = self.agreed[inside]
            label = f"{low}+" if high is None else str(low) if high == low + 1 else f"{low}-{high - 1}"
            rows.append({"match_length": label,
                         "positions": int(inside.sum()), "mean_agreed": round(float(agreed.mean()), 3),
                         "agreed_at_least": {str(n): round(float((agreed >= n).mean()), 3)
                                             for n in (1, 2, 4, 8, 16, 32, 64) if n <= self.max_chain}})
        return {"positions": self.num_positions, "with_match": int((self.match_length > 0).sum()),
                "max_chain": self.max_chain, "by_match_length": rows}


def replay_config(candidates: Sequence[LookupConfig]) -> tuple[LookupConfig, int, int]:
    """The matching every candidate shares, the match-length cap that serves them all, and the longest chain."""
    matching = LookupConfig(num_tokens=1, max_ngram=candidates[0].max_ngram,
                            min_ngram=min(c.min_ngram for c in candidates))
    return matching, max(c.match_cap for c in candidates), max(c.max_tokens for c in candidates)


def replay_chain(input_ids: Sequence[int], positions: Sequence[int], matching: LookupConfig, match_cap: int,
                 max_chain: int) -> ChainReplay:
    """The lookup at each decoding position L (ascending) of one sample, checked against the stored continuation."""
    tokens = [int(t) for t in input_ids]
    index = NgramIndex(matching)
    match_length, agreed = [], []
    for position in positions:
        index.extend(tokens[len(index.tokens):position + 1])
        end, length = index.match(match_cap)
        truth = tokens[position + 1:position + 1 + max_chain]
        chain = index.continuation(end, len(truth)) if length else []
        agreement = 0
        while agreement < len(chain) and chain[agreement] == truth[agreement]:
            agreement += 1
        match_length.append(length)
        agreed.append(agreement)
    return ChainReplay(np.array(match_length, dtype=np.int64), np.array(agreed, dtype=np.int64), max_chain,
                       np.zeros(len(positions), dtype=np.int64), np.array(positions, dtype=np.int64))


def decode_walk(replay: ChainReplay, accepted: np.ndarray) -> np.ndarray:
    """(positions, trees) bool: the step starts of a greedy decode over each sample, one walk per tree.

    accepted (positions, trees): draft tokens a step starting at that position accepts. Each walk starts at its
    sample's first position; a step at L accepting a tokens (plus the target's own) is followed by the step at
    the first measured position >= L + a + 1 of the same sample.
    """
    num_positions, num_trees = accepted.shape
    if not num_positions:
        return np.zeros((0, num_trees), dtype=bool)
    following = replay.following(int(accepted.max()))  # (P + 1, A + 1)
    accepted = np.concatenate([accepted, np.zeros((1, num_trees), dtype=accepted.dtype)])  # row P: the walk ended
    visits = np.zeros((num_positions + 1, num_trees), dtype=bool)
    at = np.repeat(replay.first_positions()[:, None], num_trees, axis=1)  # (samples, trees) current step starts
    trees = np.arange(num_trees)[None]
    for _ in range(replay.longest_sample()):  # a step advances by one measured position at least
        visits[at, trees] = True
        at = following[at, accepted[at, trees]]
    return visits[:num_positions]


def walk_mean(values: np.ndarray, walked: np.ndarray) -> np.ndarray:
    """(trees,) the mean of values (positions, trees) over each tree's walked step starts."""
    return (values * walked).sum(0) / np.maximum(walked.sum(0), 1)


# ---------------------------------------------------------------------------------------------------
# 2. Joint choice


@dataclass
class TreeCandidates:
    """The trees a lookup policy is paired with: tree n's nodes, expected tau, drafting ms and replayed depths."""

    paths: list[list[tuple[int, ...]]]
    expected_tau: np.ndarray  # (trees,) the tree tuner's model: 1 + sum of node values
    draft_ms: np.ndarray  # (trees,)
    accepted: np.ndarray  # (positions, trees) drafter tokens accepted at each held-out position (greedy replay)

    @property
    def nodes(self) -> np.ndarray:
        return np.array([len(p) for p in self.paths])


@dataclass
class JointFigures:
    """One (policy, tree) pair: per-step expectations over the held-out positions."""

    lookup: LookupConfig
    tree: int  # index into TreeCandidates
    nodes: int  # drafter nodes of that tree
    expected_tau: float
    empirical_tau: float
    step_ms: float
    expected_speedup: float

    def to_dict(self) -> dict[str, Any]:
        return {"lookup": asdict(self.lookup), "nodes": self.nodes, "expected_tau": self.expected_tau,
                "empirical_tau": self.empirical_tau, "step_ms": self.step_ms, "expected_speedup": self.expected_speedup}


def evaluate_policy(policy: LookupConfig, trees: TreeCandidates, replay: ChainReplay, verify_ms: np.ndarray,
                    plain_ms: float, tree_alone: np.ndarray | None = None) -> list[JointFigures]:
    """Expected figures of `policy` with every candidate tree. verify_ms[n]: ms to verify n tokens; tree_alone:
    `tree_alone_per_step(trees, replay)`, the same for every policy."""
    cap = int(replay.match_length.max(initial=0))
    lengths = np.array([policy.chain_length(m) for m in range(cap + 1)])[replay.match_length]  # (P,)
    chain_only = np.array([policy.chain_only(m) for m in range(cap + 1)])[replay.match_length]
    if lengths.max(initial=0) > replay.max_chain:
        raise ValueError(f"policy proposes {lengths.max()} tokens, the replay checked {replay.max_chain}")
    chain_accepted = np.minimum(replay.agreed, lengths)[:, None]  # (P, 1)
    drafted = ~chain_only[:, None]  # (P, 1)
    accepted = np.maximum(trees.accepted * drafted, chain_accepted)  # (P, trees)
    walked = decode_walk(replay, accepted)
    empirical = 1.0 + walk_mean(accepted, walked)
    gain = empirical - 1.0 - (tree_alone_per_step(trees, replay) if tree_alone is None else tree_alone)
    step_ms = walk_mean(drafted * trees.draft_ms[None] + verify_ms[1 + drafted * trees.nodes[None] + lengths[:, None]],
                        walked)
    tau = trees.expected_tau + gain
    return [JointFigures(policy, n, len(trees.paths[n]), float(tau[n]), float(empirical[n]), float(step_ms[n]),
                         float(tau[n] * plain_ms / step_ms[n])) for n in range(len(trees.paths))]


def tree_alone_per_step(trees: TreeCandidates, replay: ChainReplay) -> np.ndarray:
    """(trees,) drafter tokens accepted per step of the decode without the chain."""
    return walk_mean(trees.accepted, decode_walk(replay, trees.accepted))


def choose_lookup(candidates: Sequence[LookupConfig], trees: TreeCandidates, replay: ChainReplay,
                  verify_ms: np.ndarray, plain_ms: float, keep: int = 10) -> list[JointFigures]:
    """The `keep` best (policy, tree) pairs by expected speedup, best first (one row per policy)."""
    tree_alone = tree_alone_per_step(trees, replay)
    best_per_policy = [max(evaluate_policy(policy, trees, replay, verify_ms, plain_ms, tree_alone),
                           key=lambda f: f.expected_speedup) for policy in candidates]
    return sorted(best_per_policy, key=lambda f: -f.expected_speedup)[:keep]


def resolve_lookup(mode: str, candidates: Sequence[LookupConfig], trees: TreeCandidates, replay: ChainReplay,
                   verify: Callable[[int], float]) -> tuple[JointFigures, dict[str, Any]]:
    """The best (policy, tree) pair and the report's lookup section; verify(n): measured ms to verify n tokens."""
    plain_ms = verify(1)
    verify_ms = np.array([verify(n) for n in range(int(trees.nodes.max()) + 2 + replay.max_chain)])
    ranking = choose_lookup(candidates, trees, replay, verify_ms, plain_ms)
    best = ranking[0]
    tree_only = evaluate_policy(LookupConfig(), trees, replay, verify_ms, plain_ms)[best.tree]
    return best, {"mode": mode, "settings": asdict(best.lookup), "tree_only": tree_only.to_dict(),
                  "replay": replay.summary(), "ranking": [row.to_dict() for row in ranking]}


def describe_lookup(lookup: LookupConfig) -> str:
    """One line for job output."""
    if not lookup.enabled:
        return "context lookup: off"
    length = (f"{lookup.num_tokens} tokens" if lookup.max_tokens == lookup.num_tokens else
              f"{lookup.num_tokens}..{lookup.max_tokens} tokens ({lookup.growth:g} x the match length)")
    alone = (f", verified alone (no drafter pass) from a match of {lookup.chain_only_match}"
             if lookup.chain_only_match is not None else "")
    return f"context lookup: a chain of {length} after {lookup.max_ngram}..{lookup.min_ngram}-gram matches{alone}"
