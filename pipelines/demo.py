"""The whole pipeline as Ray jobs on a private loopback Ray head: fetch, extract, train, package, benchmark.

    python -m pipelines.demo --config smollm2-demo [--set section.key=value ...] [--steps extract,train]
    make demo [CONFIG=smollm2-cpu-full]

Each step is submitted as a Ray job (through the job API that `ray job submit` uses, its log streamed) to a head
this command starts on 127.0.0.1 and stops at the end, whatever happens. A step that does not end SUCCEEDED
stops the demo with its status and the tail of its log; a step running past --step-timeout is stopped the same
way. Re-running resumes: every job skips what its earlier runs committed (shards, checkpoints, the registered
version).

The head shares this machine's file system, so each job runs in the repository (`cd` in its entrypoint) and
the config's relative paths (data/, runs/) mean the same files for every step. On a real cluster, submit the
jobs yourself with `--working-dir .` and shared-storage or fsspec paths in the config (README).

`--set section.key=value` (or `mlflow.key=value`) reaches every job: one section's value may derive another's.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
import time
import uuid
from pathlib import Path

from falcon.errors import FalconError
from pipelines.benchmark import REPORT_MD
from pipelines.config import ConfigError
from pipelines.ray_utils import RayHead, local_ray_head
from pipelines.run_config import check_run_config

REPO = Path(__file__).resolve().parents[1]
STEPS = {  # step: (job script, config section or None)
    "fetch": ("jobs/fetch_data.py", None),
    "extract": ("jobs/extract_features.py", "extract"),
    "train": ("jobs/train_csgd.py", "train"),
    "package": ("jobs/package_drafter.py", "package"),
    "benchmark": ("jobs/benchmark.py", "benchmark"),
}
LOG_TAIL_LINES = 60


class DemoError(FalconError, RuntimeError):
    """A step failed; the message names it and shows its log's tail."""


def resolve_config(name: str) -> Path:
    """A config path, or the name of one in jobs/configs/."""
    path = Path(name)
    if path.is_file():
        return path.resolve()
    named = REPO / "jobs" / "configs" / f"{name.removesuffix('.yaml')}.yaml"
    if named.is_file():
        return named
    known = sorted(p.stem for p in (REPO / "jobs" / "configs").glob("*.yaml"))
    raise ConfigError(f"no config {name!r}: neither a file nor one of {known}")


def step_command(step: str, config: Path, overrides: list[str]) -> list[str]:
    """The job's entrypoint: this Python in the repository, with every override (a value one section sets can
    derive another's: pipelines.run_config)."""
    script, section = STEPS[step]
    if section is None:
        args = fetch_args(config)
    else:
        args = ["--config", str(config)]
        for item in overrides:
            args += ["--set", item]
    entry = shlex.join([sys.executable, script, *args])
    return ["sh", "-c", f"cd {shlex.quote(str(REPO))} && exec {entry}"]


def fetch_args(config: Path) -> list[str]:
    """Fetch the data and, when the config uses the default target, the target too."""
    import yaml

    extract = (yaml.safe_load(config.read_text()) or {}).get("extract") or {}
    return [] if extract.get("target") else ["--target", "smollm2-135m-instruct"]


def run_step(head: RayHead, step: str, command: list[str], timeout: float) -> float:
    """Submit one job (what `ray job submit` does, without its dozen lines of hints), stream its log, and raise
    DemoError unless it SUCCEEDED; returns its duration."""
    import asyncio

    from ray.job_submission import JobStatus, JobSubmissionClient

    submission_id = f"demo-{step}-{uuid.uuid4().hex[:8]}"
    print(f"\n=== {step}: ray job submit --submission-id {submission_id} -- {command[-1]}", flush=True)
    started = time.perf_counter()
    client = JobSubmissionClient(head.address)
    client.submit_job(entrypoint=shlex.join(command), submission_id=submission_id)

    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)  # "WebSocket closed ..."

    async def stream_log() -> None:  # until the job ends
        async for chunk in client.tail_job_logs(submission_id):
            print(chunk, end="", flush=True)

    try:
        asyncio.run(asyncio.wait_for(stream_log(), timeout))
        # The log can close a moment before the status is final (or early, if its connection dropped).
        while not (status := client.get_job_status(submission_id)).is_terminal():
            if time.perf_counter() - started > timeout:
                raise TimeoutError
            time.sleep(0.5)
    except TimeoutError:
        client.stop_job(submission_id)
        raise DemoError(f"step {step} ran past --step-timeout {timeout:.0f} s and was stopped") from None
    if status != JobStatus.SUCCEEDED:
        tail = "\n".join(client.get_job_logs(submission_id).splitlines()[-LOG_TAIL_LINES:])
        raise DemoError(f"step {step} ended {status}; the last {LOG_TAIL_LINES} lines of its log:\n{tail}")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="smollm2-demo", help="config name in jobs/configs/ or a YAML path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one value (section.key=value or mlflow.key=value); repeatable")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--step-timeout", type=float, default=3 * 3600, help="seconds before a step is stopped")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the Ray head (default: all)")
    parser.add_argument("--log-dir", default="runs/demo", help="where the Ray head's log goes")
    args = parser.parse_args(argv)

    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    try:
        unknown = sorted(set(steps) - set(STEPS))
        if unknown:
            raise ConfigError(f"unknown step(s) {unknown}; known: {list(STEPS)}")
        config = resolve_config(args.config)
        # Every section a step reads parses (derived values included) before anything starts.
        configs = check_run_config(config, args.overrides, [STEPS[s][1] for s in steps if STEPS[s][1]])
    except (ConfigError, ValueError) as exc:
        print(f"demo: config error: {exc}", file=sys.stderr)
        return 2

    # `kill` (SIGTERM) must stop the Ray head too: turn it into the KeyboardInterrupt path below.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    durations: dict[str, float] = {}
    try:
        with local_ray_head(str(log_dir / "ray-head.log"), num_cpus=args.num_cpus) as head:
            print(f"demo: Ray head at {head.address} (log {head.log_path}); config {config}", flush=True)
            for step in steps:
                durations[step] = run_step(head, step, step_command(step, config, args.overrides), args.step_timeout)
    except (DemoError, RuntimeError) as exc:
        print(f"\ndemo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo: interrupted; the Ray head was stopped. Re-run to resume.", file=sys.stderr)
        return 130

    print("\n=== steps: " + ", ".join(f"{step} {seconds / 60:.1f} min" for step, seconds in durations.items()))
    if "benchmark" in steps:
        report = Path(configs["benchmark"].run_dir)
        report = (report if report.is_absolute() else REPO / report) / REPORT_MD
        print(f"\n=== {report}\n\n{report.read_text()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
