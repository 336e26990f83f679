"""MLflow packaging (SQLite registry in tmp_path) and the inference module, on a tiny target.

The module fixture saves a tiny random target, writes a small feature store from its real forwards
(tests/store_fixtures.py) and saves a random drafter for it; packaging then tunes a tree on that store,
logs the pyfunc model from code, registers it and sets the alias once for the whole file.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from falcon.drafter import DrafterMismatchError
from falcon.generate import SamplingConfig, autoregressive_generate
from falcon.testing import make_tiny_target
from pipelines.inference import encode_prompt, generate_text, load_falcon
from pipelines.package_format import PackageError
from pipelines.packaging import CONTENT_HASH_TAG, PackageConfig, run_packaging
from pipelines.run_config import load_stage
from pipelines.tracking import MlflowConfig
from pipelines.tree_tuning import TreeTuningConfig
from tests.store_fixtures import trained_drafter_workspace

MODEL_NAME = "falcon-tiny"
PROMPTS = ["What is the capital of France?", "Write a short story about a robot.", "How do I sort a list in Python?"]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
TUNING = dict(max_nodes=12, max_ranks=[4, 2], max_positions=120, cache_length=32, timing_repeats=2)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return trained_drafter_workspace(tmp_path_factory.mktemp("packaging"))


def package_config(ws, **overrides) -> PackageConfig:
    values = dict(run_dir=str(ws["root"] / "package"), drafter_dir=str(ws["drafter_dir"]), target=str(ws["target_dir"]),
                  dtype="float32", model_name=MODEL_NAME, mlflow=MlflowConfig(tracking_uri=ws["tracking_uri"]),
                  tree=TreeTuningConfig(**TUNING))
    values.update(overrides)
    return PackageConfig(**values)


@pytest.fixture(scope="module")
def packaged(workspace):
    return run_packaging(package_config(workspace))


# ---------------------------------------------------------------------------------------------------
# Packaging, registry, inference


def test_package_is_registered_with_alias_and_report(workspace, packaged):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(workspace["tracking_uri"])
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert int(version.version) == packaged.published.version == 1 and not packaged.published.reused
    assert version.tags[CONTENT_HASH_TAG] == json.loads((workspace["root"] / "package/package/package.json").read_text())["content_hash"]
    report = packaged.tree_report
    assert 1 <= report["summary"]["nodes"] <= TUNING["max_nodes"] and report["summary"]["depth"] <= 6
    assert np.array(report["acceptance"]["conditional"]).shape == (6, 4)
    assert report["timing"]["verify_ms"] and report["timing"]["pass_ms"] and report["curve"]
    assert report["expected_speedup"] > 0 and report["expected_tau"] >= 1.0


def test_load_by_alias_generates_losslessly(workspace, packaged):
    package = load_falcon(f"models:/{MODEL_NAME}@champion", tracking_uri=workspace["tracking_uri"], dtype="float32")
    assert package.tree_paths == packaged.tree_paths
    assert package.info["registry"]["version"] == packaged.published.version
    for prompt in PROMPTS:
        falcon = generate_text(package, prompt, max_new_tokens=24)
        input_ids = encode_prompt(package.tokenizer, prompt)
        plain = autoregressive_generate(package.target, input_ids, 24, eos_token_id=package.eos_token_ids)
        assert falcon.token_ids == plain.tokens
        assert falcon.tau >= 1.0 and falcon.tokens_per_s > 0


def test_load_by_version_and_local_dir(workspace, packaged):
    by_version = load_falcon(f"models:/{MODEL_NAME}/1", tracking_uri=workspace["tracking_uri"], dtype="float32")
    local = load_falcon(packaged.package_dir, dtype="float32")
    assert by_version.tree_paths == local.tree_paths == packaged.tree_paths
    assert by_version.fingerprint == local.fingerprint


def test_fingerprint_mismatch_is_refused(workspace, packaged):
    other = make_tiny_target(seed=1)
    with pytest.raises(DrafterMismatchError, match="made for target"):
        load_falcon(packaged.package_dir, target=other)


def test_inference_cli_generates_and_compares(packaged, capsys):
    from pipelines.inference import main

    assert main(["--model", packaged.package_dir, "--prompt", PROMPTS[0], "--max-new-tokens", "8",
                 "--dtype", "float32"]) == 0
    output = capsys.readouterr().out
    assert "lookup chain off" in output and "identical output" in output and "speedup" in output
    assert main(["--model", "no/such/package", "--prompt", "Hi"]) == 1
    assert "neither an existing directory nor an MLflow URI" in capsys.readouterr().err


def test_bad_lookup_settings_in_a_package_are_refused(packaged, tmp_path):
    import shutil

    package_dir = tmp_path / "package"
    shutil.copytree(packaged.package_dir, package_dir)
    tree = json.loads((package_dir / "tree.json").read_text())
    (package_dir / "tree.json").write_text(json.dumps({**tree, "lookup": {"num_tokens": 2, "min_ngram": 0}}))
    with pytest.raises(PackageError, match="bad lookup settings"):
        load_falcon(package_dir, dtype="float32")


def test_pyfunc_predict_returns_text_and_stats(workspace, packaged, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", workspace["tracking_uri"])
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion", model_config={"dtype": "float32"})
    out = model.predict(pd.DataFrame({"prompt": PROMPTS[:2]}), params={"max_new_tokens": 8})
    assert list(out.columns) == ["text", "num_tokens", "tau", "tokens_per_s", "seconds", "steps"]
    assert len(out) == 2 and (out["num_tokens"] > 0).all() and (out["tau"] >= 1.0).all()
    package = load_falcon(packaged.package_dir, dtype="float32")
    assert out["text"][0] == generate_text(package, PROMPTS[0], 8).text
    sampled = model.predict([PROMPTS[0]], params={"max_new_tokens": 8, "temperature": 0.8, "seed": 3})
    assert sampled["num_tokens"][0] > 0


def test_job_rerun_reuses_the_version(workspace, packaged, capsys):
    from mlflow.tracking import MlflowClient

    from jobs.package_drafter import main

    ws = workspace
    config_path = ws["root"] / "job.yaml"
    config_path.write_text(yaml.safe_dump({
        "mlflow": {"tracking_uri": ws["tracking_uri"]},
        "train": {"run_dir": str(ws["root"] / "train")},
        "package": {"run_dir": str(ws["root"] / "package"), "target": str(ws["target_dir"]), "dtype": "float32",
                    "model_name": MODEL_NAME, "tree": TUNING},
    }))
    config = load_stage("package", config_path)  # the drafter from train's run_dir, the split from its record
    assert config.drafter_dir == str(ws["drafter_dir"]) and config.mlflow.tracking_uri == ws["tracking_uri"]
    assert main(["--config", str(config_path)]) == 0
    output = capsys.readouterr().out
    assert f"models:/{MODEL_NAME}@champion" in output and "reused" in output
    client = MlflowClient(ws["tracking_uri"])
    assert [int(v.version) for v in client.search_model_versions(f"name='{MODEL_NAME}'")] == [1]

    # Another tree is other content: a new version takes the alias. Re-running the first config finds its
    # version again but does not move the alias back to it: that is a deliberate promotion.
    assert main(["--config", str(config_path), "--set", "tree.mode=fixed", "--set", "tree.branching=[2,1]"]) == 0
    assert int(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == 2
    capsys.readouterr()
    assert main(["--config", str(config_path)]) == 0
    assert int(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == 2
    output = capsys.readouterr().out
    assert f"models:/{MODEL_NAME}/1" in output and "alias 'champion' left on version 2, newer than this version 1" in output
    assert len(client.search_model_versions(f"name='{MODEL_NAME}'")) == 2

    # So are other lookup settings, and the loaded package decodes with them.
    assert main(["--config", str(config_path), "--set", "lookup.num_tokens=3"]) == 0
    assert int(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == 3
    package = load_falcon(f"models:/{MODEL_NAME}@champion", tracking_uri=ws["tracking_uri"], dtype="float32")
    assert package.decoder.lookup.num_tokens == 3 and package.info["lookup"]["num_tokens"] == 3
    assert {v.tags.get("falcon.package_check") for v in client.search_model_versions(f"name='{MODEL_NAME}'")} == {"passed"}


def checked_config(ws, tmp_path, **tree) -> PackageConfig:
    """A fixed tree without the store (nothing measured), registered under its own name."""
    return package_config(ws, run_dir=str(tmp_path / "run"), store=None, model_name="falcon-tiny-checked",
                          tree=TreeTuningConfig(mode="fixed", **tree))


def test_a_version_failing_the_check_gets_no_alias(workspace, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(workspace["tracking_uri"])
    good = run_packaging(checked_config(workspace, tmp_path, branching=[2, 1]))
    assert good.published.alias == "champion" and good.published.version == 1
    # Rank 600 is beyond the 512-token draft vocabulary: packaging writes it, loading it back refuses it.
    with pytest.raises(PackageError, match="falcon-tiny-checked/2 failed packaging's check.*rank 600"):
        run_packaging(checked_config(workspace, tmp_path, paths=[[0], [600]]))
    assert int(client.get_model_version_by_alias("falcon-tiny-checked", "champion").version) == 1
    assert client.get_model_version("falcon-tiny-checked", "2").tags["falcon.package_check"].startswith("failed: ")


def test_a_version_that_decodes_wrongly_gets_no_alias(workspace, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from falcon.generate import FalconDecoder

    good = run_packaging(checked_config(workspace, tmp_path, branching=[1]))
    correct_generate = FalconDecoder.generate

    def off_by_one_token(self, *args, **kwargs):  # a decoder bug: the last token is another one
        result = correct_generate(self, *args, **kwargs)
        result.tokens[-1] = (result.tokens[-1] + 1) % self.target.config.vocab_size
        return result

    monkeypatch.setattr(FalconDecoder, "generate", off_by_one_token)
    with pytest.raises(PackageError, match="failed packaging's check.*no numerical tie explains it"):
        run_packaging(checked_config(workspace, tmp_path, branching=[1, 1]))
    champion = MlflowClient(workspace["tracking_uri"]).get_model_version_by_alias("falcon-tiny-checked", "champion")
    assert int(champion.version) == good.published.version


def test_job_reports_a_missing_drafter(workspace, tmp_path, capsys):
    from jobs.package_drafter import main

    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump({"package": {"run_dir": str(tmp_path / "run"),
                                                       "drafter_dir": str(tmp_path / "nothing")}}))
    assert main(["--config", str(config_path)]) == 1
    assert "no drafter at" in capsys.readouterr().err


def test_sampled_generation_runs(workspace, packaged):
    package = load_falcon(packaged.package_dir, dtype="float32")
    out = generate_text(package, [{"role": "user", "content": PROMPTS[1]}], 12, SamplingConfig(temperature=0.7, seed=0))
    assert 0 < out.num_tokens <= 12


def test_packaging_refuses_a_drafter_of_another_target(workspace, tmp_path):
    other_dir = tmp_path / "other-target"
    make_tiny_target(seed=1, save_dir=other_dir)
    with pytest.raises(DrafterMismatchError, match="trained for target"):
        run_packaging(package_config(workspace, target=str(other_dir), run_dir=str(tmp_path / "run")))
