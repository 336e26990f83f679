"""The package directory: its layout and format version, written by `pipelines.packaging` and read by
`pipelines.inference` (and the pyfunc), so both sides name the same files.

    drafter/          model.safetensors (weights and the draft-to-target vocabulary map) + drafter_config.json
                      + train_info.json (its training record, pipelines.drafter_record, credentials removed)
    tree.json         {"paths": [[rank, ...], ...], "block_size": k, "summary": {...}}
    target.json       {"spec": load_target spec, "fingerprint": ..., "trust_remote_code": ..., "code_sha256": ...,
                       "description": ...}
    package.json      {"format": 1, "content_hash": ..., "expected": {...}}
    tree_report.json  how the tree was chosen (acceptance table, timings)
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from falcon.drafter import CONFIG_FILE, WEIGHTS_FILE
from falcon.errors import FalconError
from falcon.lookup import LookupConfig
from pipelines.drafter_record import TRAIN_INFO_FILE
from pipelines.tracking import redact

PACKAGE_FORMAT = 1
DRAFTER_DIR = "drafter"
TREE_FILE = "tree.json"
TARGET_FILE = "target.json"
PACKAGE_FILE = "package.json"
REPORT_FILE = "tree_report.json"
PYFUNC_ARTIFACT = "package"  # the pyfunc's artifact key

# The pyfunc's predict parameters and their defaults (also its MLflow signature; see pipelines.packaging).
PREDICT_PARAMS = {"max_new_tokens": 256, "temperature": 0.0, "top_p": 1.0, "seed": -1}
PREDICT_COLUMNS = {"text": "string", "num_tokens": "long", "tau": "double", "tokens_per_s": "double",
                   "seconds": "double", "steps": "long"}


class PackageError(FalconError, ValueError):
    """A package that cannot be found or read; the message says what is wrong."""


def find_package_dir(path: str | Path) -> Path:
    """The package inside a package directory itself, an MLflow model directory, or a packaging run directory."""
    path = Path(path)
    if (path / PACKAGE_FILE).is_file():
        return path
    mlmodel = path / "MLmodel"
    if mlmodel.is_file():
        flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
        artifact = (flavor.get("artifacts") or {}).get(PYFUNC_ARTIFACT)
        if isinstance(artifact, dict) and isinstance(artifact.get("path"), str):
            package_dir = _artifact_dir(path, artifact["path"])
            if (package_dir / PACKAGE_FILE).is_file():
                return package_dir
        raise PackageError(f"{path} is an MLflow model but not a Falcon package (no '{PYFUNC_ARTIFACT}' artifact)")
    if (path / "package" / PACKAGE_FILE).is_file():  # a packaging run directory
        return path / "package"
    raise PackageError(
        f"no Falcon package at {path}: expected {PACKAGE_FILE} there, an MLflow model directory, or a packaging "
        "run directory holding package/"
    )


def _artifact_dir(model_dir: Path, artifact_path: str) -> Path:
    """The directory an MLmodel names, refused unless it lies inside the model directory (no `..`, no absolute
    path, no symlink out): a downloaded model must not make us read files elsewhere on this machine."""
    resolved = (model_dir / artifact_path).resolve()
    if not resolved.is_relative_to(model_dir.resolve()):
        raise PackageError(f"{model_dir / 'MLmodel'}: the '{PYFUNC_ARTIFACT}' artifact path {artifact_path!r} leaves the "
                           "model directory; refusing to read it (a damaged or hostile model)")
    return resolved


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PackageError(f"incomplete package: {path} is missing")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PackageError(f"damaged package: {path} is not valid JSON ({error}); package the drafter again") from None
    if not isinstance(content, dict):
        raise PackageError(f"damaged package: {path} holds a {type(content).__name__}, not a JSON object")
    return content


def read_package(package_dir: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(package.json, target.json, tree.json) of a package directory, refused if missing, damaged or of another
    format version."""
    meta = read_json(package_dir / PACKAGE_FILE)
    if meta.get("format") != PACKAGE_FORMAT:
        raise PackageError(f"{package_dir}: package format {meta.get('format')!r}, this code reads {PACKAGE_FORMAT}")
    target_ref = read_json(package_dir / TARGET_FILE)
    tree = read_json(package_dir / TREE_FILE)
    if not isinstance(target_ref.get("fingerprint"), str):
        raise PackageError(f"damaged package: {package_dir / TARGET_FILE} records no target fingerprint")
    return meta, target_ref, tree


def content_hash(drafter_dir: Path, tree_paths: list[list[int]], fingerprint: str, lookup: dict[str, Any]) -> str:
    """sha256 over what the package computes with: drafter weights and config, tree, lookup, target fingerprint."""
    digest = hashlib.sha256()
    with (drafter_dir / WEIGHTS_FILE).open("rb") as weights:
        for chunk in iter(lambda: weights.read(1 << 20), b""):
            digest.update(chunk)
    drafter_config = json.loads((drafter_dir / CONFIG_FILE).read_text())
    canonical_paths = sorted((list(p) for p in tree_paths), key=lambda p: (len(p), p))
    for part in (drafter_config, canonical_paths, fingerprint, lookup):
        digest.update(json.dumps(part, sort_keys=True).encode())
    return digest.hexdigest()


def write_package(package_dir: Path, drafter_dir: Path, tree_paths: list[list[int]], tree_report: dict[str, Any],
                  target_ref: dict[str, Any], lookup: LookupConfig) -> dict[str, Any]:
    """(Re)write the package directory; returns its package.json content."""
    if package_dir.exists():
        shutil.rmtree(package_dir)
    shutil.copytree(drafter_dir, package_dir / DRAFTER_DIR)
    train_info = package_dir / DRAFTER_DIR / TRAIN_INFO_FILE
    if train_info.is_file():  # drafters trained before credentials were redacted carry their storage options
        train_info.write_text(json.dumps(redact(json.loads(train_info.read_text())), indent=2) + "\n")
    block_size, lookup_settings = tree_report["block_size"], asdict(lookup)
    (package_dir / TREE_FILE).write_text(json.dumps(
        {"paths": tree_paths, "block_size": block_size, "summary": tree_report["summary"], "lookup": lookup_settings},
        indent=1) + "\n")
    (package_dir / TARGET_FILE).write_text(json.dumps(target_ref, indent=2) + "\n")
    (package_dir / REPORT_FILE).write_text(json.dumps(tree_report, indent=1) + "\n")
    meta = {
        "format": PACKAGE_FORMAT,
        "content_hash": content_hash(drafter_dir, tree_paths, target_ref["fingerprint"], lookup_settings),
        "tree_mode": tree_report["mode"],
        "expected": {key: tree_report[key] for key in ("expected_tau", "empirical_tau", "expected_speedup", "step_ms",
                                                       "plain_step_ms") if key in tree_report},
        "created_unix": int(time.time()),
    }
    (package_dir / PACKAGE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta
