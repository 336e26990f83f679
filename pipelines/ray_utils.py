"""Start or join Ray the same way in every job, and describe actor pools in config.

A job either joins an existing cluster (`ray.address` in its config, or `RAY_ADDRESS`, which
`ray job submit` sets for the job's driver) or starts a private local Ray kept on loopback
(without `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` and a 127.0.0.1 node address Ray binds to the machine's public
interface).
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


def free_ports(n: int) -> list[int]:
    """n TCP ports free on loopback right now."""
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@dataclass
class RayHead:
    address: str  # the job API (dashboard) URL, for `ray job submit --address`
    env: dict[str, str]  # environment for the `ray` CLI and job clients
    log_path: str


@contextmanager
def local_ray_head(log_path: str, num_cpus: int | None = None, timeout: float = 120) -> Iterator[RayHead]:
    """A private Ray head on loopback, for `ray job submit`, stopped (with everything it started) on exit.

    It runs as `ray start --head --block` in its own process group, so stopping it ends exactly this head's
    processes (`ray stop` would also stop any other Ray on the machine). Every port is picked free, so it
    can run beside another Ray. Ray 2.60 turns token auth on for local clusters; RAY_AUTH_MODE=token in
    `env` makes job clients send the token too.
    """
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    use_token_auth()
    bin_dir = Path(sys.executable).parent
    ports = dict(zip(["port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
                      "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
                      "node-manager-port", "object-manager-port"], free_ports(9), strict=True))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    command = [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
               "--dashboard-host=127.0.0.1", "--disable-usage-stats", f"--temp-dir={temp_dir}",
               *(f"--{name}={port}" for name, port in ports.items())]
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    # Token auth needs a token before the head starts; on a fresh machine there is none yet. This creates
    # ~/.ray/auth_token only if it is missing (what `ray.init()` does for a local cluster).
    subprocess.run([str(bin_dir / "ray"), "get-auth-token", "--generate"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with open(log_path, "w") as log:
        head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for_job_api(address, head, log_path, timeout)
            yield RayHead(address, env, log_path)
        finally:
            _stop_process_group(head)
            shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_process_group(process) -> None:
    """SIGTERM the process's group (`ray start --block` then stops everything it started), SIGKILL after 30 s."""
    import signal
    import subprocess

    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except ProcessLookupError:  # already gone (the head failed to start)
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def use_token_auth() -> None:
    """Make this process's Ray clients send the local token (~/.ray/auth_token) that a head started by
    `ray start` requires. Ray caches the auth mode when it is first imported, so setting RAY_AUTH_MODE
    later is not enough: the cached config is refreshed the way Ray itself does on `ray.init`."""
    from ray._raylet import Config

    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")


def _wait_for_job_api(address: str, head, log_path: str, timeout: float) -> None:
    import time
    from pathlib import Path

    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout
    while True:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}:\n{Path(log_path).read_text()[-3000:]}")
        try:
            JobSubmissionClient(address).list_jobs()
            return
        except Exception as exc:  # connection refused until the dashboard is up
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray job API at {address} not up after {timeout:.0f} s: {exc}") from exc
            time.sleep(1)


def use_torch_threads(threads: int | None) -> int:
    """Set torch's intra-op threads: `threads`, or every core when None. Ray starts job drivers and workers with
    OMP_NUM_THREADS=1, which suits data-parallel workers but not a latency benchmark or tree timing run in the
    job's own process. Returns the number set."""
    import torch

    count = threads or os.cpu_count() or 1
    torch.set_num_threads(count)
    return count
