"""CSGD training on Ray Train + DeepSpeed: setup errors, ZeRO-2 on 2 CPU workers, resume, export, losslessness,
non-finite losses, and no credentials in anything the runs write.

The Ray tests share one local Ray and one run directory, in file order: the first run trains and exports, a
re-run returns it without training, the resume check and the export are tested on it, a run on a store with
overflowing features fails after its limit of non-finite steps and is resumed, and the last one starts the first
run directory over (--fresh) as the k=1, CSGD-off ablation. Every run is given object-store credentials (fake,
the store is local) that must not reach MLflow or any file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from falcon.drafter import WEIGHTS_FILE, load_drafter, load_drafter_config
from falcon.generate import FalconDecoder, autoregressive_generate
from falcon.target import load_target, target_fingerprint
from falcon.testing import make_tiny_target
from falcon.tree import TreeConfig
from feature_store import FeatureStore
from pipelines.config import ConfigError
from pipelines.ray_utils import RayConfig, init_ray
from pipelines.run_config import load_stage
from pipelines.train import TrainConfig, TrainingDivergedError, TrainSetupError, run_training
from pipelines.train.batches import epoch_batches, training_windows
from pipelines.train.config import RUN_SNAPSHOT_FILE
from pipelines.train.driver import export_drafter, mlflow_params
from pipelines.train.engine import load_frozen_embedding_and_head, training_record
from pipelines.train.metrics import chain_acceptance_length
from pipelines.train.plan import committed_checkpoint, locate_embedding_and_head, prepare_run
from tests.store_fixtures import prompt_ids, write_target_store
from tests.test_secrets import KEY, PASSWORD, SECRET, assert_no_secret, assert_no_secret_in_files

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "jobs" / "configs" / "tiny.yaml"

pytestmark = pytest.mark.slow  # Ray Train / DeepSpeed / MLflow end to end


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    make_tiny_target("llama", save_dir=root / "target")
    write_target_store(root / "store", root / "target", n_samples=24)
    return root


def tiny_config(workspace: Path, *overrides: str) -> TrainConfig:
    return load_stage("train", TINY_CONFIG, [
        f"store={workspace / 'store'}", f"target={workspace / 'target'}", f"run_dir={workspace / 'runs' / 'tiny'}",
        f"mlflow.tracking_uri=sqlite:///{workspace / 'mlflow.db'}",
        f"storage_options={{key: {KEY}, secret: {SECRET}}}",  # fsspec's local filesystem ignores them
        *overrides,
    ])


# -- pure pieces -----------------------------------------------------------------------------------------
def test_chain_acceptance_length_by_hand():
    # k = 2, depth 4: 1 + a1 + a1 a2 + a1 a2 a1 + a1 a2 a1 a2
    assert chain_acceptance_length([0.5, 0.4], 4, 2) == pytest.approx(1 + 0.5 + 0.2 + 0.1 + 0.04)
    assert chain_acceptance_length([1.0], 6, 1) == 7.0
    assert chain_acceptance_length([math.nan, 1.0], 4, 2) == 1.0  # no data at a depth counts as never accepted
    # depths 1..4 measured (pass 0, pass 1); depths 5, 6 repeat pass 1's 0.5, 0.5
    products = [0.8, 0.4, 0.2, 0.1, 0.05, 0.025]
    assert chain_acceptance_length([0.8, 0.5, 0.5, 0.5], 6, 2) == pytest.approx(1 + sum(products))


def test_a_long_run_prints_about_twenty_progress_lines():
    from types import SimpleNamespace

    from pipelines.train.metrics import ProgressMeter

    plan = SimpleNamespace(total_steps=1134, config=SimpleNamespace(log_every=10))
    flushed = [*range(10, 1134, 10), 1134]
    printed = [step for step in flushed if ProgressMeter(plan, 0, "cpu").due(step)]
    assert printed[0] == 10 and printed[-1] == 1134 and 18 <= len(printed) <= 22, printed
    resumed = ProgressMeter(plan, 900, "cpu")
    assert resumed.due(910) and not resumed.due(920) and resumed.due(1134)
    short = SimpleNamespace(total_steps=8, config=SimpleNamespace(log_every=1))
    assert all(ProgressMeter(short, 0, "cpu").due(step) for step in range(1, 9))


def test_epoch_batches_partition_windows_and_depend_only_on_epoch(workspace):
    plan = prepare_run(tiny_config(workspace, "deepspeed.micro_batch_size=3"))
    per_rank = [epoch_batches(plan.num_train_windows, 1, plan, rank, 2) for rank in range(2)]
    flat = [w for batches in per_rank for batch in batches for w in batch]
    assert len(flat) == len(set(flat)) == plan.steps_per_epoch * 2 * 3  # disjoint, equal share per worker
    assert [len(b) for b in per_rank[0]] == [len(b) for b in per_rank[1]]
    assert per_rank[0] == epoch_batches(plan.num_train_windows, 1, plan, 0, 2)  # deterministic: resumable
    assert per_rank[0] != epoch_batches(plan.num_train_windows, 2, plan, 0, 2)  # reshuffled every epoch


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_embedding_and_head_read_from_safetensors_match_the_model(tmp_path, family):
    model, _ = make_tiny_target(family, save_dir=tmp_path)
    embedding, head = load_frozen_embedding_and_head(locate_embedding_and_head(str(tmp_path)), "cpu", torch.float32)
    assert torch.equal(embedding.weight, model.get_input_embeddings().weight)
    assert torch.equal(head.weight, model.get_output_embeddings().weight)
    assert not embedding.weight.requires_grad and not head.weight.requires_grad


# -- setup errors: named before any worker starts ------------------------------------------------------------
def corrupted_copy(workspace: Path, tmp_path: Path) -> Path:
    store = tmp_path / "store"
    shutil.copytree(workspace / "store", store)
    chunk = next((store / "shards" / "shard-00001" / "hidden_states").rglob("c/*/*"))
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    shutil.rmtree(store / "shards" / "shard-00002")
    return store


def test_setup_errors_name_the_problem(workspace, tmp_path):
    with pytest.raises(TrainSetupError, match="no feature store"):
        prepare_run(tiny_config(workspace, f"store={tmp_path / 'nowhere'}"))
    with pytest.raises(TrainSetupError, match=r"corrupt shard-00001.*\n.*missing shard-00002"):
        prepare_run(tiny_config(workspace, f"store={corrupted_copy(workspace, tmp_path)}"))
    with pytest.raises(TrainSetupError, match="held-out split is empty"):
        prepare_run(tiny_config(workspace, "eval_fraction=1e-9"))
    with pytest.raises(TrainSetupError, match="fewer than one optimizer step"):
        prepare_run(tiny_config(workspace, "deepspeed.micro_batch_size=64"))
    with pytest.raises(TrainSetupError, match="holds no top-k logits"):
        prepare_run(tiny_config(workspace, "csgd.teacher=topk"))
    with pytest.raises(ConfigError, match="max_nonfinite_steps must be >= 0"):
        tiny_config(workspace, "max_nonfinite_steps=-1")


def test_store_of_another_target_fails_the_job_without_traceback(workspace, tmp_path):
    make_tiny_target("llama", seed=1, save_dir=tmp_path / "other-target")
    job = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train_csgd.py"), "--config", str(TINY_CONFIG),
         "--set", f"store={workspace / 'store'}", "--set", f"target={tmp_path / 'other-target'}",
         "--set", f"run_dir={tmp_path / 'run'}", "--set", "mlflow.enabled=false"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert job.returncode == 1
    assert "holds features of target" in job.stderr and "Traceback" not in job.stderr
    assert not (tmp_path / "run").exists()


# -- Ray Train + DeepSpeed ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_ray():
    import ray

    connected = init_ray(RayConfig(num_cpus=2))
    yield
    if connected:
        ray.shutdown()


@pytest.fixture(scope="module")
def first_run(workspace, local_ray):
    return run_training(tiny_config(workspace, "max_steps=4", "checkpoint_every=2"))


def test_deepspeed_zero2_on_two_workers_and_loss_falls(first_run):
    outcome = first_run["result"]
    assert (outcome["engine"], outcome["zero_stage"], outcome["world_size"]) == ("DeepSpeedEngine", 2, 2)
    assert outcome["start_step"] == 0 and outcome["end_step"] == 4
    losses = [record["train/loss"] for record in outcome["history"]]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.95 * losses[0]
    assert 0 <= first_run["eval"]["eval/top1_pos1"] <= 1 and first_run["eval"]["eval/tau_chain"] >= 1


def test_run_is_logged_to_mlflow(first_run, workspace):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(first_run["mlflow_tracking_uri"])
    run = client.get_run(first_run["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["target_fingerprint"] == first_run["target_fingerprint"]
    assert run.data.params["config.drafter.block_size"] == "2"
    assert {"train.loss", "train.tokens_per_s", "eval.top1_pos1", "eval.top1_pos2", "eval.tau_chain"} <= set(
        run.data.metrics)
    artifacts = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "drafter")}
    assert {"model.safetensors", "drafter_config.json"} <= artifacts


def test_rerun_of_a_finished_run_returns_it_without_training_again(first_run, workspace, capsys):
    """No Ray Train workers start for it (resuming mid-run with the optimizer state: the non-finite and the
    killed-worker tests)."""
    from mlflow.tracking import MlflowClient

    rerun = run_training(tiny_config(workspace, "max_steps=4", "checkpoint_every=2"))
    assert rerun["result"] == {"start_step": 4, "end_step": 4, "reused": True}
    assert (rerun["drafter_dir"], rerun["mlflow_run_id"]) == (first_run["drafter_dir"], first_run["mlflow_run_id"])
    assert rerun["eval"] == first_run["eval"] and rerun["seconds"] == first_run["seconds"]
    assert "already trained its 4 steps" in capsys.readouterr().err
    assert MlflowClient(first_run["mlflow_tracking_uri"]).get_run(rerun["mlflow_run_id"]).info.status == "FINISHED"


@pytest.mark.parametrize("changed, named", [
    ("optimizer.lr=1e-3", "optimizer.lr"), ("csgd.noise_bound=0.2", "csgd.noise_bound"), ("seed=1", "seed"),
    ("max_steps=6", "max_steps"), ("epochs=3", "epochs"), ("drafter.block_size=3", "drafter.block_size"),
])
def test_resume_refuses_other_training_settings_naming_them(first_run, workspace, changed, named):
    with pytest.raises(TrainSetupError, match="cannot be resumed") as refused:
        prepare_run(tiny_config(workspace, "max_steps=4", "checkpoint_every=2", changed))
    assert "checkpoint_step000000004" in str(refused.value) and f"\n  {named}: checkpoint " in str(refused.value)


def test_settings_that_do_not_change_the_weights_resume(first_run, workspace):
    prepare_run(tiny_config(workspace, "max_steps=4", "checkpoint_every=5", "log_every=3", "max_nonfinite_steps=0",
                            "loader_workers=1", "mlflow.enabled=false"))


def test_a_partial_newest_checkpoint_does_not_disable_the_resume_check(first_run, workspace):
    run_dir = workspace / "runs" / "tiny"
    assert committed_checkpoint(prepare_run(tiny_config(workspace, "max_steps=4", "checkpoint_every=2")))[0] == \
        "checkpoint_step000000004"
    # A worker killed while writing the next checkpoint: its directory exists, Ray Train never committed it.
    partial = run_dir / "checkpoint_step000000099"
    (partial / "engine").mkdir(parents=True)
    try:
        with pytest.raises(TrainSetupError, match=r"\(checkpoint_step000000004\).*\n  optimizer.lr: "):
            prepare_run(tiny_config(workspace, "max_steps=4", "checkpoint_every=2", "optimizer.lr=1e-3"))
        # Even if the partial one holds a plan made for the new settings.
        new_plan = prepare_run(tiny_config(workspace, "max_steps=4", "checkpoint_every=2"), fresh=True)
        new_plan.config.optimizer.lr = 1e-3
        (partial / "plan.json").write_text(json.dumps({"step": 99, "resume_key": new_plan.resume_key()}))
        with pytest.raises(TrainSetupError, match=r"\n  optimizer.lr: "):
            prepare_run(tiny_config(workspace, "max_steps=4", "checkpoint_every=2", "optimizer.lr=1e-3"))
    finally:
        shutil.rmtree(partial)


def test_params_and_train_info_hold_no_credentials(workspace):
    plan = prepare_run(tiny_config(workspace, f"mlflow.tracking_uri=http://user:{PASSWORD}@127.0.0.1:5000",
                                   f"run_dir={workspace / 'runs' / 'unused'}"))
    params = mlflow_params(plan)
    assert_no_secret(params)
    assert_no_secret(dataclasses.asdict(training_record(plan, 4, {"eval/loss": 1.0})))
    assert params["config.mlflow.tracking_uri"] == "http://127.0.0.1:5000"
    assert params["config.optimizer.lr"] == "0.003" and not any("storage_options" in key for key in params)


def test_exported_drafter_decodes_losslessly(first_run, workspace):
    target, tokenizer = load_target(workspace / "target")
    config = load_drafter_config(first_run["drafter_dir"])
    assert config.target_fingerprint == target_fingerprint(target, tokenizer)
    assert config.draft_vocab_size == 256
    drafter = load_drafter(first_run["drafter_dir"], target, target_fingerprint=config.target_fingerprint)
    assert torch.equal(drafter.draft_to_target, drafter.draft_to_target.sort().values)
    decoder = FalconDecoder(target, drafter, TreeConfig(branching=[3, 2, 1, 1]))
    for index in (0, 5, 30):
        prompt = prompt_ids(tokenizer, index)
        expected = autoregressive_generate(target, prompt, 40).tokens
        assert decoder.generate(prompt, 40).tokens == expected


def test_a_drafter_with_non_finite_weights_is_not_exported(first_run, tmp_path):
    from ray.train import Checkpoint
    from safetensors.torch import load_file, save_file

    drafter = tmp_path / "checkpoint" / "drafter"
    shutil.copytree(first_run["drafter_dir"], drafter)
    weights = load_file(str(drafter / WEIGHTS_FILE))
    name = sorted(weights)[0]
    weights[name].view(-1)[0] = math.nan
    save_file(weights, str(drafter / WEIGHTS_FILE))
    with pytest.raises(TrainingDivergedError, match=rf"not finite.*{name}"):
        export_drafter(Checkpoint.from_directory(str(tmp_path / "checkpoint")), str(tmp_path / "run"))
    assert not (tmp_path / "run" / "drafter").exists()


# -- non-finite losses: a store whose features overflow the target's LM head ------------------------------
OVERFLOWING = 3e38  # finite, so the store takes it (it refuses NaN / inf), but the LM head teacher over it is not


def write_overflowing_copy(source_url: Path, url: Path, poisoned: set[int], samples_per_shard: int = 6) -> None:
    """A copy of a store (same samples, ids and tokens, so the same split and draft vocabulary) whose `poisoned`
    samples carry features of magnitude OVERFLOWING: the CSGD loss of any batch holding them is NaN."""
    source = FeatureStore.open(str(source_url))
    samples = []
    for index in range(source.num_samples):
        sample = source.sample(index)
        features = sample["hidden_states"].astype(np.float32)
        if index in poisoned:
            features = np.where(np.arange(features.shape[1]) % 2, -OVERFLOWING, OVERFLOWING) + 0 * features
        samples.append({"sample_id": sample["sample_id"], "input_ids": sample["input_ids"],
                        "loss_mask": sample["loss_mask"], "hidden_states": features.astype(np.float32)})
    store = FeatureStore.create(str(url), source.metadata)
    for shard_id, start in enumerate(range(0, len(samples), samples_per_shard)):
        store.write_shard(shard_id, samples[start:start + samples_per_shard])
    store.commit_manifest()


def samples_of_steps(plan, steps) -> list[set[int]]:
    """The samples each optimizer step reads, over all workers, as the training loop draws them."""
    windows = training_windows(FeatureStore.open(plan.config.store), plan.train_indices, plan.config).windows[:, 0]
    world, gas = plan.config.scaling.num_workers, plan.config.deepspeed.gradient_accumulation_steps
    read = []
    for step in steps:
        epoch, within = divmod(step, plan.steps_per_epoch)
        batches = [epoch_batches(len(windows), epoch, plan, rank, world)[within * gas:(within + 1) * gas]
                   for rank in range(world)]
        read.append({int(windows[w]) for rank_batches in batches for batch in rank_batches for w in batch})
    return read


def metric_values(tracking_uri: str, run_id: str, key: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    return [m.value for m in sorted(MlflowClient(tracking_uri).get_metric_history(run_id, key), key=lambda m: m.step)]


def test_non_finite_losses_are_skipped_counted_and_stop_the_run_after_the_limit(workspace, local_ray):
    settings = [f"run_dir={workspace / 'runs' / 'overflow'}", "max_steps=6", "checkpoint_every=2"]
    plan = prepare_run(tiny_config(workspace, *settings))
    read = samples_of_steps(plan, range(6))
    # Steps 3 and 4 (1-based) read samples the first two steps do not: those are made to overflow.
    poisoned = (read[2] | read[3]) - read[0] - read[1]
    assert read[2] & poisoned and read[3] & poisoned
    skipped = [step + 1 for step in range(2, 6) if read[step] & poisoned]
    write_overflowing_copy(workspace / "store", workspace / "overflow-store", poisoned)
    settings.append(f"store={workspace / 'overflow-store'}")

    # At most 1 skipped step: step 3 is skipped, step 4 stops the run, after the checkpoint of step 2 (or of
    # step 3 when it ends an epoch).
    resume_step = max(step for step in (2, 3) if step % 2 == 0 or step % plan.steps_per_epoch == 0)
    with pytest.raises(TrainingDivergedError, match=r"not finite in 2 optimizer steps .*max_nonfinite_steps 1"):
        run_training(tiny_config(workspace, *settings, "max_nonfinite_steps=1"))
    run_dir = workspace / "runs" / "overflow"
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    tracking_uri = f"sqlite:///{workspace / 'mlflow.db'}"
    from mlflow.tracking import MlflowClient

    assert MlflowClient(tracking_uri).get_run(run_id).info.status == "FAILED"
    assert metric_values(tracking_uri, run_id, "train.nonfinite_steps")[-1] == 2
    assert not (run_dir / "drafter").exists()

    # Allowed more, the same run resumes from that checkpoint and skips exactly the steps that read overflowing
    # samples (the count so far carried in the checkpoint).
    plan = prepare_run(tiny_config(workspace, *settings, "max_nonfinite_steps=10"))
    checkpoint, metrics = committed_checkpoint(plan)
    assert checkpoint == f"checkpoint_step{resume_step:09d}"
    resumed = run_training(plan.config)
    outcome = resumed["result"]
    assert outcome["start_step"] == resume_step and outcome["end_step"] == 6
    assert outcome["resumed_optimizer_digest"] == pytest.approx(metrics["optimizer_digest"], rel=1e-12)
    assert resumed["nonfinite_steps"] == len(skipped) and outcome["nonfinite_steps"] == len(skipped)
    assert metric_values(tracking_uri, run_id, "train.nonfinite_steps")[-1] == len(skipped)
    assert MlflowClient(tracking_uri).get_run(run_id).info.status == "FINISHED"
    drafter = load_drafter(resumed["drafter_dir"])
    assert all(torch.isfinite(p).all() for p in drafter.parameters())
    assert all(math.isfinite(record["train/loss"]) for record in outcome["history"]
               if record["step"] not in skipped)


def test_no_credential_reaches_mlflow_or_any_file_the_runs_wrote(first_run, workspace):
    from mlflow.tracking import MlflowClient

    run = MlflowClient(first_run["mlflow_tracking_uri"]).get_run(first_run["mlflow_run_id"])
    assert_no_secret(run.data.params)
    assert_no_secret(run.data.tags)
    assert run.data.params["config.optimizer.lr"] == "0.003"
    info = json.loads((Path(first_run["drafter_dir"]) / "train_info.json").read_text())
    assert "storage_options" not in info["config"] and info["config"]["optimizer"]["lr"] == 0.003
    assert_no_secret_in_files(workspace)  # mlflow.db, mlartifacts/, every run directory and checkpoint


def test_a_training_worker_killed_mid_run_is_restarted_from_its_last_checkpoint(workspace, local_ray):
    """FailureConfig(max_failures=1): SIGKILL one Ray Train worker once a checkpoint is committed; the worker group
    restarts from a checkpoint and the drafter it exports equals an uninterrupted run's, bit for bit."""
    import signal
    import threading
    import time

    import psutil
    from safetensors.torch import load_file

    settings = ["epochs=6", "checkpoint_every=4", "mlflow.enabled=false"]  # 24 steps: time to kill after step 4
    reference = run_training(tiny_config(workspace, f"run_dir={workspace / 'runs' / 'uninterrupted'}", *settings))
    run_dir, killed = workspace / "runs" / "worker-killed", []

    def committed_step() -> int | None:
        snapshot = run_dir / RUN_SNAPSHOT_FILE
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        except (OSError, ValueError):  # not written yet, or caught mid-write
            return None
        return None if latest is None else latest["metrics"]["step"]

    def title(process) -> str:
        try:
            return " ".join(process.cmdline())
        except psutil.Error:  # exited meanwhile
            return ""

    def kill_one_worker_after_the_first_checkpoint() -> None:
        deadline = time.monotonic() + 300
        while committed_step() is None and time.monotonic() < deadline:  # Ray Train has committed a checkpoint
            time.sleep(0.02)
        # This test's own Ray runs as descendants of this process (its raylet spawns the workers), and worker
        # actors' processes are titled after their class: never touch another Ray on the machine.
        workers = [p for p in psutil.Process().children(recursive=True) if "RayTrainWorker" in title(p)]
        workers[-1].send_signal(signal.SIGKILL)
        killed.append(workers[-1].pid)

    killer = threading.Thread(target=kill_one_worker_after_the_first_checkpoint, daemon=True)
    killer.start()
    restarted = run_training(tiny_config(workspace, f"run_dir={run_dir}", "max_failures=1", *settings))
    killer.join(timeout=10)
    assert killed, "no worker was killed"
    outcome = restarted["result"]
    assert outcome["start_step"] in range(4, 24, 4) and outcome["end_step"] == 24  # the restarted group resumed
    weights = load_file(Path(restarted["drafter_dir"]) / WEIGHTS_FILE)
    expected = load_file(Path(reference["drafter_dir"]) / WEIGHTS_FILE)
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[name], expected[name]) for name in weights)


def test_fresh_restarts_the_run_directory_as_the_ablation(first_run, workspace):
    ablation = run_training(tiny_config(workspace, "max_steps=2", "csgd.glancing=false", "drafter.block_size=1",
                                        "scaling.num_workers=1", "scaling.cpus_per_worker=2"), fresh=True)
    outcome = ablation["result"]
    assert outcome["start_step"] == 0 and outcome["zero_stage"] == 2 and outcome["world_size"] == 1
    assert ablation["mlflow_run_id"] != first_run["mlflow_run_id"]
    assert all("train/glance_ratio" not in record for record in outcome["history"])
    assert load_drafter_config(ablation["drafter_dir"]).block_size == 1
    assert set(ablation["eval"]) >= {"eval/top1_pos1", "eval/tau_chain"} and "eval/top1_pos2" not in ablation["eval"]
    assert np.isfinite(ablation["eval"]["eval/loss"])
