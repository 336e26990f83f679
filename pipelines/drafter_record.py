"""What a drafter directory records of how it was made (`train_info.json`): the training job writes it next to
the weights, packaging reads it, and it travels inside every package.

Packaging takes the held-out split (store, eval_fraction, split_seed) and the training's MLflow run from here,
never from another stage's config or from the directories around the drafter. Credentials never enter it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from falcon.errors import FalconError
from pipelines.tracking import redact

TRAIN_INFO_FILE = "train_info.json"


class DrafterRecordError(FalconError, ValueError):
    """A drafter directory without a readable training record; the message says what to do."""


@dataclass
class TrainingRecord:
    store: str  # the feature store trained on (an fsspec URL without credentials, or an absolute path)
    eval_fraction: float  # the held-out split training left out: store.split(eval_fraction, split_seed)
    split_seed: int
    step: int = 0  # optimizer steps trained
    target_dir: str | None = None
    mlflow_run_id: str | None = None  # the training's MLflow run
    mlflow_tracking_uri: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # the final held-out evaluation and training figures
    config: dict[str, Any] = field(default_factory=dict)  # the train section as it ran


def write_training_record(drafter_dir: Path, record: TrainingRecord) -> Path:
    path = Path(drafter_dir) / TRAIN_INFO_FILE
    path.write_text(json.dumps(redact(dataclasses.asdict(record)), indent=2, default=str) + "\n")
    return path


def read_training_record(drafter_dir: Path) -> TrainingRecord:
    """The record of a drafter directory, refused if missing or damaged."""
    path = Path(drafter_dir) / TRAIN_INFO_FILE
    if not path.is_file():
        raise DrafterRecordError(
            f"{drafter_dir} has no {TRAIN_INFO_FILE}: packaging needs the store and held-out split the drafter was "
            "trained with; train it with jobs/train_csgd.py, or write that record for a drafter made elsewhere")
    try:
        values = json.loads(path.read_text())
        names = {f.name for f in dataclasses.fields(TrainingRecord)}
        return TrainingRecord(**{key: value for key, value in values.items() if key in names})
    except (json.JSONDecodeError, TypeError, AttributeError) as error:
        raise DrafterRecordError(f"{path} is damaged ({error}); export the drafter again") from None
