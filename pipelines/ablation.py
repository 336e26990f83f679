"""The drafter ablation: train variants of one run config at equal steps, tune each one's drafter-only tree, and
compare them all in ONE benchmark run (same process, same prompts, rotating order), then write the table.

    python -m pipelines.ablation --config smollm2-demo [--variants teacher-forced,csgd,...] [--set key=value ...]

Run it after `make demo` (the benchmark's `model`, the demo's package, is the reference every row is measured
beside; its store is what every variant trains on). Each variant is the config plus its overrides (VARIANTS), in
its own train and package run directories under runs/ablation/<config>/ (--run-dir), so every row is trained by the same
code in the same run. Packaging a variant tunes its tree with no lookup chain (drafter alone) and
registers it as `falcon-ablation-<variant>`. Every step is a Ray job on a private loopback head, as in
`pipelines.demo`; re-running resumes (finished trainings and tunings are reused).

Writes runs/ablation/<config>/ablation.md and ablation.json: per variant, held-out top-1 by depth (training's
eval), the tuned tree and its expected tau, and the benchmark's tau and speedup per dataset.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from pipelines.benchmark.config import REPORT_JSON
from pipelines.config import ConfigError
from pipelines.demo import REPO, DemoError, resolve_config, run_step, step_command
from pipelines.package_format import TREE_FILE
from pipelines.packaging import SUMMARY_FILE
from pipelines.ray_utils import local_ray_head
from pipelines.run_config import check_run_config

# name: overrides of the run config. The ablation: the paper's objective against teacher forcing, our
# predicted-block objective on top of it, and k = 1 (an EAGLE-style one-token-per-pass drafter) as the reference.
VARIANTS: dict[str, list[str]] = {
    "teacher-forced": ["train.csgd.glancing=false"],
    "csgd": ["train.csgd.glancing=true"],
    "csgd-pass1": ["train.csgd.glancing=true", "train.csgd.pass1_weight=1.0"],
    "k1": ["train.csgd.glancing=false", "train.drafter.block_size=1"],
}
DRAFTER_ONLY_TREE = ["package.lookup.mode=fixed", "package.lookup.num_tokens=0"]


def variant_overrides(name: str, root: Path) -> list[str]:
    """The variant's overrides plus its own run directories and registered name."""
    return [*VARIANTS[name], f"train.run_dir={root / name / 'train'}", f"package.run_dir={root / name / 'package'}",
            f"package.model_name=falcon-ablation-{name}", *DRAFTER_ONLY_TREE]


def extra_drafter(name: str, root: Path) -> dict[str, Any]:
    """The benchmark's entry for a packaged variant: its drafter and the tree tuned for it."""
    package = root / name / "package" / "package"
    paths = json.loads((package / TREE_FILE).read_text())["paths"]
    return {"name": name, "drafter_dir": str(package / "drafter"), "paths": paths}


def ablation_table(variants: list[str], root: Path, report: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """One row per variant (JSON) and the markdown table."""
    datasets = list(report["results"])
    rows = []
    for name in variants:
        train = json.loads((root / name / "train" / SUMMARY_FILE).read_text())
        package = json.loads((root / name / "package" / SUMMARY_FILE).read_text())
        depths = sorted((int(k.rsplit("_", 1)[1]), v) for k, v in train["eval"].items()
                        if k.startswith("eval/top1_depth_"))
        bench = {d: report["results"][d]["methods"][name] for d in datasets}
        rows.append({"variant": name, "overrides": VARIANTS[name], "steps": train["steps"],
                     "top1_by_depth": [v for _, v in depths], "tau_chain": train["eval"].get("eval/tau_chain"),
                     "tree": package["tree"], "expected_tau": package.get("expected_tau"),
                     "benchmark": {d: {"tau": b["tau"], "speedup": b["speedup"],
                                       "real_divergences": b["real_divergences"]} for d, b in bench.items()}})
    header = ["drafter", "steps", "held-out top-1 by depth", "tree nodes", "expected τ",
              *(f"{d} τ / speedup" for d in datasets)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["variant"], str(row["steps"]), " / ".join(f"{v:.3f}" for v in row["top1_by_depth"]),
                 str(row["tree"]["nodes"]), f"{row['expected_tau']:.2f}" if row["expected_tau"] else "–",
                 *(f"{b['tau']:.2f} / {b['speedup']:.2f}x" for b in row["benchmark"].values())]
        lines.append("| " + " | ".join(cells) + " |")
    baseline = {d: report["results"][d]["baseline"] for d in datasets}
    lines += ["", f"Speedup over the faster plain decoding per dataset ({baseline}); machine {report['machine']['cpu']}, "
              f"{report['machine']['torch_threads']} threads, {report['config']['dtype']}, "
              f"{report['config']['max_new_tokens']} new tokens; every variant drafter alone (no lookup chain)."]
    return rows, "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="smollm2-demo", help="config name in jobs/configs/ or a YAML path")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one value for every variant and the benchmark; repeatable")
    parser.add_argument("--run-dir", default=None, help="where the variants and the table go (default: "
                        "runs/ablation/<config name>; relative to the repository, as the jobs' paths)")
    parser.add_argument("--step-timeout", type=float, default=3 * 3600, help="seconds before a step is stopped")
    parser.add_argument("--log-dir", default="runs/ablation", help="where the Ray head's log goes")
    args = parser.parse_args(argv)

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    try:
        unknown = sorted(set(variants) - set(VARIANTS))
        if unknown:
            raise ConfigError(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
        config = resolve_config(args.config)
        root = REPO / (args.run_dir or f"runs/ablation/{config.stem}")  # an absolute --run-dir stays as given
        for name in variants:  # every variant's config parses before anything runs
            check_run_config(config, [*args.overrides, *variant_overrides(name, root)], ["train", "package"])
        check_run_config(config, args.overrides, ["benchmark"])
    except (ConfigError, ValueError) as exc:
        print(f"ablation: config error: {exc}", file=sys.stderr)
        return 2

    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    bench_dir = root / "benchmark"
    try:
        with local_ray_head(str(log_dir / "ray-head.log")) as head:
            # Every training first, then every tuning: the tuner times the tree, so it runs after the long part.
            for step in ("train", "package"):
                for name in variants:
                    overrides = [*args.overrides, *variant_overrides(name, root)]
                    run_step(head, f"{step}-{name}", step_command(step, config, overrides), args.step_timeout)
            extras = yaml.safe_dump([extra_drafter(name, root) for name in variants], default_flow_style=True,
                                    width=1 << 20).strip()
            overrides = [*args.overrides, f"benchmark.run_dir={bench_dir}", f"benchmark.extra_drafters={extras}"]
            run_step(head, "benchmark", step_command("benchmark", config, overrides), args.step_timeout)
    except (DemoError, RuntimeError) as exc:
        print(f"\nablation: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nablation: interrupted; the Ray head was stopped. Re-run to resume.", file=sys.stderr)
        return 130

    report = json.loads((bench_dir / REPORT_JSON).read_text())
    rows, table = ablation_table(variants, root, report)
    (root / "ablation.json").write_text(json.dumps(rows, indent=2) + "\n")
    (root / "ablation.md").write_text(table)
    print(f"\n=== {root / 'ablation.md'}\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
