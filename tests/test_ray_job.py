"""Jobs submitted with `ray job submit` to a loopback Ray head started here; the jobs' status is checked.

- the extraction job alone, with --working-dir as on a real cluster;
- the whole chain (`pipelines.demo`: extract, train, package, benchmark) on tiny models and data, then the
  model pulled back from the registry by alias and checked to generate losslessly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from falcon.target import load_target, target_fingerprint
from falcon.testing import make_tiny_target
from feature_store import FeatureStore
from pipelines.ray_utils import local_ray_head

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head(tmp_path):
    """(dashboard URL, environment for the ray CLI) of a private 2-CPU head on loopback."""
    with local_ray_head(str(tmp_path / "ray-head.log"), num_cpus=2) as head:
        yield head.address, head.env


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
    # `ray job submit` exits 0 even for a stopped job (Ray's documented behaviour): the job's status is what counts.
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


def test_whole_chain_as_ray_jobs_then_the_registered_model_generates_losslessly(tmp_path, capsys):
    from falcon.generate import autoregressive_generate
    from pipelines import demo
    from pipelines.inference import encode_prompt, generate_text, load_falcon

    make_tiny_target("llama", save_dir=tmp_path / "target")
    prompts = ["What is the capital of France?", "Explain why the sky is blue.", "How do I sort a list in Python?",
               "Write a haiku about autumn.", "What is two plus two?", "Name three colours.",
               "Tell me a joke about cats.", "Why do birds sing?"]
    rows = [{"id": f"q{i}", "messages": [{"role": "user", "content": p}], "turns": [p, "Shorter, please."]}
            for i, p in enumerate(prompts)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    target, store, tracking = tmp_path / "target", tmp_path / "store", f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Each value once: train reads extract's store, packaging the drafter in train's run_dir (and the split its
    # record names), the benchmark the model packaging registered, every stage the one tracking URI.
    overrides = [
        f"mlflow.tracking_uri={tracking}",
        f"extract.inputs=[{tmp_path / 'prompts.jsonl'}]", f"extract.store={store}", f"extract.target={target}",
        f"extract.run_dir={tmp_path / 'extract'}", "extract.generation.max_new_tokens=24",
        f"train.target={target}", f"train.run_dir={tmp_path / 'train'}",
        # The split hashes prompts: 0.1 holds out 3 of these 8, leaving 5 windows for one 4-window step.
        "train.max_steps=4", "train.eval_fraction=0.1",
        f"package.target={target}", f"package.run_dir={tmp_path / 'package'}", "package.model_name=falcon-chain-test",
        f"benchmark.run_dir={tmp_path / 'bench'}", "benchmark.max_new_tokens=16",
        f"benchmark.datasets=[{{name: mt_bench, path: {tmp_path / 'prompts.jsonl'}, max_samples: 2, second_turn: true}}]",
    ]
    args = ["--config", "tiny", "--steps", "extract,train,package,benchmark", "--num-cpus", "2",
            "--log-dir", str(tmp_path / "demo")]
    assert demo.main(args + [f"--set={item}" for item in overrides]) == 0, capsys.readouterr().err[-5000:]
    out = capsys.readouterr().out
    assert "=== steps: extract" in out and "| falcon |" in out
    report = json.loads((tmp_path / "bench" / "report.json").read_text())
    assert all(m["real_divergences"] == 0 for m in report["results"]["mt_bench"]["methods"].values())

    package = load_falcon("models:/falcon-chain-test@champion", tracking_uri=tracking, dtype="float32")
    assert package.decoder.lookup.num_tokens == 4  # the tiny config packages a context-lookup chain
    for prompt in prompts[:3]:
        expected = autoregressive_generate(package.target, encode_prompt(package.tokenizer, prompt), 32,
                                           eos_token_id=package.eos_token_ids).tokens
        assert generate_text(package, prompt, 32).token_ids == expected


def test_a_failing_step_stops_the_chain_with_its_log(tmp_path, capsys):
    from pipelines import demo

    code = demo.main(["--config", "tiny", "--steps", "extract,train", "--num-cpus", "2", "--log-dir",
                      str(tmp_path / "demo"), f"--set=extract.inputs=[{tmp_path / 'missing.jsonl'}]",
                      f"--set=extract.target={tmp_path / 'no-target'}", f"--set=extract.store={tmp_path / 'store'}",
                      f"--set=extract.run_dir={tmp_path / 'extract'}"])
    err = capsys.readouterr().err
    assert code == 1 and "step extract ended FAILED" in err and "no-target" in err
    assert "=== train" not in capsys.readouterr().out
