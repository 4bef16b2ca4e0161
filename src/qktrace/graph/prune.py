"""Influence pruning, replacement and completeness scores, and target-driven source selection.

The graph is layered: a list of `Block`s, each the dense weights from its source nodes into its
target nodes, in topological order from the logits down. Every node is the target of at most one
block and a source of at most one block, and the block reading a node comes before the block
writing it, so the Neumann series of the adjacency matrix is one sweep over the blocks.

 1. Normalise: each target's incoming |weights| sum to 1.
 2. Influence: w = logit probabilities on logit nodes; sweeping down, influence[src] +=
    (w + influence)[tgt] @ |A|_norm. This is w @ (A + A^2 + ...), as in circuit-tracer.
 3. Keep the nodes that cover `node_threshold` of the total influence (and, if given, at most
    `max_features` features); tokens and logits always stay.
 4. On the kept nodes, renormalise and recompute influence; an edge scores |A|_norm[t, s] times
    (w + influence)[t]; keep the edges covering `edge_threshold` of the total score.
 5. Repeat until stable: feature, error and bias nodes need an outgoing edge, features an incoming one.

Replacement score: token influence / (token + error influence). Completeness: the influence-weighted
mean, over nodes, of the share of a node's normalised input that does not come from error nodes.
Bias nodes are exact constants of the model, so they count as explained in both scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError
from ..nodes import Kind

KIND_CODE = {kind: i for i, kind in enumerate(Kind)}
LEAF_KINDS = (Kind.ERROR, Kind.SAE_BIAS, Kind.ATTN_BIAS, Kind.MLP_BIAS)


@dataclass(frozen=True, eq=False)
class Block:
    """Dense weights from `sources` into `targets` (global node indices); rows are targets."""

    targets: Tensor  # [tgt] long
    sources: Tensor  # [src] long
    weight: Tensor  # [tgt, src]


@dataclass(frozen=True, eq=False)
class Pruned:
    node_mask: Tensor  # [node] bool
    edge_masks: tuple[Tensor, ...]  # per block, [tgt, src] bool
    edge_scores: tuple[Tensor, ...]  # per block, [tgt, src]: |A|_norm * (w + influence) on kept nodes
    influence: Tensor  # [node] on the whole graph
    cumulative: Tensor  # [node] share of total influence of the nodes at least as influential


def is_kind(kinds: Tensor, *wanted: Kind) -> Tensor:
    out = torch.zeros_like(kinds, dtype=torch.bool)
    for kind in wanted:
        out |= kinds == KIND_CODE[kind]
    return out


def normalized(weight: Tensor) -> Tensor:
    """|weight| with each row (a target's inputs) summing to 1; all-zero rows stay zero."""
    a = weight.abs()
    return a.div_(a.sum(1, keepdim=True).clamp_min(1e-30))


def _kept_abs(block: Block, node_mask: Tensor | None) -> Tensor:
    """|weight| with the rows and columns of dropped nodes zeroed (a fresh tensor)."""
    a = block.weight.abs()
    if node_mask is not None:
        a[~node_mask[block.targets]] = 0
        a[:, ~node_mask[block.sources]] = 0
    return a


def influence(blocks: Sequence[Block], logit_weights: Tensor, node_mask: Tensor | None = None) -> Tensor:
    """Influence of every node on the weighted logits: logit_weights @ (A + A^2 + ...), by one sweep.
    With `node_mask`, on the graph restricted to those nodes (rows renormalised)."""
    out = torch.zeros_like(logit_weights)
    for block in blocks:
        a = _kept_abs(block, node_mask)
        carried = (logit_weights[block.targets] + out[block.targets]).to(a.dtype)
        out.index_add_(0, block.sources, (carried / a.sum(1).clamp_min(1e-30)) @ a)
    return out


def find_threshold(scores: Tensor | Sequence[Tensor], fraction: float, exact_below: int = 1 << 22) -> float:
    """The smallest score among the top scores that together cover `fraction` of the total.

    Large inputs (a list of per-block tensors) are not sorted whole: a weighted histogram over
    log-scores finds the bin where the cover is reached, and only that bin is sorted (same result).
    """
    parts = [s.flatten() for s in ([scores] if isinstance(scores, Tensor) else scores)]
    parts = [p[p > 0].double() for p in parts]
    n = sum(len(p) for p in parts)
    if n == 0:
        return float("inf")
    total = float(sum(float(p.sum()) for p in parts))
    if n <= exact_below:
        s = torch.sort(torch.cat(parts), descending=True).values
        i = int(torch.searchsorted(torch.cumsum(s, 0) / total, torch.tensor([fraction], dtype=s.dtype)))
        return float(s[min(i, n - 1)])
    logs = [p.log() for p in parts]
    lo = min(float(x.min()) for x in logs)
    hi = max(float(x.max()) for x in logs)
    bins = 1 << 16
    width = max(hi - lo, 1e-12) / (bins - 1)
    hist = torch.zeros(bins, dtype=torch.float64)
    where = [((x - lo) / width).long().clamp_(0, bins - 1) for x in logs]
    for p, w in zip(parts, where):
        hist.index_add_(0, w.cpu(), p.cpu())
    above = torch.cumsum(hist.flip(0), 0)  # mass of the top bins
    k = min(int(torch.searchsorted(above, torch.tensor([fraction * total], dtype=above.dtype))), bins - 1)
    b = bins - 1 - k  # the bin where the cover is reached
    before = float(above[k - 1]) if k > 0 else 0.0
    inside = torch.sort(torch.cat([p[w == b].cpu() for p, w in zip(parts, where)]), descending=True).values
    i = int(torch.searchsorted(before + torch.cumsum(inside, 0), torch.tensor([fraction * total], dtype=inside.dtype)))
    return float(inside[min(i, len(inside) - 1)])


def cumulative_share(values: Tensor) -> Tensor:
    """For each node, the share of the total held by the nodes at least as large as it."""
    s, order = torch.sort(values, descending=True)
    out = torch.zeros_like(values)
    out[order] = torch.cumsum(s, 0) / s.sum().clamp_min(1e-30)
    return out


def _check_fraction(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise InputError(f"{name}={value} is not a fraction: give a value in 0..1 (default 0.8 / 0.98)")


def prune(
    blocks: Sequence[Block],
    kinds: Tensor,
    logit_weights: Tensor,
    node_threshold: float,
    edge_threshold: float,
    max_features: int | None = None,
) -> Pruned:
    """Steps 1-5 of the module docstring."""
    _check_fraction(node_threshold, "node_threshold")
    _check_fraction(edge_threshold, "edge_threshold")
    infl = influence(blocks, logit_weights)
    always = is_kind(kinds, Kind.TOKEN, Kind.LOGIT)
    feature = is_kind(kinds, Kind.FEATURE)
    node_mask = (infl >= find_threshold(infl, node_threshold)) | always
    if max_features is not None:
        ranked = torch.argsort(torch.where(feature, infl, -1.0), descending=True)
        node_mask[ranked[max_features:]] &= ~feature[ranked[max_features:]]
    kept_infl = influence(blocks, logit_weights, node_mask)
    scores = []
    for block in blocks:
        a = _kept_abs(block, node_mask)
        carried = (logit_weights + kept_infl)[block.targets].to(a.dtype)
        scores.append(a.mul_((carried / a.sum(1).clamp_min(1e-30))[:, None]))
    threshold = find_threshold(scores, edge_threshold)
    edge_masks = [sc >= threshold for sc in scores]
    needs_out = is_kind(kinds, Kind.FEATURE, *LEAF_KINDS)
    while True:
        has_out = torch.zeros_like(node_mask)
        has_in = torch.zeros_like(node_mask)
        for block, em in zip(blocks, edge_masks):
            has_out[block.sources] |= em.any(0)
            has_in[block.targets] |= em.any(1)
        new = node_mask & ~(needs_out & ~has_out) & ~(feature & ~has_in)
        if torch.equal(new, node_mask):
            break
        node_mask = new
        for block, em in zip(blocks, edge_masks):
            em[~node_mask[block.targets]] = False
            em[:, ~node_mask[block.sources]] = False
    return Pruned(node_mask, tuple(edge_masks), tuple(scores), infl, cumulative_share(infl))


def graph_scores(blocks: Sequence[Block], kinds: Tensor, logit_weights: Tensor) -> tuple[float, float]:
    """(replacement, completeness) of the unpruned graph, as circuit-tracer defines them."""
    infl = influence(blocks, logit_weights)
    error = is_kind(kinds, Kind.ERROR)
    token_infl = float(infl[is_kind(kinds, Kind.TOKEN)].sum())
    error_infl = float(infl[error].sum())
    replacement = token_infl / (token_infl + error_infl) if token_infl + error_infl > 0 else 0.0
    non_error = torch.ones_like(infl)
    for block in blocks:
        cols = error[block.sources].nonzero().squeeze(1)
        rowsum = torch.linalg.vector_norm(block.weight, 1, dim=1).clamp_min(1e-30)
        from_error = block.weight[:, cols].abs().sum(1) / rowsum
        non_error[block.targets] -= from_error.to(infl.dtype)
    weight = infl + logit_weights
    completeness = float((non_error * weight).sum() / weight.sum().clamp_min(1e-30))
    return replacement, completeness


def select_sources(block_weight: Tensor, carried: Tensor, source_kinds: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Target-driven step: (mask of sources to keep, their influence) given the targets' weights.

    Features: the top `k` by influence; other sources (errors, biases, tokens) whenever they reach a
    target at all. Influence uses every candidate in each target's normalisation.
    """
    contrib = carried.to(block_weight.dtype) @ normalized(block_weight)  # [src]
    feature = is_kind(source_kinds, Kind.FEATURE)
    keep = ~feature & (block_weight != 0).any(0)
    ranked = torch.argsort(torch.where(feature, contrib, -1.0), descending=True)[:k]
    keep[ranked[feature[ranked] & (contrib[ranked] > 0)]] = True
    return keep, contrib
