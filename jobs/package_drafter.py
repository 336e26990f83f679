"""Tune the decoding tree of a trained drafter, package it as an MLflow model, register it and set the alias.

    python jobs/package_drafter.py --config jobs/configs/smollm2-demo.yaml [--set key=value ...] [--fresh]
    ray job submit --working-dir . -- python jobs/package_drafter.py --config jobs/configs/<name>.yaml

Reads the `package:` section of the config (see pipelines/packaging.py:PackageConfig); `--set` keys are
relative to it (`--set tree.mode=preset`). The drafter defaults to `<train.run_dir>/drafter` and the
held-out samples to the train section's store and split. No Ray needed: it runs the same under `ray job submit`.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, also under `ray job submit`

from falcon.drafter import DrafterMismatchError  # noqa: E402
from falcon.target import TargetLoadError  # noqa: E402
from falcon.tree import TreeError  # noqa: E402
from feature_store import StoreMismatchError  # noqa: E402
from pipelines.config import ConfigError  # noqa: E402
from pipelines.inference import PackageError  # noqa: E402
from pipelines.packaging import describe_result, load_package_config, run_packaging  # noqa: E402
from pipelines.tree_tuning import TreeTuningError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config file (see jobs/configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one value of the package section, dotted for nested keys; repeatable")
    parser.add_argument("--fresh", action="store_true", help="re-tune the tree even if run_dir holds one for these inputs")
    args = parser.parse_args(argv)
    try:
        config = load_package_config(args.config, args.overrides)
        result = run_packaging(config, fresh=args.fresh)
    except ConfigError as exc:
        print(f"package_drafter: config error: {exc}", file=sys.stderr)
        return 2
    except (PackageError, TreeTuningError, TreeError, DrafterMismatchError, TargetLoadError, StoreMismatchError,
            FileNotFoundError) as exc:
        print(f"package_drafter: error: {exc}", file=sys.stderr)
        return 1
    print(describe_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
