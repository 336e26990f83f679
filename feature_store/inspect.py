"""Print a feature store's metadata and contents: `python -m feature_store.inspect URL [--verify]`."""

from __future__ import annotations

import argparse
import json
import sys

from feature_store.schema import StoreMismatchError
from feature_store.store import MANIFEST_FILE, FeatureStore


def summarize(store: FeatureStore) -> str:
    meta = store.metadata
    shards = store.shards
    n_tokens = store.num_tokens
    n_loss = sum(r.n_loss_tokens for r in shards)
    nbytes = sum(r.nbytes for r in shards)
    raw = meta.raw_bytes_per_token()
    lines = [
        f"store            {store.location.redacted()}",
        f"schema_version   {meta.schema_version}",
        f"target           {meta.target_fingerprint}",
        f"tokenizer        {meta.tokenizer}",
        f"hidden           {meta.hidden_size} x {meta.hidden_dtype}",
        f"vocab            {meta.vocab_size}",
        f"topk             {meta.topk}" + (f" x {meta.topk_dtype} logits + logsumexp" if meta.topk else ""),
        f"extraction       {json.dumps(meta.extraction_config, sort_keys=True)}",
        f"shards           {len(shards)} committed"
        + (f" (ids {shards[0].shard_id}..{shards[-1].shard_id})" if shards else ""),
        *[f"not committed    {name}: {reason}" for name, reason in store.ignored.items()],
        f"samples          {store.num_samples:,}",
        f"tokens           {n_tokens:,} ({n_loss:,} loss-masked)",
        f"stored           {nbytes / 1e6:,.1f} MB",
    ]
    if n_tokens:
        lines.append(
            f"bytes/token      {nbytes / n_tokens:,.1f} stored, {raw} raw ({raw * n_tokens / nbytes:.2f}x)"
        )
    manifest = store.read_manifest()
    if manifest is None:
        lines.append(f"manifest         no {MANIFEST_FILE} yet")
    else:
        listed = set(manifest.column("name").to_pylist())
        fresh = listed == {r.name for r in shards}
        lines.append(f"manifest         {manifest.num_rows} shard(s), {'up to date' if fresh else 'STALE'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m feature_store.inspect", description=__doc__)
    parser.add_argument("url", help="store path or fsspec URL")
    parser.add_argument("--verify", action="store_true", help="re-read every shard and check its checksums")
    args = parser.parse_args(argv)
    try:
        store = FeatureStore.open(args.url)
    except (FileNotFoundError, StoreMismatchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summarize(store))
    if args.verify:
        report = store.verify()
        print(report)
        return 0 if report.ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
