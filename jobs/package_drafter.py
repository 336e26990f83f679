"""Tune the decoding tree of a trained drafter, package it as an MLflow model, register it, check it, set the alias.

    python jobs/package_drafter.py --config jobs/configs/smollm2-demo.yaml [--set key=value ...] [--fresh]
    ray job submit --working-dir . -- python jobs/package_drafter.py --config jobs/configs/<name>.yaml

Reads the `package:` section of the config (see pipelines/packaging.py:PackageConfig); `--set` keys are
relative to it (`--set tree.mode=preset`). The drafter defaults to `<train.run_dir>/drafter` and the
held-out samples to the train section's store and split. No Ray needed: it runs the same under `ray job submit`.
The alias moves only once the registered version passed packaging's check (it loads back and decodes as
plain greedy decoding), and never back to an older version: the output says where it was left.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, also under `ray job submit`

from pipelines.packaging import describe_result, run_packaging  # noqa: E402
from pipelines.run_config import run_job  # noqa: E402


def package(config, args) -> None:
    print(describe_result(run_packaging(config, fresh=args.fresh)))


def main(argv: list[str] | None = None) -> int:
    return run_job(
        "package_drafter", __doc__.splitlines()[0], "package", run=package,
        errors=(FileNotFoundError,), argv=argv,
        fresh_help="re-tune the tree even if run_dir holds one for these inputs",
    )


if __name__ == "__main__":
    sys.exit(main())
