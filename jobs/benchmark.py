"""Benchmark a registered Falcon drafter against plain decoding, prompt lookup and ablations, with an audit.

    python jobs/benchmark.py --config jobs/configs/smollm2-demo.yaml [--set key=value ...]
    ray job submit --working-dir . -- python jobs/benchmark.py --config jobs/configs/<name>.yaml

Reads the `benchmark:` section of the config (see pipelines/benchmark/config.py: BenchmarkConfig); `--set` keys are
relative to it (`--set max_new_tokens=128`). Writes report.json, report.md and PNG plots to its run_dir,
logs them to MLflow, and prints report.md. Runs in the job's own process: batch-1 latency needs no cluster.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, also under `ray job submit`

from pipelines.benchmark import REPORT_MD, run_benchmark  # noqa: E402
from pipelines.run_config import run_job  # noqa: E402

REAL_DIVERGENCE_EXIT = 3


def benchmark(config, args) -> int:
    report = run_benchmark(config)
    print((Path(config.run_dir) / REPORT_MD).read_text())
    real = sum(m["real_divergences"] for r in report["results"].values() for m in r["methods"].values())
    if real:
        print(f"benchmark: {real} real divergence(s) from plain decoding: see report.json", file=sys.stderr)
        return REAL_DIVERGENCE_EXIT
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(
        "benchmark", __doc__.splitlines()[0], "benchmark", run=benchmark,
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
