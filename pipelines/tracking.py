"""MLflow locations shared by every job (one tracking URI convention, artifacts beside a SQLite database), and the
redaction of credentials from everything a job logs."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///runs/mlflow.db"
SQLITE = "sqlite:///"


@dataclass
class MlflowConfig:
    """Where a stage logs: the `mlflow` of train, package and benchmark (in a run config, from its one `mlflow:`
    block: pipelines.run_config)."""

    tracking_uri: str = DEFAULT_TRACKING_URI  # also the registry packages are registered in and loaded from
    experiment: str = "falcon"
    enabled: bool = True  # False: no run is logged (packaging needs the registry and refuses it)


def resolve_tracking_uri(uri: str | None = None) -> str:
    """`uri`, else $MLFLOW_TRACKING_URI, else the project's SQLite file; a relative SQLite path made absolute
    (jobs and Ray workers may run in other directories) and its folder created. Other URIs unchanged."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith(SQLITE) and not uri[len(SQLITE):].startswith("/"):
        path = Path(uri[len(SQLITE):]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return SQLITE + str(path)
    return uri


def ensure_experiment(client, name: str, tracking_uri: str) -> str:
    """The experiment's id. A new one on a SQLite database keeps its artifacts in `mlartifacts/` beside the
    database, not in the current directory (MLflow's default), so every job's artifacts land in one place."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if tracking_uri.startswith(SQLITE):
        artifact_location = (Path(tracking_uri.removeprefix(SQLITE)).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


# ---------------------------------------------------------------------------------------------------
# Redaction: what a config, URL or summary may show once it leaves the process (MLflow, summaries, logs)

# Whole settings that carry credentials (fsspec storage options: object-store keys, tokens, endpoints).
SECRET_SECTIONS = frozenset({"storage_options"})
# Names of secret values, matched on snake_case words. "token" and "key" alone are too broad for this project
# ("bytes_per_token", "method_token", "resume_key" are not secrets): only these bare names or qualified forms.
_SECRET_NAME = re.compile(
    r"^(key|token|auth|sig|signature)$"
    r"|(^|_)(secret|password|passwd|pwd|credentials?|signature)(_|$)"
    r"|(^|_)(api|access|private|account|secret|session|client|sas)_?key(_|$)"
    r"|(^|_)(access|auth|api|bearer|refresh|session|security|id|sas)_?token(_|$)"
)
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^\s/?#@]+@")
_QUERY_PARAM = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&;#\s?]+)=(?P<value>[^&;#\s]*)")
MASK = "***"


def is_secret_name(name: str) -> bool:
    """A setting or query parameter named like a credential (camelCase and dashes read as words)."""
    words = re.sub(r"([a-z0-9])([A-Z])|([A-Z])([A-Z][a-z])", r"\1\3_\2\4", str(name))
    words = re.sub(r"[^a-z0-9]+", "_", words.lower()).strip("_")
    return name in SECRET_SECTIONS or bool(_SECRET_NAME.search(words))


def redact_text(text: str) -> str:
    """`text` with every URL's `user:password@` removed and secret-looking query parameters masked."""
    text = _URL_USERINFO.sub(r"\g<scheme>", text)
    return _QUERY_PARAM.sub(
        lambda m: f"{m['lead']}{m['name']}={MASK}" if is_secret_name(m["name"]) else m[0], text)


def redact(value: Any) -> Any:
    """A copy of a config, URL or summary that is safe to log: mappings lose credential-named keys (and
    storage_options whole), strings lose URL credentials. Run everything bound for MLflow, a summary file or
    the job log through it."""
    if isinstance(value, Mapping):
        return {key: redact(item) for key, item in value.items() if not is_secret_name(key)}
    if isinstance(value, (list, tuple)):
        return [redact(item) for item in value]
    if isinstance(value, str):
        return redact_text(value)
    return value
