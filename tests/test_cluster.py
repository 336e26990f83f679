""""The same code on a cluster, by configuration only", each promise against real servers on loopback:

- the whole chain (extract as the demo runs it; train, package, benchmark as the ablation runs them; every step a
  Ray job) with the feature store on an S3 API server (moto) and every stage logging to an MLflow tracking
  server; then a fresh process that knows only the server's URL loads the registered package and decodes
  losslessly; the credentials appear in nothing the jobs wrote;
- extraction into S3 killed with SIGKILL and re-run: the store equals an uninterrupted run's;
- a two-node Ray cluster (separate raylets): extraction actors and training workers land on both nodes, and the
  store equals a single-node run's; a worker node lost mid-extraction, then a re-run, gives the same store;
- a step of the chain that fails stops it and shows that step's log.
(A training worker killed mid-run and restarted from its checkpoint: tests/test_train.py.)
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from falcon.testing import make_tiny_target
from tests.servers import ACCESS_KEY, SECRET_KEY, mlflow_server, s3_server

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["What is the capital of France?", "Explain why the sky is blue.", "How do I sort a list in Python?",
           "Write a haiku about autumn.", "What is two plus two?", "Name three colours.",
           "Tell me a joke about cats.", "Why do birds sing?"]
MODEL_NAME = "falcon-ablation-csgd"  # what the ablation registers its CSGD variant as
MODEL = f"models:/{MODEL_NAME}@champion"


def write_prompts(path: Path) -> Path:
    rows = [{"id": f"q{i}", "messages": [{"role": "user", "content": p}], "turns": [p, "Shorter, please."]}
            for i, p in enumerate(PROMPTS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def files_containing(root: Path, needles: list[str]) -> list[str]:
    """Every file under `root` whose bytes contain one of `needles`."""
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and any(n.encode() in path.read_bytes() for n in needles):
            hits.append(str(path.relative_to(root)))
    return hits


def test_chain_on_object_storage_and_an_mlflow_server(tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    from falcon.generate import autoregressive_generate
    from falcon.target import eos_token_ids, load_target
    from pipelines import demo
    from pipelines.inference import encode_prompt

    servers = tmp_path / "servers"
    servers.mkdir()
    with s3_server(servers) as s3, mlflow_server(servers) as tracking_uri:
        # The nodes have the credentials in their environment (as from an instance role); the config only says
        # where the bucket is.
        for name, value in s3.credentials_env.items():
            monkeypatch.setenv(name, value)
        make_tiny_target("llama", save_dir=tmp_path / "target")
        target, prompts = tmp_path / "target", write_prompts(tmp_path / "prompts.jsonl")
        store = f"s3://{s3.bucket}/stores/chain"
        endpoint = s3.storage_options["client_kwargs"]["endpoint_url"]
        overrides = [
            f"mlflow.tracking_uri={tracking_uri}",
            f"extract.inputs=[{prompts}]", f"extract.store={store}", f"extract.target={target}",
            f"extract.storage_options={{client_kwargs: {{endpoint_url: '{endpoint}', region_name: us-east-1}}}}",
            f"extract.run_dir={tmp_path / 'extract'}", "extract.generation.max_new_tokens=24",
            f"train.target={target}",
            # The split hashes prompts: 0.1 holds out 3 of these 8, leaving 5 windows for one 4-window step.
            "train.max_steps=4", "train.eval_fraction=0.1",
            f"package.target={target}", "benchmark.max_new_tokens=16",
            f"benchmark.datasets=[{{name: mt_bench, path: {prompts}, max_samples: 2, second_turn: true}}]",
        ]
        # The demo's extraction into the bucket, then the rest of the chain as the ablation runs it (one Ray job per
        # step, the same `run_step` as the demo's): the CSGD variant trained on the store, its tree tuned, packaged
        # and registered, and the benchmark of that registered package (the one training here: each costs Ray
        # Train's worker start-up, which dominates a tiny run).
        args = ["--config", "tiny", "--steps", "extract", "--num-cpus", "2", "--log-dir", str(tmp_path / "demo")]
        code = demo.main(args + [f"--set={item}" for item in overrides])
        out, err = capsys.readouterr()
        assert code == 0, err[-5000:]
        from pipelines import ablation

        code = ablation.main(["--config", "tiny", "--variants", "csgd", "--run-dir", str(tmp_path / "ablation"),
                              "--log-dir", str(tmp_path / "ablation-ray"), f"--set=benchmark.model={MODEL}"]
                             + [f"--set={item}" for item in overrides])
        out, err = capsys.readouterr()
        assert code == 0, err[-5000:]
        assert "| falcon |" in out and "| csgd |" in out
        [row] = json.loads((tmp_path / "ablation" / "ablation.json").read_text())
        # 2 epochs of one step (train.max_steps=4 does not bind); held-out top-1 for passes 0 and 1 at k = 2.
        assert row["variant"] == "csgd" and row["steps"] == 2 and len(row["top1_by_depth"]) == 4, row
        assert row["benchmark"]["mt_bench"]["real_divergences"] == 0 and row["benchmark"]["mt_bench"]["tau"] >= 1
        assert "| csgd | 2 |" in out

        # The store is in the bucket (nothing was written to a local path of that name) and verifies.
        from feature_store import FeatureStore

        opened = FeatureStore.open(store, storage_options=s3.storage_options)
        assert opened.verify().ok and len(opened.sample_ids()) == len(PROMPTS)
        assert s3.filesystem().find(f"{s3.bucket}/stores/chain")

        client = MlflowClient(tracking_uri)
        train_runs = client.search_runs([client.get_experiment_by_name("falcon-drafter-train-tiny").experiment_id])
        assert train_runs and train_runs[0].info.status == "FINISHED"
        assert any(key.startswith("train.") for key in train_runs[0].data.metrics), train_runs[0].data.metrics
        version = client.get_model_version_by_alias(MODEL_NAME, "champion")
        bench_runs = client.search_runs([client.get_experiment_by_name("falcon-benchmark-tiny").experiment_id])
        assert "report.json" in [a.path for a in client.list_artifacts(bench_runs[0].info.run_id)]
        # Proxied artifacts: the server holds them; the client never needed the artifact directory.
        assert list((servers / "mlflow-artifacts").rglob("report.json"))

        # A fresh process that knows only the server's URL (no credentials, no local MLflow files).
        script = ("import json, sys; from pipelines.inference import load_falcon, generate_text\n"
                  f"package = load_falcon('{MODEL}', dtype='float32')\n"
                  "print(json.dumps([generate_text(package, p, 24).token_ids for p in sys.argv[1:]]))\n")
        clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
        loaded = subprocess.run([sys.executable, "-c", script, *PROMPTS[:3]], cwd=tmp_path, capture_output=True,
                                text=True, timeout=300, env={**clean_env, "MLFLOW_TRACKING_URI": tracking_uri,
                                                             "PYTHONPATH": str(REPO)})
        assert loaded.returncode == 0, loaded.stderr[-3000:]
        model, tokenizer = load_target(target)
        for prompt, tokens in zip(PROMPTS[:3], json.loads(loaded.stdout.splitlines()[-1]), strict=True):
            expected = autoregressive_generate(model, encode_prompt(tokenizer, prompt), 24,
                                               eos_token_id=eos_token_ids(model, tokenizer)).tokens
            assert tokens == expected
        assert version.version == "1"

        # No credential in any log, summary, checkpoint, run directory, MLflow database or artifact, or object.
        leaks = files_containing(tmp_path, [ACCESS_KEY, SECRET_KEY])
        assert leaks == [], leaks
        s3fs = s3.filesystem()
        objects = [p for p in s3fs.find(s3.bucket) if SECRET_KEY.encode() in s3fs.cat_file(p)]
        assert objects == []


# -- a two-node Ray cluster ----------------------------------------------------------------------------------
HEAD_IP, NODE_IP = "127.0.0.2", "127.0.0.3"


def extract_overrides(target: Path, prompts: Path, store: Path, run_dir: Path) -> list[str]:
    return [f"target={target}", f"inputs=[{prompts}]", f"store={store}", f"run_dir={run_dir}",
            "generation.max_new_tokens=12", "forward_actors.num_actors=2", "forward_actors.num_cpus=0.5"]


def submit(head, command: list[str]) -> str:
    """Submit `python command...` run in the repository (as the demo does); its submission id."""
    from ray.job_submission import JobSubmissionClient

    entrypoint = f"cd {shlex.quote(str(REPO))} && {shlex.join([sys.executable, *command])}"
    return JobSubmissionClient(head.address).submit_job(entrypoint=entrypoint)


def wait_for(head, job_id: str, timeout: float = 300) -> tuple[str, str]:
    """(final status, log) of a job."""
    import time

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(head.address)
    deadline = time.monotonic() + timeout
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                             JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"job {job_id} still {status} after {timeout:.0f} s"
        time.sleep(1)
    return str(status), client.get_job_logs(job_id)


def actor_nodes(head, class_name: str) -> set[str]:
    """The nodes that ran actors whose class name contains `class_name` (alive or finished), from Ray's state API."""
    from ray.util.state import list_actors

    actors = list_actors(address=head.address, limit=10_000)
    nodes = {a.node_id for a in actors if class_name in a.class_name}
    assert nodes, f"no {class_name} actor among {sorted({a.class_name for a in actors})}"
    return nodes


@pytest.fixture(scope="module")
def cluster_inputs(tmp_path_factory):
    """A tiny target, eight prompts, and the store a single-node run extracts from them."""
    root = tmp_path_factory.mktemp("cluster")
    make_tiny_target("llama", save_dir=root / "target")
    prompts = write_prompts(root / "prompts.jsonl")
    with prompts.open("a") as f:
        f.write(json.dumps({"id": "bad", "messages": []}) + "\n")  # rejected and counted, never a traceback
    overrides = extract_overrides(root / "target", prompts, root / "store-single", root / "run-single")
    single = subprocess.run([sys.executable, "jobs/extract_features.py", "--config", "jobs/configs/tiny.yaml",
                             *(arg for item in overrides for arg in ("--set", item))],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def two_nodes(cluster_inputs):
    """(head, worker node process): a 1-CPU head and a 1-CPU worker node, each its own raylet on loopback."""
    from pipelines.ray_utils import local_ray_head, ray_worker_node

    with pytest.MonkeyPatch.context() as env:
        # The GCS declares a silent node dead after 5 missed health checks: 1 s apart here, not Ray's 3 s (+10 s
        # timeouts), so the lost-node test does not wait half a minute for it.
        for name, value in {"period_ms": 1000, "timeout_ms": 2000, "failure_threshold": 5}.items():
            env.setenv(f"RAY_health_check_{name}", str(value))
        with local_ray_head(str(cluster_inputs / "head.log"), num_cpus=1, node_ip=HEAD_IP) as head, \
                ray_worker_node(head, str(cluster_inputs / "node.log"), num_cpus=1, node_ip=NODE_IP) as node:
            yield head, node


def wait_for_nodes(head, ips: list[str], timeout: float = 120) -> None:
    """Until exactly `ips` are alive: a killed node stays ALIVE until the GCS misses its health checks (~30 s)."""
    import time

    from pipelines.ray_utils import alive_nodes

    deadline = time.monotonic() + timeout
    while (alive := sorted(alive_nodes(head).values())) != sorted(ips):
        assert time.monotonic() < deadline, f"alive nodes {alive} after {timeout:.0f} s, expected {sorted(ips)}"
        time.sleep(1)


def same_store(a: Path, b: Path) -> None:
    from feature_store import FeatureStore

    first, second = FeatureStore.open(str(a)), FeatureStore.open(str(b))
    assert first.metadata == second.metadata
    assert first.read_manifest().to_pylist() == second.read_manifest().to_pylist()  # incl. checksums
    assert first.verify().ok


def test_training_workers_run_on_both_nodes(two_nodes, cluster_inputs):
    head, _ = two_nodes
    root = cluster_inputs
    wait_for_nodes(head, [HEAD_IP, NODE_IP])
    overrides = [f"store={root / 'store-single'}", f"target={root / 'target'}", f"run_dir={root / 'train'}",
                 f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}", "max_steps=2", "eval_fraction=0.1",
                 "scaling.num_workers=2", "scaling.cpus_per_worker=1"]
    status, logs = wait_for(head, submit(head, ["jobs/train_csgd.py", "--config", "jobs/configs/tiny.yaml",
                                                *(arg for item in overrides for arg in ("--set", item))]))
    assert status == "SUCCEEDED", logs[-5000:]
    assert len(actor_nodes(head, "RayTrainWorker")) == 2
    assert (root / "train" / "drafter" / "model.safetensors").is_file()


def test_extraction_on_two_nodes_survives_losing_one_and_gives_the_single_node_store(two_nodes, cluster_inputs):
    """Extraction actors on both nodes; the worker node lost mid-run (the job finishes on the head or fails
    saying why); a re-run with a replacement node completes the store, equal to the single-node run's. Last in
    this module: the fixture's cluster has only its head after."""
    import signal
    import time

    from feature_store.storage import Location
    from pipelines.ray_utils import ray_worker_node

    head, node = two_nodes
    root = cluster_inputs
    wait_for_nodes(head, [HEAD_IP, NODE_IP])
    store = root / "store-multi"
    overrides = extract_overrides(root / "target", root / "prompts.jsonl", store, root / "run-multi")
    command = ["jobs/extract_features.py", "--config", "jobs/configs/tiny.yaml",
               *(arg for item in overrides for arg in ("--set", item))]
    job_id = submit(head, command)
    location, deadline = Location(str(store)), time.monotonic() + 240
    while not location.glob(location.path("shards", "shard-*", "COMMITTED.json")):
        assert time.monotonic() < deadline, "no shard committed within 240 s"
        time.sleep(0.05)
    assert len(actor_nodes(head, "MapWorker")) == 2  # the actor pool started on both nodes
    os.killpg(node.pid, signal.SIGKILL)  # the node and every worker on it, as a machine lost
    status, logs = wait_for(head, job_id)
    assert status == "SUCCEEDED" or ("extract_features: error:" in logs and "Traceback" not in logs), logs[-5000:]
    finished_first = status == "SUCCEEDED"

    with ray_worker_node(head, str(root / "node-2.log"), num_cpus=1, node_ip="127.0.0.4"):  # a replacement
        wait_for_nodes(head, [HEAD_IP, "127.0.0.4"])
        status, rerun_logs = wait_for(head, submit(head, command))
        assert status == "SUCCEEDED", rerun_logs[-5000:]
    # What a person reads in the run that completed the store: one bar over the shards, not Ray Data's
    # periodic progress blocks.
    logs = logs if finished_first else rerun_logs
    assert "extract: 100%" in logs and "4/4" in logs and "Total Progress" not in logs, logs[-3000:]
    assert json.loads((root / "run-multi" / "summary.json").read_text())["rejects"] == {"empty_conversation": 1}
    same_store(store, root / "store-single")


def test_a_failing_step_stops_the_chain_with_its_log(tmp_path, capsys):
    from pipelines import demo

    code = demo.main(["--config", "tiny", "--steps", "extract,train", "--num-cpus", "2", "--log-dir",
                      str(tmp_path / "demo"), f"--set=extract.inputs=[{tmp_path / 'missing.jsonl'}]",
                      f"--set=extract.target={tmp_path / 'no-target'}", f"--set=extract.store={tmp_path / 'store'}",
                      f"--set=extract.run_dir={tmp_path / 'extract'}"])
    err = capsys.readouterr().err
    assert code == 1 and "step extract ended FAILED" in err and "no-target" in err
    assert "=== train" not in capsys.readouterr().out
    assert (tmp_path / "demo" / "ray-logs").is_dir()  # Ray's own logs outlive its head
