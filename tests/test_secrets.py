"""Credentials never leave a job: `pipelines.tracking.redact` on configs, URLs and summaries, and the jobs'
logging spots that use it (the training job end to end is in tests/test_train.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pipelines.tracking import is_secret_name, redact, redact_text

KEY, SECRET, PASSWORD = "AKIA-SECRET-123", "s3cr3t-value", "pa55word"


def assert_no_secret(value) -> None:
    text = json.dumps(value, default=str)
    for secret in (KEY, SECRET, PASSWORD):
        assert secret not in text, f"{secret!r} leaked into {text}"


@pytest.mark.parametrize("url, expected", [
    (f"http://user:{PASSWORD}@127.0.0.1:5000", "http://127.0.0.1:5000"),
    (f"s3://{KEY}:{SECRET}@bucket/stores/x", "s3://bucket/stores/x"),
    (f"https://host/db?user=me&password={PASSWORD}&sslmode=require", "https://host/db?user=me&password=***&sslmode=require"),
    (f"https://acct.blob.core.windows.net/c/x?sv=2024&sig={SECRET}", "https://acct.blob.core.windows.net/c/x?sv=2024&sig=***"),
    (f"https://b.s3.amazonaws.com/k?X-Amz-Credential={KEY}&X-Amz-Security-Token={SECRET}&X-Amz-Expires=60",
     "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Security-Token=***&X-Amz-Expires=60"),
    (f"cannot reach http://u:{PASSWORD}@h:1/x: refused", "cannot reach http://h:1/x: refused"),
])
def test_urls_lose_user_password_and_secret_query_parameters(url, expected):
    assert redact_text(url) == expected


@pytest.mark.parametrize("plain", ["sqlite:////tmp/runs/mlflow.db", "models:/falcon-tiny@champion", "runs/stores/tiny",
                                   "s3://bucket/stores/x?version=3", "mail user@example.com"])
def test_plain_values_are_unchanged(plain):
    assert redact_text(plain) == plain


def test_mappings_drop_credential_named_keys_and_storage_options_but_keep_token_counts():
    summary = {
        "storage_options": {"endpoint_url": "http://127.0.0.1:9000", "anon": False},
        "aws_secret_access_key": SECRET, "AWSAccessKeyId": KEY, "password": PASSWORD, "token": SECRET,
        "client": {"apiKey": KEY, "session_token": SECRET, "region": "eu"},
        "runs": [{"tracking_uri": f"http://u:{PASSWORD}@h:5000"}],
        "max_new_tokens": 8, "bytes_per_token": 2.5, "method_token": 7, "resume_key": "k", "tokenizer": "bpe",
    }
    cleaned = redact(summary)
    assert_no_secret(cleaned)
    assert cleaned == {"client": {"region": "eu"}, "runs": [{"tracking_uri": "http://h:5000"}], "max_new_tokens": 8,
                       "bytes_per_token": 2.5, "method_token": 7, "resume_key": "k", "tokenizer": "bpe"}
    assert summary["password"] == PASSWORD  # a copy: the caller's values are untouched


@pytest.mark.parametrize("name", ["key", "secret", "token", "credentials", "client_secret", "account_key",
                                  "X-Goog-Signature", "refresh_token", "accessKeyId"])
def test_credential_names(name):
    assert is_secret_name(name)


@pytest.mark.parametrize("name", ["num_tokens", "eos_token_id", "sort_key", "keep_checkpoints", "topk", "lookup"])
def test_names_that_are_not_credentials(name):
    assert not is_secret_name(name)


def test_extraction_summary_names_the_store_without_credentials(tmp_path):
    from falcon.testing import make_tiny_target
    from pipelines.data import RejectCounter
    from pipelines.extract import ExtractConfig
    from pipelines.extract.run import summarise
    from tests.store_fixtures import write_target_store

    make_tiny_target("llama", save_dir=tmp_path / "target")
    store = write_target_store(tmp_path / "store", tmp_path / "target", n_samples=2, reply_tokens=4)
    config = ExtractConfig(inputs=["in.jsonl"], store=f"s3://{KEY}:{SECRET}@bucket/store",
                           storage_options={"key": KEY, "secret": SECRET})
    summary = summarise(config, store, {"architecture": "llama"}, [], 0, RejectCounter(), 1.0)
    assert_no_secret(summary)
    assert summary["store"] == "s3://bucket/store" and summary["config"]["store"] == "s3://bucket/store"


@pytest.mark.slow
def test_benchmark_params_hold_no_credentials(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipelines.benchmark import BenchmarkConfig
    from pipelines.benchmark.report import log_to_mlflow
    from pipelines.tracking import MlflowConfig

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model_uri = f"https://u:{PASSWORD}@models.example.com/falcon?sig={SECRET}"
    config = BenchmarkConfig(model=model_uri, run_dir=str(tmp_path), mlflow=MlflowConfig(tracking_uri, "secrets"))
    report = {"model": {"uri": model_uri, "fingerprint": "f", "registry": {}}, "machine": {"cpu": "test"},
              "results": {}}
    run_id = log_to_mlflow(config, tracking_uri, report, [])
    run = MlflowClient(tracking_uri).get_run(run_id)
    params = run.data.params
    assert_no_secret(params)
    assert_no_secret(run.data.tags)  # the run name too
    assert params["model"] == "https://models.example.com/falcon?sig=***"


@pytest.mark.slow
def test_packaging_a_drafter_whose_train_info_holds_credentials_registers_none(tmp_path):
    import torch

    from falcon.drafter import Drafter, DrafterConfig, save_drafter
    from falcon.target import load_target, target_fingerprint
    from falcon.testing import make_tiny_target
    from pipelines.packaging import PackageConfig, run_packaging
    from pipelines.tracking import MlflowConfig
    from pipelines.tree_tuning import TreeTuningConfig

    make_tiny_target("llama", save_dir=tmp_path / "target")
    target, tokenizer = load_target(tmp_path / "target")
    torch.manual_seed(0)
    drafter = Drafter(DrafterConfig.from_target(target.config, block_size=2, max_passes=4,
                                                target_fingerprint=target_fingerprint(target, tokenizer)))
    drafter_dir = save_drafter(drafter, tmp_path / "train" / "drafter")
    # As training runs wrote it before credentials were redacted: the config with its storage options.
    (drafter_dir / "train_info.json").write_text(json.dumps({
        "store": f"s3://{KEY}:{SECRET}@bucket/store", "eval_fraction": 0.05, "split_seed": 0, "step": 4,
        "mlflow_tracking_uri": f"http://user:{PASSWORD}@127.0.0.1:5000", "config": {
            "store": f"s3://{KEY}:{SECRET}@bucket/store", "storage_options": {"key": KEY, "secret": SECRET},
            "mlflow": {"tracking_uri": f"http://user:{PASSWORD}@127.0.0.1:5000"}}}))
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_packaging(PackageConfig(run_dir=str(tmp_path / "package"), drafter_dir=str(drafter_dir),
                                target=str(tmp_path / "target"), dtype="float32", model_name="falcon-secrets",
                                mlflow=MlflowConfig(tracking_uri), tree=TreeTuningConfig(mode="preset")))
    assert_no_secret_in_files(tmp_path, exclude=drafter_dir)
    packaged_info = json.loads((tmp_path / "package" / "package" / "drafter" / "train_info.json").read_text())
    assert packaged_info["step"] == 4 and packaged_info["config"]["store"] == "s3://bucket/store"


def assert_no_secret_in_files(root, exclude=None) -> None:
    """No file under `root` (the MLflow database and artifacts, run directories) holds a secret string."""
    for path in root.rglob("*"):
        if path.is_file() and (exclude is None or exclude not in path.parents):
            data = path.read_bytes()
            for secret in (KEY, SECRET, PASSWORD):
                assert secret.encode() not in data, f"{secret!r} leaked into {path}"


def test_train_config_redacts_to_plain_settings():
    from pipelines.train import TrainConfig

    config = TrainConfig(store=f"s3://{KEY}:{SECRET}@bucket/store", run_dir="runs/x",
                         storage_options={"key": KEY, "secret": SECRET})
    config.mlflow.tracking_uri = f"http://user:{PASSWORD}@127.0.0.1:5000"
    cleaned = redact(dataclasses.asdict(config))
    assert_no_secret(cleaned)
    assert "storage_options" not in cleaned and cleaned["mlflow"]["tracking_uri"] == "http://127.0.0.1:5000"


def test_a_job_error_line_names_the_store_without_its_credentials(tmp_path, capsys):
    from falcon.testing import make_tiny_target
    from jobs.train_csgd import main

    make_tiny_target("llama", save_dir=tmp_path / "target")
    code = main(["--config", str(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny.yaml"), "--set", f"store=memory://user:{PASSWORD}@bucket/store",
                 "--set", f"target={tmp_path / 'target'}", "--set", f"run_dir={tmp_path / 'run'}",
                 "--set", "mlflow.enabled=false"])
    err = capsys.readouterr().err
    assert code == 1 and "train_csgd: error: feature store: " in err and "memory://bucket/store" in err
    assert PASSWORD not in err
