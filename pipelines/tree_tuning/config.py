"""The `tree` section of packaging (`TreeTuningConfig`), its error, and the named tree shapes (presets)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from falcon.errors import FalconError

TREE_MODES = ("tuned", "preset", "fixed")


class TreeTuningError(FalconError, ValueError):
    """The tree cannot be tuned or resolved as configured; the message says why."""


@dataclass(frozen=True)
class Preset:
    """A named tree shape: the bounds `construction.preset_tree` builds it within."""
    block_size: int
    depth: int
    nodes: int
    max_ranks: tuple[int, ...]


# The paper's k=2 trees are hand-tuned per model family (4 passes, depth 8, about 166 nodes, top-20 at the
# root, at most 10 deeper). The exact lists are not reproduced here: this preset is the greedy construction
# of `construction.preset_tree` run on `paper_like_prior` with the same bounds, a tree of the same size and depth.
PRESETS = {
    "falcon-k2": Preset(block_size=2, depth=8, nodes=166, max_ranks=(20, 10)),
    "falcon-k2-small": Preset(block_size=2, depth=8, nodes=32, max_ranks=(8, 4)),
}


@dataclass
class TreeTuningConfig:
    mode: str = "tuned"  # tuned: measured construction | preset: a named shape | fixed: `paths` or `branching`
    preset: str = "falcon-k2"  # with mode preset (see PRESETS)
    paths: list[list[int]] | None = None  # with mode fixed: explicit rank paths
    branching: list[int] | None = None  # with mode fixed: children per node at each depth
    max_nodes: int = 64  # draft tokens in the tree, root excluded
    max_depth: int | None = None  # None: the drafter's max_tree_depth (max_passes x block_size)
    max_ranks: list[int] = field(default_factory=lambda: [8, 4])  # top-R bound per depth; the last repeats
    max_samples: int | None = None  # held-out samples read (None: all of the split)
    max_positions: int = 4000  # decoding positions measured, spread evenly over the samples
    batch_positions: int = 32  # positions drafted together (memory: batch x context x kv size)
    cache_length: int = 256  # context length of the timing runs
    timing_repeats: int = 7  # rounds timing every size once (after a warm-up); median per size

    def __post_init__(self) -> None:
        if self.mode not in TREE_MODES:
            raise ValueError(f"tree.mode must be one of {TREE_MODES}, got {self.mode!r}")
        if self.mode == "fixed" and (self.paths is None) == (self.branching is None):
            raise ValueError("tree.mode fixed needs exactly one of tree.paths or tree.branching")
        if self.mode == "preset" and self.preset not in PRESETS:
            raise ValueError(f"unknown tree.preset {self.preset!r}; known: {sorted(PRESETS)}")
        checks = {
            "max_nodes": self.max_nodes, "max_positions": self.max_positions,
            "batch_positions": self.batch_positions, "cache_length": self.cache_length,
            "timing_repeats": self.timing_repeats,
        }
        for name, value in checks.items():
            if value < 1:
                raise ValueError(f"tree.{name} must be >= 1, got {value}")
        if not self.max_ranks or any(r < 1 for r in self.max_ranks):
            raise ValueError(f"tree.max_ranks must be a non-empty list of ranks >= 1, got {self.max_ranks}")
        if self.max_depth is not None and self.max_depth < 1:
            raise ValueError(f"tree.max_depth must be >= 1 or null, got {self.max_depth}")


def ranks_per_depth(max_ranks: Sequence[int], depth: int) -> list[int]:
    """The rank bound of each depth 1..depth: `max_ranks` with its last entry repeated."""
    return [max_ranks[min(d, len(max_ranks) - 1)] for d in range(depth)]
