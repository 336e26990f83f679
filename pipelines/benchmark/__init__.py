"""Benchmark a packaged Falcon drafter against plain decoding of its target, with a losslessness audit.

    python jobs/benchmark.py --config jobs/configs/smollm2-demo.yaml [--set key=value ...]

Protocol (stated in every report):
- Same process, same target object, dtype and threads for every method; batch 1; greedy; the same prompts
  (chat template, first user turn; MT-Bench's second turn as an option) and the same max_new_tokens; a
  warm-up of every method first. For each prompt the methods run one after another, the order rotating
  from prompt to prompt, so that load from elsewhere on the machine hits every method alike.
- Methods: `autoregressive` (the project's own plain decoding loop), `hf_generate` (transformers'
  greedy `generate`), `falcon` (the registered drafter and tree, with the package's context-lookup chain if
  it has one), `falcon-drafter-only` (the same without the lookup chain), `prompt_lookup` (transformers'
  prompt-lookup decoding) and any extra drafter directory (ablations), decoded with the package's tree cut
  to the depth that drafter supports, or a tree of its own.
- The baseline is the faster of `autoregressive` and `hf_generate` (by mean per-sample tokens/s), so no
  speedup is claimed against a slow loop.
- tokens/s of a sample: new tokens / wall time of the whole call, prefill included.
- speedup (Spec-Bench): mean per-sample tokens/s of the method / mean per-sample tokens/s of the baseline.
- tau: tokens produced per target forward after the prefill, the bonus token included (plain decoding 1.00).
- alpha: accepted draft tokens / draft tokens on the deepest path the tree offered, over all steps.
- Losslessness: every output is compared token for token with `autoregressive`. At the first divergence the
  target is re-run on prompt + common prefix in the inference dtype and in higher precision; the divergence is
  a numerical tie when the exact margin between the two tokens is within `tie_factor` times (the rounding
  error the inference dtype made on that margin + one ulp of the logits), else real (DivergenceAuditor).

Outputs in run_dir: report.json, report.md, speedup.png, accepted_lengths.png; logged to MLflow too.

Modules: `config` (the `benchmark` section), `methods` (what is compared), `audit` (losslessness), `report`
(summaries, report.md, plots, MLflow), `run` (`run_benchmark`).
"""

from pipelines.benchmark.config import REPORT_MD, BenchmarkConfig, BenchmarkError
from pipelines.benchmark.run import run_benchmark

__all__ = ["REPORT_MD", "BenchmarkConfig", "BenchmarkError", "run_benchmark"]
