"""Extract target features into a feature store (Ray Data), resuming where an earlier run stopped.

    python jobs/extract_features.py --config jobs/configs/smollm2-demo.yaml [--set key=value ...] [--fresh]
    ray job submit --working-dir . -- python jobs/extract_features.py --config jobs/configs/<name>.yaml

Reads the `extract:` section of the config (see pipelines/extract/config.py: ExtractConfig); `--set` keys are
relative to it (`--set store=/data/stores/x`). Without `ray.address` or RAY_ADDRESS it starts a local Ray.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, also under `ray job submit`

from pipelines.extract import run  # noqa: E402
from pipelines.run_config import run_job  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_job(
        "extract_features", __doc__.splitlines()[0], "extract",
        run=lambda config, args: run(config, fresh=args.fresh),
        argv=argv,
        fresh_help="delete the existing store and extract again",
    )


if __name__ == "__main__":
    sys.exit(main())
