"""Start or join Ray the same way in every job, and describe actor pools in config.

A job either joins an existing cluster (`ray.address` in its config, or `RAY_ADDRESS`, which
`ray job submit` sets for the job's driver) or starts a private local Ray kept on loopback
(without `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` and a 127.0.0.1 node address Ray binds to the machine's public
interface).
"""

from __future__ import annotations

import contextlib
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
    # Memory each actor reserves (GB; None: none). Ray places actors by it, and Ray Data warns every 30 s
    # about actors that use more than they asked for (a model's weights and KV cache do).
    memory_gb: float | None = None

    def __post_init__(self) -> None:
        if self.num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {self.num_actors}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError(f"num_cpus and num_gpus must be >= 0, got {self.num_cpus}, {self.num_gpus}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1 or null, got {self.torch_threads}")
        if self.memory_gb is not None and self.memory_gb <= 0:
            raise ValueError(f"memory_gb must be > 0 or null, got {self.memory_gb}")

    def map_batches_args(self) -> dict[str, Any]:
        """Keyword arguments for `Dataset.map_batches` with a callable class on this pool."""
        import ray.data

        args = {"compute": ray.data.ActorPoolStrategy(size=self.num_actors), "num_cpus": self.num_cpus,
                "num_gpus": self.num_gpus}
        if self.memory_gb is not None:
            args["memory"] = int(self.memory_gb * 1e9)
        return args


def quiet_ray_data() -> None:
    """Ray Data's console: warnings only. In a job's log (not a terminal) it prints its progress as blocks of
    "Total Progress" lines every few seconds; those and the rest of its log still go to ray-data.log in the Ray
    session's logs. A stage shows one progress bar of its own instead."""
    import logging

    import ray.data  # noqa: F401  (sets up Ray Data's loggers: a session file and the console)
    from ray._private.log import PlainRayHandler

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, PlainRayHandler):
            handler.setLevel(logging.WARNING)


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
    gcs_address: str  # host:port that other nodes join (`ray start --address`)
    env: dict[str, str]  # environment for the `ray` CLI and job clients
    log_path: str


HEAD_PORTS = ["port", "dashboard-port", "ray-client-server-port"]
NODE_PORTS = ["dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
              "metrics-export-port", "node-manager-port", "object-manager-port"]


@contextmanager
def local_ray_head(log_path: str, num_cpus: int | None = None, timeout: float = 120,
                   node_ip: str = "127.0.0.1") -> Iterator[RayHead]:
    """A private Ray head on loopback, for `ray job submit`, stopped (with everything it started) on exit.

    It runs as `ray start --head --block` in its own process group, so stopping it ends exactly this head's
    processes (`ray stop` would also stop any other Ray on the machine). Every port is picked free, so it
    can run beside another Ray. Ray 2.60 turns token auth on for local clusters; RAY_AUTH_MODE=token in
    `env` makes job clients send the token too. Ray's own logs are copied to `ray-logs/` beside `log_path` when
    it stops. A head that other nodes join (`ray_worker_node`) needs a
    `node_ip` other than 127.0.0.1, e.g. 127.0.0.2 (see there).
    """
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    use_token_auth()
    bin_dir = Path(sys.executable).parent
    ports = dict(zip(HEAD_PORTS + NODE_PORTS, free_ports(len(HEAD_PORTS + NODE_PORTS)), strict=True))
    # No drain on SIGTERM: Ray otherwise waits up to 30 s for Serve replicas (none here) before stopping a node.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    command = [str(bin_dir / "ray"), "start", "--head", "--block", f"--node-ip-address={node_ip}",
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
            yield RayHead(address, f"{node_ip}:{ports['port']}", env, log_path)
        finally:
            stop_process_group(head)
            # The full logs of every Ray process and job (Ray Data's included) stay beside the head's log.
            session_logs = Path(temp_dir) / "session_latest" / "logs"
            with contextlib.suppress(OSError):  # a log rotated away while copied is not worth failing for
                shutil.copytree(session_logs, Path(log_path).parent / "ray-logs", dirs_exist_ok=True)
            shutil.rmtree(temp_dir, ignore_errors=True)


START_ATTEMPTS = 3


@contextmanager
def ray_worker_node(head: RayHead, log_path: str, num_cpus: int, node_ip: str, timeout: float = 120):
    """Another node joining `head` (`ray start --address --block` in its own process group), as a second
    machine would; yields its process, whose group is the node (SIGKILL it to lose the node), stopped on exit.

    Each node of a cluster on one machine takes its own loopback address (127.0.0.2, 127.0.0.3, ...), which
    Linux routes to `lo` without any set-up. Not 127.0.0.1: with multi-node clusters enabled (the CLI refuses
    to start a worker node otherwise), Ray rewrites "localhost" addresses to the machine's public interface.
    """
    import subprocess
    import sys
    from pathlib import Path

    bin_dir = Path(sys.executable).parent
    ports = dict(zip(NODE_PORTS, free_ports(len(NODE_PORTS)), strict=True))
    command = [str(bin_dir / "ray"), "start", f"--address={head.gcs_address}", "--block",
               f"--node-ip-address={node_ip}", f"--num-cpus={num_cpus}", "--disable-usage-stats",
               *(f"--{name}={port}" for name, port in ports.items())]
    env = {**head.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    for attempt in range(1, START_ATTEMPTS + 1):
        with open(log_path, "a") as log:
            node = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for_node(head, node_ip, node, log_path, timeout)
            break
        except RuntimeError:
            gave_up = node.poll() is not None  # rather than still waiting at our timeout
            stop_process_group(node)
            # `ray start` gives up when its raylet has not registered within 30 s (fixed in Ray), which a busy
            # machine can exceed: start it again, as a cluster launcher would.
            if attempt == START_ATTEMPTS or not gave_up:
                raise
    try:
        yield node
    finally:
        stop_process_group(node)


def task_error_cause(error: BaseException) -> BaseException:
    """What a Ray task or actor raised: Ray re-raises it as a RayTaskError that subclasses its type (so `except`
    clauses still match) but whose str() is the worker's whole traceback."""
    from ray.exceptions import RayTaskError

    cause = getattr(error, "cause", None) if isinstance(error, RayTaskError) else None
    return cause if cause is not None else error


def alive_nodes(head: RayHead) -> dict[str, str]:
    """node id -> node IP of the cluster's alive nodes, from Ray's state API."""
    from ray.util.state import list_nodes

    # Filtered here, not by the API: with a filter it counts the dead nodes as missing output and raises.
    nodes = list_nodes(address=head.address, limit=10_000, raise_on_missing_output=False)
    return {n.node_id: n.node_ip for n in nodes if n.state == "ALIVE"}


def stop_process_group(process) -> None:
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


def _wait_for_node(head: RayHead, node_ip: str, node, log_path: str, timeout: float) -> None:
    import time
    from pathlib import Path

    deadline = time.monotonic() + timeout
    while node_ip not in alive_nodes(head).values():
        if node.poll() is not None:
            raise RuntimeError(f"ray start exited with {node.returncode}:\n{Path(log_path).read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"node {node_ip} did not join {head.gcs_address} within {timeout:.0f} s")
        time.sleep(1)
    _wait_until_blocking(log_path, deadline)


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
            break
        except Exception as exc:  # connection refused until the dashboard is up
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray job API at {address} not up after {timeout:.0f} s: {exc}") from exc
            time.sleep(1)
    _wait_until_blocking(log_path, deadline)


def _wait_until_blocking(log_path: str, deadline: float) -> None:
    """Until `ray start --block` says it blocks (or the deadline): a SIGTERM that comes earlier, while it still
    sets itself up, goes unanswered and stopping it then costs our 30 s SIGKILL timeout."""
    import time
    from pathlib import Path

    while "will now block" not in Path(log_path).read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.2)


def use_torch_threads(threads: int | None) -> int:
    """Set torch's intra-op threads: `threads`, or every core when None. Ray starts job drivers and workers with
    OMP_NUM_THREADS=1, which suits data-parallel workers but not a latency benchmark or tree timing run in the
    job's own process. Returns the number set."""
    import torch

    count = threads or os.cpu_count() or 1
    torch.set_num_threads(count)
    return count
