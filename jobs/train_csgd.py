"""Train a Falcon drafter with CSGD on Ray Train + DeepSpeed from a feature store, resuming a killed run.

    python jobs/train_csgd.py --config jobs/configs/smollm2-demo.yaml [--set key=value ...] [--fresh]
    ray job submit --working-dir . -- python jobs/train_csgd.py --config jobs/configs/<name>.yaml

Reads the `train:` section of the config (see pipelines/train/config.py: TrainConfig); `--set` keys are relative to
it (`--set optimizer.lr=1e-4`). Without `ray.address` or RAY_ADDRESS it starts a local Ray.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, also under `ray job submit`

from pipelines.run_config import run_job  # noqa: E402
from pipelines.train import run_training  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_job(
        "train_csgd", __doc__.splitlines()[0], "train",
        run=lambda config, args: run_training(config, fresh=args.fresh),
        argv=argv,
        fresh_help="delete the run directory's checkpoints and start over",
    )


if __name__ == "__main__":
    sys.exit(main())
