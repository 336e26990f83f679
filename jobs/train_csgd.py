"""Train a Falcon drafter with CSGD on Ray Train + DeepSpeed from a feature store, resuming a killed run.

    python jobs/train_csgd.py --config jobs/configs/smollm2-demo.yaml [--set key=value ...] [--fresh]
    ray job submit --working-dir . -- python jobs/train_csgd.py --config jobs/configs/<name>.yaml

Reads the `train:` section of the config (see pipelines/train.py:TrainConfig); `--set` keys are relative to
it (`--set optimizer.lr=1e-4`). Without `ray.address` or RAY_ADDRESS it starts a local Ray.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, also under `ray job submit`

from pipelines.config import ConfigError, load_section  # noqa: E402
from pipelines.train import TrainConfig, TrainSetupError, run_training  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config file (see jobs/configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one value of the train section, dotted for nested keys; repeatable")
    parser.add_argument("--fresh", action="store_true", help="delete the run directory's checkpoints and start over")
    args = parser.parse_args(argv)
    try:
        config = load_section(TrainConfig, args.config, "train", args.overrides)
        run_training(config, fresh=args.fresh)
    except ConfigError as exc:
        print(f"train_csgd: config error: {exc}", file=sys.stderr)
        return 2
    except TrainSetupError as exc:
        print(f"train_csgd: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
