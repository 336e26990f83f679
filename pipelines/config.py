"""Typed run configs: a dataclass per job, loaded from YAML, overridden with `--set key=value`.

Nested dataclasses map to nested YAML mappings; `--set a.b=3` reaches into them. Values given
with `--set` are parsed as YAML scalars, so `--set train.lr=3e-5` is a float and
`--set tree.paths=[[0],[1]]` a list.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pipelines.tracking import redact_text

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the job's config dataclass."""


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} fits none of {hint}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {hint.__name__}, got {value!r}")
        return _build(hint, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any or hint is None:
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "3e-5" as a string
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _build(cls: type[T], values: dict[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}".lstrip(".")) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # missing fields, or a __post_init__ check
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
    node[keys[-1]] = value


def load_section(cls: type[T], path: str | Path, section: str, overrides: list[str] | None = None) -> T:
    """Build `cls` from the `section:` mapping of a YAML file shared by several jobs, plus overrides.

    One file per config name holds every job's section (`extract:`, `train:`, ...); each job reads its
    own and ignores the others. Overrides are relative to the section (`store=x`; `extract.store=x` too).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict) or not isinstance(loaded.get(section), dict):
        raise ConfigError(f"{path}: no '{section}:' section (a mapping) at the top level")
    values = loaded[section]
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        _set_path(values, key.strip().removeprefix(f"{section}."), yaml.safe_load(raw) if raw != "" else "")
    return _build(cls, values, section)


def run_job(name: str, description: str, section: str, load: Callable[[str, list[str]], T],
            run: Callable[[T, argparse.Namespace], Any], errors: tuple[type[BaseException], ...],
            argv: list[str] | None = None, fresh_help: str | None = None) -> int:
    """The command line every job shares: `--config FILE [--set key=value ...] [--fresh]`, then `run`, whose
    int result (if it returns one) is the exit code.

    A config that does not parse exits 2 and an expected failure (`errors`) exits 1, each with one line
    naming the problem instead of a traceback (URL credentials in it removed).
    """
    parser = argparse.ArgumentParser(prog=f"jobs/{name}.py", description=description)
    parser.add_argument("--config", required=True, help="YAML config file (see jobs/configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one value of the {section} section, dotted for nested keys; repeatable")
    if fresh_help:
        parser.add_argument("--fresh", action="store_true", help=fresh_help)
    args = parser.parse_args(argv)
    try:
        config = load(args.config, args.overrides)
        result = run(config, args)
        return result if isinstance(result, int) else 0  # an int is the job's exit code
    except ConfigError as exc:
        print(f"{name}: config error: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    except errors as exc:
        print(f"{name}: error: {redact_text(str(exc))}", file=sys.stderr)
        return 1
