"""The extraction job submitted with `ray job submit` to a loopback Ray head started here; status checked.

The head runs as `ray start --head --block` in its own process group: stopping it ends exactly this test's
Ray processes (`ray stop` would also stop any other Ray on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from falcon.target import load_target, target_fingerprint
from falcon.testing import make_tiny_target
from feature_store import FeatureStore

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture
def ray_head(tmp_path, monkeypatch):
    """(dashboard URL, environment for the ray CLI) of a private 2-CPU head on loopback."""
    # Ray 2.60 turns token auth on for local clusters (token in ~/.ray/auth_token); say so explicitly so
    # this process's JobSubmissionClient sends the token too.
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    gcs, dashboard, client, agent_http, agent_grpc, runtime_env, metrics, node_manager, object_manager = free_ports(9)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    log = open(tmp_path / "ray-head.log", "w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--port={gcs}", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
         f"--metrics-export-port={metrics}", f"--node-manager-port={node_manager}",
         f"--object-manager-port={object_manager}", "--num-cpus=2", "--disable-usage-stats",
         f"--temp-dir={temp_dir}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_job_api(address, head, tmp_path / "ray-head.log")
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # --block: the head stops every process it started
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_job_api(address: str, head: subprocess.Popen, log_path: Path, timeout: float = 90) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout
    while True:
        assert head.poll() is None, f"ray start exited:\n{log_path.read_text()[-3000:]}"
        try:
            JobSubmissionClient(address).list_jobs()
            return
        except Exception as exc:  # connection refused until the dashboard is up
            if time.monotonic() > deadline:
                raise AssertionError(f"Ray job API at {address} not up after {timeout} s: {exc}") from exc
            time.sleep(1)


def test_extraction_job_submitted_to_a_ray_head_succeeds(ray_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    address, env = ray_head
    make_tiny_target("llama", save_dir=tmp_path / "target")
    rows = [{"id": f"q{i}", "messages": [{"role": "user", "content": text}]}
            for i, text in enumerate(["What is the capital of France?", "Explain why the sky is blue.",
                                      "How do I sort a list in Python?"])]
    rows.append({"id": "bad", "messages": []})
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    store, run_dir = tmp_path / "store", tmp_path / "run"

    submission_id = f"extract-test-{uuid.uuid4().hex[:8]}"
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", submission_id,
         "--working-dir", ".", "--", "python", "jobs/extract_features.py", "--config", "jobs/configs/tiny.yaml",
         "--set", f"target={tmp_path / 'target'}", "--set", f"inputs=[{tmp_path / 'in.jsonl'}]",
         "--set", f"store={store}", "--set", f"run_dir={run_dir}", "--set", "generation.max_new_tokens=4"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    client = JobSubmissionClient(address)
    status = client.get_job_status(submission_id)
    logs = client.get_job_logs(submission_id)
    # `ray job submit` exits 0 even for a stopped job (DESIGN.md §8): the job's status is what counts.
    assert status == JobStatus.SUCCEEDED, f"job {status}; exit {submit.returncode}\n{submit.stderr[-3000:]}\n{logs[-5000:]}"
    assert submit.returncode == 0
    assert "extracted into" in logs and "empty_conversation" in logs

    model, tokenizer = load_target(tmp_path / "target")
    extracted = FeatureStore.open(str(store), expect_fingerprint=target_fingerprint(model, tokenizer))
    assert extracted.sample_ids() == ["q0", "q1", "q2"]
    assert extracted.verify().ok
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rejects"] == {"empty_conversation": 1}
    assert summary["replies_generated"] == 3 and summary["samples_written"] == 3
