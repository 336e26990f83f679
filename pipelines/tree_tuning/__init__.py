"""Tune the candidate tree of a drafter for one target on one device (Sequoia-style), or give a fixed shape.

Three measurements, one construction:

1. Acceptance, on held-out samples of the feature store. At a decoding position L (L tokens in the target's
   cache, the root x_L being the newest token) the drafter drafts as `falcon.drafting.draft_tree` does, but
   along the TRUE continuation: pass 0 over the true context, pass p >= 1 fed the true tokens of depths
   (p-1)k+1 .. pk. For each depth d we record the rank of the true token x_{L+d} among the drafter's top-R
   candidates (R when it is not among them). Along an accepted path the candidate lists are exactly these,
   so the ranks decide acceptance for ANY tree: a node's path (r_1..r_d) is accepted iff ranks[:d] equals it.
   From them, p[d][r] = P(rank[d] = r | ranks[:d] all < R): the chance that the rank-r candidate at depth d
   is accepted given that its parent path was.
2. Verification cost: the target's forward of n new tokens under a tree mask over a cache of `cache_length`
   tokens, median over repeats.
3. Drafting cost: `draft_tree` on a tree with pass 0 only, and on trees whose pass 1 has b branches.

Construction: a node's value is the product of p along its path, its probability of being accepted. A
child's value never exceeds its parent's, so taking nodes in decreasing value gives nested prefix-closed
trees T_1 ⊂ T_2 ⊂ ..., T_n holding the n most valuable nodes (within the depth and per-depth rank bounds).
The tree kept is the T_n maximising

    E[accepted + 1](n) / (draft_ms(T_n) + verify_ms(n + 1)),    E[accepted + 1](n) = 1 + sum of values,

and the expected speedup is that rate times verify_ms(1), the cost of one plain decoding step (the same
forward with a single token). The ranks also give the held-out ("empirical") tau of every tree, reported
next to the model's expectation. With the context lookup on (`pipelines.lookup_tuning`), the lookup is replayed
at the same positions and each nested tree is paired with each candidate chain policy: the pair kept is the one
with the most expected tokens per millisecond, the chain's verification (and a skipped drafter) costed alike.

Modules, in the order the tuner runs them: `config` (the `tree` section, presets), `acceptance` (1), `costs`
(2, 3), `construction` (the nested trees, the choice, presets' shapes), `resolve` (the orchestration, with the
lookup chain from `pipelines.lookup_tuning`).
"""

from pipelines.tree_tuning.config import TreeTuningConfig, TreeTuningError
from pipelines.tree_tuning.resolve import resolve_tree

__all__ = ["TreeTuningConfig", "TreeTuningError", "resolve_tree"]
