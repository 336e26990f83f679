"""Extract target features into a feature store (Ray Data), resuming where an earlier run stopped.

    python jobs/extract_features.py --config jobs/configs/smollm2-demo.yaml [--set key=value ...] [--fresh]
    ray job submit --working-dir . -- python jobs/extract_features.py --config jobs/configs/<name>.yaml

Reads the `extract:` section of the config (see pipelines/extract.py:ExtractConfig); `--set` keys are
relative to it (`--set store=/data/stores/x`). Without `ray.address` or RAY_ADDRESS it starts a local Ray.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, also under `ray job submit`

from falcon.target import TargetLoadError  # noqa: E402
from pipelines.config import ConfigError, load_section  # noqa: E402
from pipelines.extract import ExtractConfig, ExtractError, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config file (see jobs/configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one value of the extract section, dotted for nested keys; repeatable")
    parser.add_argument("--fresh", action="store_true", help="delete the existing store and extract again")
    args = parser.parse_args(argv)
    try:
        config = load_section(ExtractConfig, args.config, "extract", args.overrides)
        run(config, fresh=args.fresh)
    except ConfigError as exc:
        print(f"extract_features: config error: {exc}", file=sys.stderr)
        return 2
    except (ExtractError, TargetLoadError) as exc:
        print(f"extract_features: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
