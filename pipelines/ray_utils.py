"""Start or join Ray the same way in every job, and describe actor pools in config.

A job either joins an existing cluster (`ray.address` in its config, or `RAY_ADDRESS`, which
`ray job submit` sets for the job's driver) or starts a private local Ray kept on loopback
(DESIGN.md §8: without `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` and a 127.0.0.1 node address Ray
binds to the machine's public interface).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass
class RayConfig:
    # Cluster to join: "auto", "ray://host:10001" or a GCS "host:port". None: RAY_ADDRESS if set
    # (as under `ray job submit`), else start a local Ray inside this process.
    address: str | None = None
    # CPUs of the local Ray a job starts itself (None: all of the machine's). Ignored when joining.
    num_cpus: int | None = None


@dataclass
class ActorPoolConfig:
    """A fixed pool of actors each holding one model (e.g. the target on one GPU)."""

    num_actors: int = 1
    # Scheduling reservations, not thread counts. Keep num_cpus fractional on small machines: actors
    # reserving whole CPUs starve the read/tokenise/write tasks and the pipeline deadlocks.
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    # torch intra-op threads per actor (None: Ray's default, OMP_NUM_THREADS = reserved CPUs, at least 1).
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        if self.num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {self.num_actors}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError(f"num_cpus and num_gpus must be >= 0, got {self.num_cpus}, {self.num_gpus}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1 or null, got {self.torch_threads}")

    def map_batches_args(self) -> dict[str, Any]:
        """Keyword arguments for `Dataset.map_batches` with a callable class on this pool."""
        import ray.data

        return {
            "compute": ray.data.ActorPoolStrategy(size=self.num_actors),
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
        }


def init_ray(config: RayConfig) -> bool:
    """Join or start Ray unless this process is already connected. True if this call connected."""
    import ray

    if ray.is_initialized():
        return False
    address = config.address or ("auto" if os.environ.get("RAY_ADDRESS") else None)
    if address is not None:
        ray.init(address=address)
    else:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(num_cpus=config.num_cpus, _node_ip_address="127.0.0.1", include_dashboard=False)
    return True


@contextmanager
def ray_session(config: RayConfig) -> Iterator[None]:
    """Ray connected for the duration of the block; disconnected after only if this block connected it."""
    import ray

    connected_here = init_ray(config)
    try:
        yield
    finally:
        if connected_here:
            ray.shutdown()
