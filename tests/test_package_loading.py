"""Packages that must be refused at load, and one that must not be: a package asking to run its target's code,
an MLmodel whose artifact path leaves the model directory, trees the drafter cannot serve; a float16 load.

The packages are written directly with `pipelines.packaging.write_package` (a random drafter, a fixed tree,
a real tiny target saved to disk): no tuning, so each one takes well under a second. A hostile target is a
real HF directory whose config names its own model class (`auto_map`); importing its module writes a marker
file, so a test sees whether any code it brings ran.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from falcon.drafter import Drafter, DrafterConfig, DrafterMismatchError, save_drafter
from falcon.lookup import LookupConfig
from falcon.target import describe_target, load_target, target_fingerprint
from falcon.testing import make_tiny_target
from falcon.tree import MAX_TREE_NODES
from pipelines.inference import generate_text, load_falcon
from pipelines.package_format import PackageError
from pipelines.packaging import write_package
from pipelines.tree_tuning.resolve import tree_summary

DRAFT_VOCAB = 64
TREE_PATHS = [[0], [1], [0, 0]]
REMOTE_MODEL_TYPE = "falcon_test_remote"
REMOTE_MODULE = '''
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

{side_effect}


class RemoteConfig(LlamaConfig):
    model_type = "{model_type}"


class RemoteForCausalLM(LlamaForCausalLM):
    config_class = RemoteConfig
'''


def save_remote_code_target(directory: Path, marker: Path | None = None) -> Path:
    """A tiny target loadable only through its own module; importing the module writes `marker` if given."""
    make_tiny_target(save_dir=directory)
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = REMOTE_MODEL_TYPE
    config["auto_map"] = {"AutoConfig": "remote_model.RemoteConfig", "AutoModelForCausalLM": "remote_model.RemoteForCausalLM"}
    (directory / "config.json").write_text(json.dumps(config))
    side_effect = f"Path({str(marker)!r}).write_text('imported')" if marker else ""
    (directory / "remote_model.py").write_text(REMOTE_MODULE.format(side_effect=side_effect, model_type=REMOTE_MODEL_TYPE))
    return directory


def save_random_drafter(directory: Path, target, fingerprint: str) -> Path:
    torch.manual_seed(0)
    config = DrafterConfig.from_target(target.config, block_size=2, max_passes=2, draft_vocab_size=DRAFT_VOCAB,
                                       target_fingerprint=fingerprint)
    drafter = Drafter(config)
    drafter.set_draft_vocab(torch.arange(DRAFT_VOCAB))
    return save_drafter(drafter, directory)


def write_test_package(package_dir: Path, drafter_dir: Path, target_ref: dict, paths=TREE_PATHS) -> dict:
    report = {"mode": "fixed", "block_size": 2, "summary": tree_summary([tuple(p) for p in paths], 2)}
    return write_package(package_dir, drafter_dir, paths, report, target_ref, LookupConfig())


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A correct package for a plain tiny target: its directories and the loaded target."""
    root = tmp_path_factory.mktemp("package-loading")
    target_dir = root / "target"
    make_tiny_target(save_dir=target_dir)
    target, tokenizer = load_target(target_dir)
    fingerprint = target_fingerprint(target, tokenizer)
    drafter_dir = save_random_drafter(root / "drafter", target, fingerprint)
    target_ref = {"spec": str(target_dir), "fingerprint": fingerprint, "trust_remote_code": False,
                  "description": describe_target(target, tokenizer)}
    write_test_package(root / "package", drafter_dir, target_ref)
    return dict(root=root, target_dir=target_dir, drafter_dir=drafter_dir, package_dir=root / "package",
                target_ref=target_ref, target=(target, tokenizer))


@pytest.fixture()
def hostile(plain, tmp_path):
    """A package whose target.json asks for trust_remote_code, naming a target whose module writes a marker."""
    marker = tmp_path / "remote-code-ran"
    target_dir = save_remote_code_target(tmp_path / "hostile-target", marker)
    target_ref = {**plain["target_ref"], "spec": str(target_dir), "trust_remote_code": True}
    meta = write_test_package(tmp_path / "package", plain["drafter_dir"], target_ref)
    return dict(package_dir=tmp_path / "package", marker=marker, content_hash=meta["content_hash"])


# ---------------------------------------------------------------------------------------------------
# Remote code (issue 12, item 1)


def test_a_package_cannot_turn_on_trust_remote_code(hostile):
    with pytest.raises(PackageError, match="trust_remote_code.*never taken from a package"):
        load_falcon(hostile["package_dir"], dtype="float32")
    assert not hostile["marker"].exists()


def test_the_cli_does_not_run_a_package_target_code(hostile, capsys):
    from pipelines.inference import main

    assert main(["--model", str(hostile["package_dir"]), "--prompt", "Hi", "--dtype", "float32"]) == 1
    assert "trust_remote_code" in capsys.readouterr().err
    assert not hostile["marker"].exists()


@pytest.mark.slow
def test_a_registry_pull_does_not_run_a_package_target_code(hostile, tmp_path, monkeypatch):
    import mlflow

    from pipelines.packaging import register_package

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registered = register_package(hostile["package_dir"], hostile["content_hash"], model_name="hostile",
                                  tracking_uri=tracking_uri, experiment="hostile", model_config={"dtype": "float32"},
                                  params={}, metrics={}, tags={})
    uri = f"models:/hostile/{registered.version}"
    with pytest.raises(PackageError, match="trust_remote_code"):
        load_falcon(uri, tracking_uri=tracking_uri, dtype="float32")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    with pytest.raises(PackageError, match="trust_remote_code"):
        mlflow.pyfunc.load_model(uri)
    assert not hostile["marker"].exists()


def test_opting_in_checks_the_target_code_before_importing_it(plain, tmp_path):
    from pipelines.packaging import target_reference

    target_dir = save_remote_code_target(tmp_path / "remote-target")
    target, tokenizer = load_target(target_dir, trust_remote_code=True)
    fingerprint = target_fingerprint(target, tokenizer)
    drafter_dir = save_random_drafter(tmp_path / "drafter", target, fingerprint)
    target_ref = target_reference(str(target_dir), target, tokenizer, trust_remote_code=True)
    write_test_package(tmp_path / "package", drafter_dir, target_ref)
    package = load_falcon(tmp_path / "package", dtype="float32", trust_remote_code=True)
    assert package.fingerprint == fingerprint and generate_text(package, "Hi", 4).num_tokens > 0

    # The same target with its module edited: refused before the new code is imported.
    marker = tmp_path / "edited-code-ran"
    edited_dir = shutil.copytree(target_dir, tmp_path / "edited-target")
    save_remote_code_target(edited_dir, marker)
    with pytest.raises(DrafterMismatchError, match="Python code.*not the code this package was made with"):
        load_falcon(tmp_path / "package", dtype="float32", trust_remote_code=True, target=str(edited_dir))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# MLmodel artifact paths (item 3)


@pytest.mark.parametrize("artifact_path", ["../outside", "artifacts/../../outside", "ABSOLUTE"])
def test_an_mlmodel_artifact_path_outside_the_model_directory_is_refused(plain, tmp_path, artifact_path):
    shutil.copytree(plain["package_dir"], tmp_path / "outside")
    model_dir = tmp_path / "model"
    (model_dir / "artifacts").mkdir(parents=True)
    path = str(tmp_path / "outside") if artifact_path == "ABSOLUTE" else artifact_path
    flavor = {"python_function": {"artifacts": {"package": {"path": path}}}}
    (model_dir / "MLmodel").write_text(yaml.safe_dump({"flavors": flavor}))
    with pytest.raises(PackageError, match="leaves the model directory"):
        load_falcon(model_dir, dtype="float32")


# ---------------------------------------------------------------------------------------------------
# Trees (item 12)

WIDE_TREE = [[r] for r in range(DRAFT_VOCAB)] + [[r, s] for r in range(DRAFT_VOCAB) for s in range(16)]


@pytest.mark.parametrize("tree, message", [
    ({"paths": [[0], [DRAFT_VOCAB]]}, f"rank {DRAFT_VOCAB} in the tree, but the drafter proposes only {DRAFT_VOCAB}"),
    ({"paths": WIDE_TREE}, f"the tree has {len(WIDE_TREE)} nodes, more than the {MAX_TREE_NODES} allowed"),
    ({"paths": [[0], [0, 0, 0, 0, 0]]}, "no parent"),
    ({"paths": [[0] * depth for depth in range(1, 6)]}, "deeper than the drafter supports"),
    ({"paths": [[0], [0, "1"]]}, "integer ranks"),
    ({"paths": "0,1"}, "list of paths"),
    ({"block_size": 2}, "no 'paths'"),
    ("{not json", "not valid JSON"),
])
def test_an_invalid_tree_is_refused_at_load(plain, tmp_path, tree, message):
    package_dir = shutil.copytree(plain["package_dir"], tmp_path / "package")
    (package_dir / "tree.json").write_text(tree if isinstance(tree, str) else json.dumps(tree))
    with pytest.raises(PackageError, match="tree.json") as error:
        load_falcon(package_dir, target=plain["target"])
    assert message in str(error.value)


# ---------------------------------------------------------------------------------------------------
# float16 (item 9)


def test_a_package_loads_in_float16(plain):
    package = load_falcon(plain["package_dir"], dtype="float16")
    assert package.target.dtype == torch.float16 and package.fingerprint == plain["target_ref"]["fingerprint"]
    assert generate_text(package, "What is the capital of France?", 4).num_tokens > 0
