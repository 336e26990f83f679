"""The candidate tree: its shape, the index tables drafting and verification need, and its attention mask.

A tree is a prefix-closed set of paths of ranks. The path (0, 2, 1) is the node reached by taking the drafter's
top-1 token at depth 1, its top-3 token at depth 2 and its top-2 token at depth 3. The root (depth 0) is the
target's newest token, which is not in the target's KV cache yet.

With block size k, drafter pass p proposes depths p*k+1 .. p*k+k at once, all from the same inputs: the
"pass branch", the node at depth p*k on the path (the root for pass 0). So every node at depth p*k+j takes
its token from the candidate list (pass branch, j); nodes sharing a pass branch share candidate lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from numbers import Integral

import torch

from falcon.errors import FalconError

# Draft tokens a served tree may hold. The paper's trees have 100-200; every node is verified by the target at
# every step, so far larger trees cost more than acceptance can gain back, and mostly mean a broken tree file.
MAX_TREE_NODES = 1024


class TreeError(FalconError, ValueError):
    """A tree shape that cannot be used."""


@dataclass
class TreeConfig:
    """Explicit rank paths (as the paper's hand-tuned trees), or per-depth branching (a full product)."""

    paths: list[list[int]] | None = None
    branching: list[int] | None = None

    def resolve_paths(self) -> list[tuple[int, ...]]:
        if (self.paths is None) == (self.branching is None):
            raise TreeError("a tree config needs exactly one of `paths` or `branching`")
        if self.branching is not None:
            if any(b < 1 for b in self.branching):
                raise TreeError(f"branching factors must be >= 1, got {self.branching}")
            paths: list[tuple[int, ...]] = []
            frontier: list[tuple[int, ...]] = [()]
            for width in self.branching:
                frontier = [prefix + (rank,) for prefix in frontier for rank in range(width)]
                paths.extend(frontier)
            return paths
        if not isinstance(self.paths, list | tuple):
            raise TreeError(f"tree paths must be a list of paths, got {type(self.paths).__name__}")
        return [_as_path(path) for path in self.paths]

    @classmethod
    def chain(cls, depth: int) -> TreeConfig:
        return cls(branching=[1] * depth)


def _as_path(path) -> tuple[int, ...]:
    """A path as a tuple of ranks; anything but a list of integers (a string, 1.5, true) is refused, not cast."""
    if not isinstance(path, list | tuple) or not all(isinstance(r, Integral) and not isinstance(r, bool) for r in path):
        raise TreeError(f"a tree path is a list of integer ranks, got {path!r}")
    return tuple(int(r) for r in path)


@dataclass
class Tree:
    """A validated tree with the index tables one decoding step needs, as tensors on one device.

    Nodes are numbered 1..N in (depth, path) order; 0 is the root. Per drafter pass p:
      branch_nodes[p]   (B_p,)   the nodes at depth p*k whose passes are needed (root for p = 0)
      parent_branch[p]  (B_p,)   for p >= 1, index of each branch's own pass branch in pass p-1
      input_nodes[p]    (B_p, k) for p >= 1, the path nodes at depths (p-1)*k+1 .. p*k feeding pass p
      ancestor_branch[p][q] (B_p,) for 1 <= q < p, index into pass q's branches of each branch's ancestor
      node_ids[p]       (M_p,)   the nodes whose tokens pass p proposes
      node_branch[p], node_offset[p], node_rank[p]  (M_p,) where those tokens sit in pass p's candidates
      top_ranks[p]      how many candidates per (branch, offset) pass p must keep
    """

    paths: list[tuple[int, ...]]
    block_size: int
    depth: int
    parents: torch.Tensor  # (N+1,), parent of each node, -1 for the root
    depths: torch.Tensor  # (N+1,)
    tree_mask: torch.Tensor  # (N+1, N+1) bool, node i sees node j iff j is i or an ancestor of i
    children: list[list[int]] = field(repr=False)
    branch_nodes: list[torch.Tensor] = field(repr=False)
    parent_branch: list[torch.Tensor] = field(repr=False)
    input_nodes: list[torch.Tensor] = field(repr=False)
    ancestor_branch: list[list[torch.Tensor]] = field(repr=False)
    node_ids: list[torch.Tensor] = field(repr=False)
    node_branch: list[torch.Tensor] = field(repr=False)
    node_offset: list[torch.Tensor] = field(repr=False)
    node_rank: list[torch.Tensor] = field(repr=False)
    top_ranks: list[int] = field(repr=False)
    # Nodes len(paths)+1 .. len(paths)+chain_length: a chain under the root filled by context lookup, not the drafter.
    chain_length: int = 0

    @property
    def num_nodes(self) -> int:
        """Draft tokens in the tree, root excluded."""
        return len(self.paths) + self.chain_length

    @property
    def max_path_length(self) -> int:
        """Draft tokens on the deepest path: the drafter's depth or the lookup chain's."""
        return max(self.depth, self.chain_length)

    @property
    def num_passes(self) -> int:
        return len(self.node_ids)


def build_tree(config: TreeConfig | list, block_size: int, max_depth: int | None = None, device=None, *,
               num_candidates: int | None = None, max_nodes: int | None = None) -> Tree:
    """Validate a tree shape and precompute its index tables for drafters of block size k.

    num_candidates: the drafter's vocabulary, so every rank must be below it (ranks index its top-k).
    max_nodes: the most draft tokens the tree may hold (MAX_TREE_NODES for a served tree).
    """
    if isinstance(config, list):
        config = TreeConfig(paths=config)
    paths = sorted(set(config.resolve_paths()), key=lambda p: (len(p), p))
    if any(len(p) == 0 for p in paths):
        raise TreeError("the empty path is the root; list only paths of length >= 1")
    if any(r < 0 for p in paths for r in p):
        raise TreeError("ranks must be >= 0")
    if max_nodes is not None and len(paths) > max_nodes:
        raise TreeError(f"the tree has {len(paths)} nodes, more than the {max_nodes} allowed")
    largest_rank = max((r for p in paths for r in p), default=-1)
    if num_candidates is not None and largest_rank >= num_candidates:
        raise TreeError(f"rank {largest_rank} in the tree, but the drafter proposes only {num_candidates} candidates "
                        f"(ranks 0..{num_candidates - 1}): the tree was made for a larger draft vocabulary")
    index = {(): 0}
    for i, path in enumerate(paths, start=1):
        if path[:-1] not in index:
            raise TreeError(f"path {list(path)} has no parent {list(path[:-1])} in the tree (paths must be prefix-closed)")
        index[path] = i
    depth = max((len(p) for p in paths), default=0)
    if max_depth is not None and depth > max_depth:
        raise TreeError(
            f"tree depth {depth} is deeper than the drafter supports ({max_depth} = max_passes x block_size); "
            "use a shallower tree or a drafter configured for more passes"
        )
    k = block_size
    num = len(paths) + 1
    parents = [-1] + [index[p[:-1]] for p in paths]
    depths = [0] + [len(p) for p in paths]
    children: list[list[int]] = [[] for _ in range(num)]
    for node in range(1, num):
        children[parents[node]].append(node)

    tree_mask = torch.zeros(num, num, dtype=torch.bool)
    for node, path in enumerate([()] + paths):
        for cut in range(len(path) + 1):
            tree_mask[node, index[path[:cut]]] = True

    num_passes = (depth + k - 1) // k
    branch_paths: list[list[tuple[int, ...]]] = []
    for p in range(num_passes):
        branch_paths.append(sorted({path[: p * k] for path in paths if len(path) > p * k}, key=lambda q: q))
    branch_index = [{bp: b for b, bp in enumerate(bps)} for bps in branch_paths]

    def as_tensor(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    branch_nodes, parent_branch, input_nodes, ancestor_branch = [], [], [], []
    node_ids, node_branch, node_offset, node_rank, top_ranks = [], [], [], [], []
    for p in range(num_passes):
        bps = branch_paths[p]
        branch_nodes.append(as_tensor([index[bp] for bp in bps]))
        if p == 0:
            parent_branch.append(as_tensor([]))
            input_nodes.append(as_tensor([]))
        else:
            parent_branch.append(as_tensor([branch_index[p - 1][bp[: (p - 1) * k]] for bp in bps]))
            input_nodes.append(as_tensor([[index[bp[:d]] for d in range((p - 1) * k + 1, p * k + 1)] for bp in bps]))
        ancestor_branch.append([as_tensor([branch_index[q][bp[: q * k]] for bp in bps]) for q in range(1, p)])
        in_pass = [path for path in paths if p * k < len(path) <= (p + 1) * k]
        node_ids.append(as_tensor([index[path] for path in in_pass]))
        node_branch.append(as_tensor([branch_index[p][path[: p * k]] for path in in_pass]))
        node_offset.append(as_tensor([len(path) - p * k - 1 for path in in_pass]))
        node_rank.append(as_tensor([path[-1] for path in in_pass]))
        top_ranks.append(max(path[-1] for path in in_pass) + 1)

    return Tree(
        paths=paths,
        block_size=k,
        depth=depth,
        parents=as_tensor(parents),
        depths=as_tensor(depths),
        tree_mask=tree_mask.to(device),
        children=children,
        branch_nodes=branch_nodes,
        parent_branch=parent_branch,
        input_nodes=input_nodes,
        ancestor_branch=ancestor_branch,
        node_ids=node_ids,
        node_branch=node_branch,
        node_offset=node_offset,
        node_rank=node_rank,
        top_ranks=top_ranks,
    )


def tree_attention_mask(tree_mask: torch.Tensor, past_length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D mask (1, 1, N+1, past + N+1): the whole prefix plus each node's ancestors.

    Additive (0 / finfo.min), not boolean: transformers' eager attention silently misreads a boolean 4D mask.
    """
    num = tree_mask.shape[0]
    allowed = torch.cat(
        [torch.ones(num, past_length, dtype=torch.bool, device=tree_mask.device), tree_mask], dim=1
    )
    mask = torch.zeros(allowed.shape, dtype=dtype, device=tree_mask.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def with_chain(tree: Tree, length: int) -> Tree:
    """The tree plus a chain of `length` nodes under the root, numbered after the drafter's nodes.

    The drafter's index tables only name nodes 1..len(paths), so they hold unchanged.
    """
    if tree.chain_length:
        raise TreeError("this tree already has a lookup chain")
    if length == 0:
        return tree
    first = tree.num_nodes + 1
    chain = list(range(first, first + length))
    num = first + length
    parents = torch.cat([tree.parents, torch.tensor([0] + chain[:-1], dtype=torch.long, device=tree.parents.device)])
    depths = torch.cat([tree.depths, torch.arange(1, length + 1, dtype=torch.long, device=tree.depths.device)])
    tree_mask = torch.zeros(num, num, dtype=torch.bool, device=tree.tree_mask.device)
    tree_mask[:first, :first] = tree.tree_mask
    tree_mask[first:, 0] = True
    tree_mask[first:, first:] = torch.ones(length, length, dtype=torch.bool, device=tree_mask.device).tril()
    children = [list(c) for c in tree.children] + [[node + 1] for node in chain[:-1]] + [[]]
    children[0].append(first)
    return replace(tree, parents=parents, depths=depths, tree_mask=tree_mask, children=children,
                               chain_length=length)
