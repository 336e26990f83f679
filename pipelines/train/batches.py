"""Worker data: training windows, each worker's batches per epoch, and the per-step random generator.

Data: a deterministic distributed sampler over max_len windows of the training samples (`FeatureDataset`).
Each epoch the windows are shuffled with a seed derived from (seed, epoch); worker r takes every world-th
window of that order, and each worker reads its own windows from the store by random access. This was chosen
over Ray Data streaming ingest because the position in the data is then a pure function of the optimizer
step: a resumed run continues with exactly the batches it would have seen (Ray Data's streaming split cannot
be resumed mid-epoch), no extra Ray Data actors compete for the CPUs, and nothing is copied through the object
store. The last `len(windows) mod (world x micro_batch x accumulation)` windows of each shuffled epoch are
left out (a different few each epoch) so that every worker runs the same number of steps.

Randomness: the noise and the glancing draw of step s on worker r come from a generator seeded with
(seed, r, s), so no RNG state needs saving and a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipelines.train.config import TrainConfig

if TYPE_CHECKING:  # plan.py imports this module
    from pipelines.train.plan import TrainPlan


def training_windows(store, indices: np.ndarray, config: TrainConfig):
    """The FeatureDataset of the given samples' training windows (max_len, context_tokens)."""
    from feature_store import FeatureDataset

    return FeatureDataset(store, indices, config.max_len, config.context_tokens)


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The generator of noise and glancing for one optimizer step of one worker."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def epoch_batches(num_windows: int, epoch: int, plan: TrainPlan, rank: int, world: int) -> list[list[int]]:
    """This worker's micro-batches of window positions for one epoch, in order."""
    micro = plan.config.deepspeed.micro_batch_size
    order = np.random.default_rng([plan.config.seed, epoch]).permutation(num_windows)
    mine = order[rank::world][: plan.steps_per_epoch * plan.config.deepspeed.gradient_accumulation_steps * micro]
    return [mine[i:i + micro].tolist() for i in range(0, len(mine), micro)]


def eval_batches(num_windows: int, plan: TrainPlan, rank: int, world: int) -> list[list[int]]:
    """This worker's share of the held-out windows (a fixed random subset if eval_max_windows is set)."""
    order = np.arange(num_windows)
    if plan.config.eval_max_windows is not None and num_windows > plan.config.eval_max_windows:
        order = np.sort(np.random.default_rng([plan.config.seed, 1]).permutation(num_windows)
                        [: plan.config.eval_max_windows])
    mine = order[rank::world]
    micro = plan.config.deepspeed.micro_batch_size
    return [mine[i:i + micro].tolist() for i in range(0, len(mine), micro)]


def batch_loader(dataset, batches: Sequence[Sequence[int]], workers: int) -> Iterator[dict[str, torch.Tensor]]:
    from feature_store import collate_features

    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate_features,
                                            num_workers=workers))
