"""One run config: a YAML file with a section per stage and one `mlflow:` block, each value written once.

    mlflow:     tracking_uri, experiments: {train, package, benchmark}
    extract:    ExtractConfig     (pipelines/extract/config.py)
    train:      TrainConfig       (pipelines/train/config.py)       store, storage_options <- extract
    package:    PackageConfig     (pipelines/packaging.py)           drafter_dir <- <train.run_dir>/drafter
    benchmark:  BenchmarkConfig   (pipelines/benchmark/config.py)   model <- models:/<package.model_name>@<alias>

A value a section leaves out that another stage produced is derived from where that stage writes it (the arrows
above); a value the section gives wins. Each stage's `mlflow` (tracking URI, experiment) comes from the one block,
and a section may add to it (`benchmark.mlflow.enabled: false`). Packaging takes the held-out split from the
drafter's own training record, not from the train section (pipelines.drafter_record).

`--set key=value` overrides are applied to the file before anything is derived, so `--set extract.store=X` moves
the store for training too. A job's overrides may leave out its own section's name (`--set epochs=3` for train);
there `mlflow.x` is that stage's own `mlflow` (`--set mlflow.enabled=false`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from falcon.errors import FalconError
from pipelines.config import ConfigError, build_section, set_dotted
from pipelines.ray_utils import task_error_cause
from pipelines.tracking import redact_text

SECTIONS = ("extract", "train", "package", "benchmark")
MLFLOW_STAGES = ("train", "package", "benchmark")
DRAFTER_SUBDIR = "drafter"  # pipelines.train.config.DRAFTER_DIR: where training exports its drafter in run_dir


def stage_classes() -> dict[str, type]:
    """{section: its config dataclass}. Imported here, not at module level: each pulls in its stage's libraries."""
    from pipelines.benchmark.config import BenchmarkConfig
    from pipelines.extract.config import ExtractConfig
    from pipelines.packaging import PackageConfig
    from pipelines.train.config import TrainConfig

    return {"extract": ExtractConfig, "train": TrainConfig, "package": PackageConfig, "benchmark": BenchmarkConfig}


def read_run_config(path: str | Path, overrides: list[str] | None = None, section: str | None = None) -> dict[str, Any]:
    """The file's mappings with `overrides` applied and derived values filled in (see the module docstring);
    keys of `overrides` not starting with a section or `mlflow.` are relative to `section`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    unknown = sorted(set(raw) - {*SECTIONS, "mlflow"})
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {unknown}; known: mlflow, {', '.join(SECTIONS)}")
    for name, value in raw.items():
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: '{name}:' must be a mapping, got {value!r}")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = (part.strip() for part in item.split("=", 1))
        head = key.split(".", 1)[0]
        if section is not None and (head not in (*SECTIONS, "mlflow") or (head == "mlflow" and section in MLFLOW_STAGES)):
            key = f"{section}.{key}"  # a job's own keys; its `mlflow.` is its own stage's, over the block
        elif head not in (*SECTIONS, "mlflow"):
            raise ConfigError(f"--set {item!r}: the key must start with a section ({', '.join(SECTIONS)}) or mlflow.")
        set_dotted(raw, key, yaml.safe_load(value) if value != "" else "")
    return derive(raw)


def derive(raw: dict[str, Any]) -> dict[str, Any]:
    """Fill in what each section leaves out from the stage that produces it (in place; returns `raw`)."""
    extract, train, package, benchmark = (raw.get(name) for name in SECTIONS)
    if train is not None and extract is not None:
        for key in ("store", "storage_options"):
            if key not in train and key in extract:
                train[key] = extract[key]
    if package is not None and train is not None:
        if "drafter_dir" not in package and train.get("run_dir"):
            package["drafter_dir"] = f"{str(train['run_dir']).rstrip('/')}/{DRAFTER_SUBDIR}"
        if "storage_options" not in package and "storage_options" in train:
            package["storage_options"] = train["storage_options"]
    if benchmark is not None and package is not None and "model" not in benchmark:
        if package.get("model_name"):
            benchmark["model"] = f"models:/{package['model_name']}@{package.get('alias', 'champion')}"
    mlflow = raw.get("mlflow") or {}
    unknown = sorted(set(mlflow) - {"tracking_uri", "experiments"})
    if unknown:
        raise ConfigError(f"mlflow: unknown key(s) {unknown}; known: tracking_uri, experiments")
    experiments = mlflow.get("experiments") or {}
    if not isinstance(experiments, dict) or set(experiments) - set(MLFLOW_STAGES):
        raise ConfigError(f"mlflow.experiments: a mapping of {', '.join(MLFLOW_STAGES)} to experiment names, "
                          f"got {experiments!r}")
    for name in MLFLOW_STAGES:
        stage = raw.get(name)
        if stage is None:
            continue
        own = stage.get("mlflow") or {}
        if not isinstance(own, dict):
            raise ConfigError(f"{name}.mlflow: expected a mapping, got {own!r}")
        inherited = {"tracking_uri": mlflow.get("tracking_uri"), "experiment": experiments.get(name)}
        stage["mlflow"] = {**{k: v for k, v in inherited.items() if v is not None}, **own}
    return raw


def load_stage(section: str, path: str | Path, overrides: list[str] | None = None):
    """The typed config of one stage from a run config file, derived values included."""
    classes = stage_classes()
    if section not in classes:
        raise ConfigError(f"unknown section {section!r}; known: {', '.join(SECTIONS)}")
    raw = read_run_config(path, overrides, section)
    if section not in raw:
        raise ConfigError(f"{path}: no '{section}:' section (a mapping) at the top level")
    return build_section(classes[section], raw[section], section)


def check_run_config(path: str | Path, overrides: list[str], sections: list[str]) -> dict[str, Any]:
    """Every named section built (so a bad value fails before any stage starts); {section: config}."""
    classes = stage_classes()
    raw = read_run_config(path, overrides)
    missing = [name for name in sections if name not in raw]
    if missing:
        raise ConfigError(f"{path}: no section(s) {missing} for the steps asked for")
    return {name: build_section(classes[name], raw[name], name) for name in sections}


def run_job(name: str, description: str, section: str, run: Callable[[Any, argparse.Namespace], Any],
            argv: list[str] | None = None, fresh_help: str | None = None,
            errors: tuple[type[BaseException], ...] = ()) -> int:
    """The command line every job shares: `--config FILE [--set key=value ...] [--fresh]`, then `run`, whose
    int result (if it returns one) is the exit code.

    A config that does not parse exits 2 and an expected failure (a `FalconError`, or one of `errors`) exits 1,
    each with one line naming the problem instead of a traceback (URL credentials in it removed).
    """
    parser = argparse.ArgumentParser(prog=f"jobs/{name}.py", description=description)
    parser.add_argument("--config", required=True, help="YAML config file (see jobs/configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one value, dotted (section.key; the {section} section's own keys need no section); "
                        "repeatable")
    if fresh_help:
        parser.add_argument("--fresh", action="store_true", help=fresh_help)
    args = parser.parse_args(argv)
    try:
        config = load_stage(section, args.config, args.overrides)
        result = run(config, args)
        return result if isinstance(result, int) else 0  # an int is the job's exit code
    except ConfigError as exc:
        print(f"{name}: config error: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    except (FalconError, *errors) as exc:
        print(f"{name}: error: {redact_text(str(task_error_cause(exc)))}", file=sys.stderr)
        return 1
