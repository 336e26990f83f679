"""CSGD training on Ray Train + DeepSpeed: setup errors, ZeRO-2 on 2 CPU workers, resume, export, losslessness.

The Ray tests share one local Ray and one run directory, in file order: the first run trains and exports, the
second resumes it, the export is decoded with, and the last one starts the same run directory over (--fresh)
as the k=1, CSGD-off ablation.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from falcon.drafter import load_drafter, load_drafter_config
from falcon.generate import FalconDecoder, autoregressive_generate
from falcon.target import load_target, target_fingerprint
from falcon.testing import make_tiny_target
from falcon.tree import TreeConfig
from pipelines.config import load_section
from pipelines.ray_utils import RayConfig, init_ray
from pipelines.train import (
    TrainConfig,
    TrainSetupError,
    chain_acceptance_length,
    epoch_batches,
    load_frozen_embedding_and_head,
    locate_embedding_and_head,
    prepare_run,
    run_training,
)
from tests.store_fixtures import prompt_ids, write_target_store

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "jobs" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    make_tiny_target("llama", save_dir=root / "target")
    write_target_store(root / "store", root / "target", n_samples=24)
    return root


def tiny_config(workspace: Path, *overrides: str) -> TrainConfig:
    return load_section(TrainConfig, TINY_CONFIG, "train", [
        f"store={workspace / 'store'}", f"target={workspace / 'target'}", f"run_dir={workspace / 'runs' / 'tiny'}",
        f"mlflow.tracking_uri=sqlite:///{workspace / 'mlflow.db'}", *overrides,
    ])


# -- pure pieces -----------------------------------------------------------------------------------------
def test_chain_acceptance_length_by_hand():
    # k = 2, depth 4: 1 + a1 + a1 a2 + a1 a2 a1 + a1 a2 a1 a2
    assert chain_acceptance_length([0.5, 0.4], 4) == pytest.approx(1 + 0.5 + 0.2 + 0.1 + 0.04)
    assert chain_acceptance_length([1.0], 6) == 7.0
    assert chain_acceptance_length([math.nan, 1.0], 4) == 1.0  # no data at a position counts as never accepted


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


def test_rerun_resumes_at_the_checkpointed_step_with_the_optimizer_state(first_run, workspace):
    resumed = run_training(tiny_config(workspace, "max_steps=6", "checkpoint_every=2"))
    outcome = resumed["result"]
    assert outcome["start_step"] == 4 and outcome["end_step"] == 6
    assert outcome["resumed_optimizer_digest"] == pytest.approx(first_run["result"]["optimizer_digest"], rel=1e-12)
    assert resumed["mlflow_run_id"] == first_run["mlflow_run_id"]
    with pytest.raises(TrainSetupError, match="cannot be resumed"):  # another drafter in the same run_dir
        prepare_run(tiny_config(workspace, "drafter.block_size=3"))


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
