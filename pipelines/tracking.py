"""MLflow locations shared by every job: one tracking URI convention, artifacts beside a SQLite database."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///runs/mlflow.db"
SQLITE = "sqlite:///"


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
