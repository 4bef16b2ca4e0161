"""Influence pruning, replacement and completeness scores, and target-driven source selection.

The graph is layered (see `blocks`): every node is the target of at most one block and a source of at
most one block, and the block reading a node comes before the block writing it, so the Neumann series
of the adjacency matrix is one sweep over the blocks, top-down. Every sweep reads the blocks in row
chunks, so it runs in the memory budget of the `BlockStore`.

 1. Normalise: each target's incoming |weights| sum to 1.
 2. Influence: w = logit probabilities on logit nodes; sweeping down, influence[src] +=
    (w + influence)[tgt] @ |A|_norm. This is w @ (A + A^2 + ...), as in circuit-tracer.
    The same sweep gives the completeness score's error shares.
 3. Keep the nodes that cover `node_threshold` of the total influence (and, if given, at most
    `max_features` features); tokens and logits always stay.
 4. A second sweep on the kept nodes renormalises and recomputes influence; an edge scores
    |A|_norm[t, s] times (w + influence)[t] (final for t when its block is read: influence flows down);
    the sweep histograms every score. The edges covering `edge_threshold` of the total score are kept:
    a third sweep collects the edges in and above the histogram bin where the cover is reached, and the
    exact threshold is found among them (`CoverThreshold`, the same result as sorting every score).
 5. Repeat until stable, on the kept edges: feature, error and bias nodes need an outgoing edge,
    features an incoming one.

Transcoder graphs (`replacement_graph`) prune the same way: their features (`Kind.TRANSCODER`) count as
features and their MLP errors as errors.

Replacement score: token influence / (token + error influence). Completeness: the influence-weighted
mean, over nodes, of the share of a node's normalised input that does not come from error nodes.
Bias nodes are exact constants of the model, so they count as explained in both scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError
from ..nodes import CODE, LEAF_KINDS, Kind
from .blocks import BlockStore

# what node_threshold / max_features count as features
FEATURE_KINDS = (Kind.FEATURE, Kind.TRANSCODER, Kind.ATTN_FEATURE)
ERROR_KINDS = (Kind.ERROR, Kind.MLP_ERROR, Kind.ATTN_ERROR)  # reconstruction errors: the scores' unexplained part


def is_kind(kinds: Tensor, *wanted: Kind) -> Tensor:
    out = torch.zeros_like(kinds, dtype=torch.bool)
    for kind in wanted:
        out |= kinds == CODE[kind]
    return out


def normalized(weight: Tensor) -> Tensor:
    """|weight| with each row (a target's inputs) summing to 1; all-zero rows stay zero."""
    a = weight.abs()
    return a.div_(a.sum(1, keepdim=True).clamp_min(1e-30))


# -- the cover threshold ------------------------------------------------------------------------------


class CoverThreshold:
    """The smallest score among the top scores that together cover `fraction` of the total, found from
    scores seen in pieces: `add` every piece (a histogram over log2-scores, fixed bins), then `floor()`
    is the lower edge of the bin where the cover is reached, then `threshold(candidates)` with every
    score >= floor gives the exact answer (the bin is sorted; the bins above count by their mass)."""

    RES = 256  # bins per octave: 0.27% wide
    LO, HI = -160, 130  # log2 of the smallest and largest positive float32, with room

    def __init__(self, fraction: float, device: torch.device):
        self.fraction = fraction
        self.hist = torch.zeros((self.HI - self.LO) * self.RES, dtype=torch.float64, device=device)
        self.count = 0

    def _bin(self, s: Tensor) -> Tensor:
        return ((s.log2() - self.LO) * self.RES).floor_().long().clamp_(0, len(self.hist) - 1)

    def add(self, scores: Tensor) -> None:
        s = scores[scores > 0].double().flatten()
        self.count += len(s)
        self.hist.index_add_(0, self._bin(s).to(self.hist.device), s.to(self.hist.device))

    def _cut(self) -> tuple[int, float, float]:
        """(bin where the cover is reached, mass of the bins above it, total)."""
        total = float(self.hist.sum())
        flipped = self.hist.flip(0)
        above = torch.cumsum(flipped, 0)  # mass of the top bins
        goal = torch.tensor([self.fraction * total], dtype=above.dtype, device=above.device)
        k = min(int(torch.searchsorted(above, goal)), len(self.hist) - 1)
        nonempty = (flipped[k:] > 0).nonzero()  # the cover is reached in a bin that holds a score
        k += int(nonempty[0]) if len(nonempty) else 0
        return len(self.hist) - 1 - k, float(above[k - 1]) if k > 0 else 0.0, total

    def floor(self) -> float:
        """Every score >= this is a candidate for `threshold` (inf when no score is positive)."""
        if self.count == 0:
            return math.inf
        b, _, _ = self._cut()
        return 2.0 ** (b / self.RES + self.LO)

    def threshold(self, candidates: Tensor) -> float:
        if self.count == 0:
            return math.inf
        b, before, total = self._cut()
        c = candidates[candidates > 0].double().flatten().to(self.hist.device)
        inside = torch.sort(c[self._bin(c) == b], descending=True).values
        if len(inside) == 0:  # only when rounding put the cover past the last non-empty bin
            return float(c.min()) if len(c) else math.inf
        goal = torch.tensor([self.fraction * total], dtype=inside.dtype, device=inside.device)
        i = int(torch.searchsorted(before + torch.cumsum(inside, 0), goal))
        return float(inside[min(i, len(inside) - 1)])


def find_threshold(scores: Tensor | Sequence[Tensor], fraction: float, exact_below: int = 1 << 22) -> float:
    """The smallest score among the top scores that together cover `fraction` of the total.

    Up to `exact_below` scores are sorted whole; more go through `CoverThreshold` (same result)."""
    parts = [s.flatten() for s in ([scores] if isinstance(scores, Tensor) else scores)]
    parts = [p[p > 0].double() for p in parts]
    n = sum(len(p) for p in parts)
    if n == 0:
        return math.inf
    if n <= exact_below:
        s = torch.sort(torch.cat(parts), descending=True).values
        goal = torch.tensor([fraction], dtype=s.dtype, device=s.device)
        i = int(torch.searchsorted(torch.cumsum(s, 0) / float(s.sum()), goal))
        return float(s[min(i, n - 1)])
    cover = CoverThreshold(fraction, parts[0].device)
    for p in parts:
        cover.add(p)
    floor = cover.floor()
    return cover.threshold(torch.cat([p[p >= floor] for p in parts]))


def cumulative_share(values: Tensor) -> Tensor:
    """For each node, the share of the total held by the nodes at least as large as it."""
    s, order = torch.sort(values, descending=True)
    out = torch.zeros_like(values)
    out[order] = torch.cumsum(s, 0) / s.sum().clamp_min(1e-30)
    return out


def _check_fraction(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise InputError(f"{name}={value} is not a fraction: give a value in 0..1 (default 0.8 / 0.98)")


# -- sweeps -------------------------------------------------------------------------------------------


def _abs(w: Tensor, rows: Tensor, targets: Tensor, sources: Tensor, node_mask: Tensor | None) -> Tensor:
    """|w| with the rows and columns of dropped nodes zeroed (a fresh tensor)."""
    a = w.abs()
    if node_mask is not None:  # multiplying by 0/1 masks is much faster than boolean-index assignment
        a.mul_(node_mask[targets[rows]].to(a.device, a.dtype)[:, None])
        a.mul_(node_mask[sources].to(a.device, a.dtype)[None, :])
    return a


def influence(
    store: BlockStore, logit_weights: Tensor, node_mask: Tensor | None = None, error: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """(influence of every node on the weighted logits, logit_weights @ (A + A^2 + ...), by one sweep;
    with `error` [node] bool, each target's share of normalised input from error nodes). With
    `node_mask`, on the graph restricted to those nodes (rows renormalised)."""
    out = torch.zeros_like(logit_weights)
    from_error = torch.zeros_like(logit_weights) if error is not None else None
    for b in range(len(store)):
        block = store[b]
        carried = logit_weights[block.targets] + out[block.targets]  # final: only blocks above wrote it
        err_cols = None if error is None else error[block.sources].nonzero().squeeze(1)
        for rows, w in store.chunks(b):
            a = _abs(w, rows, block.targets, block.sources, node_mask)
            rowsum = a.sum(1).clamp_min(1e-30)
            factor = carried[rows].to(a.device, a.dtype) / rowsum
            out.index_add_(0, block.sources, (factor @ a).to(out))
            if from_error is not None and err_cols is not None:
                share = a[:, err_cols.to(a.device)].sum(1) / rowsum
                from_error.index_add_(0, block.targets[rows], share.to(from_error))
    return out, from_error


@dataclass(frozen=True, eq=False)
class KeptEdges:
    """Edges kept by pruning, sparse: per edge its block, row (target) and column (source) there."""

    block: Tensor  # [edge] long
    row: Tensor  # [edge] long
    col: Tensor  # [edge] long
    source: Tensor  # [edge] long, global node index
    target: Tensor  # [edge] long
    weight: Tensor  # [edge]
    score: Tensor  # [edge] |A|_norm * (w + influence) on the kept nodes

    def take(self, mask: Tensor) -> KeptEdges:
        return KeptEdges(*(getattr(self, f)[mask] for f in self.__dataclass_fields__))


@dataclass(frozen=True, eq=False)
class Pruned:
    node_mask: Tensor  # [node] bool
    edges: KeptEdges
    influence: Tensor  # [node] on the whole graph
    cumulative: Tensor  # [node] share of total influence of the nodes at least as influential
    replacement: float
    completeness: float


def _edge_sweep(
    store: BlockStore, logit_weights: Tensor, node_mask: Tensor, fraction: float
) -> tuple[Tensor, CoverThreshold]:
    """Sweep 2: influence on the kept nodes, and every edge score into the cover histogram."""
    kept = torch.zeros_like(logit_weights)
    cover = CoverThreshold(fraction, logit_weights.device)
    for b in range(len(store)):
        block = store[b]
        carried = logit_weights[block.targets] + kept[block.targets]
        for rows, w in store.chunks(b):
            a = _abs(w, rows, block.targets, block.sources, node_mask)
            factor = carried[rows].to(a.device, a.dtype) / a.sum(1).clamp_min(1e-30)
            kept.index_add_(0, block.sources, (factor @ a).to(kept))
            cover.add(a.mul_(factor[:, None]))
    return kept, cover


def _collect(store: BlockStore, logit_weights: Tensor, kept: Tensor, node_mask: Tensor, floor: float) -> KeptEdges:
    """Sweep 3: every edge whose score is at least `floor`, sparse."""
    cols: list[list[Tensor]] = [[] for _ in range(7)]
    for b in range(len(store)):
        block = store[b]
        carried = logit_weights[block.targets] + kept[block.targets]
        for rows, w in store.chunks(b):
            a = _abs(w, rows, block.targets, block.sources, node_mask)
            score = a.mul_((carried[rows].to(a.device, a.dtype) / a.sum(1).clamp_min(1e-30))[:, None])
            t, s = (score >= floor).nonzero(as_tuple=True)
            here = (w[t, s], score[t, s])
            t, s = t.to(rows.device), s.to(rows.device)
            found = (
                torch.full_like(t, b),
                rows[t],
                s,
                block.sources[s],
                block.targets[rows[t]],
                *(x.to(t.device) for x in here),
            )
            for store_col, col in zip(cols, found):
                store_col.append(col)
    empty = torch.zeros(0, dtype=torch.long, device=logit_weights.device)
    return KeptEdges(*(torch.cat(c) if c else empty for c in cols))


def prune(
    store: BlockStore,
    kinds: Tensor,
    logit_weights: Tensor,
    node_threshold: float,
    edge_threshold: float,
    max_features: int | None = None,
) -> Pruned:
    """Steps 1-5 of the module docstring, plus the replacement and completeness scores."""
    _check_fraction(node_threshold, "node_threshold")
    _check_fraction(edge_threshold, "edge_threshold")
    error = is_kind(kinds, *ERROR_KINDS)
    infl, from_error = influence(store, logit_weights, error=error)
    assert from_error is not None
    replacement, completeness = _scores(infl, from_error, kinds, logit_weights)
    always = is_kind(kinds, Kind.TOKEN, Kind.LOGIT)
    feature = is_kind(kinds, *FEATURE_KINDS)
    node_mask = (infl >= find_threshold(infl, node_threshold)) | always
    if max_features is not None:
        ranked = torch.argsort(torch.where(feature, infl, -1.0), descending=True)
        node_mask[ranked[max_features:]] &= ~feature[ranked[max_features:]]
    kept, cover = _edge_sweep(store, logit_weights, node_mask, edge_threshold)
    candidates = _collect(store, logit_weights, kept, node_mask, cover.floor())
    edges = candidates.take(candidates.score >= cover.threshold(candidates.score))
    needs_out = is_kind(kinds, *FEATURE_KINDS, *LEAF_KINDS)
    while True:
        has_out = torch.zeros_like(node_mask)
        has_in = torch.zeros_like(node_mask)
        has_out[edges.source] = True
        has_in[edges.target] = True
        new = node_mask & ~(needs_out & ~has_out) & ~(feature & ~has_in)
        if torch.equal(new, node_mask):
            break
        node_mask = new
        edges = edges.take(node_mask[edges.source] & node_mask[edges.target])
    return Pruned(node_mask, edges, infl, cumulative_share(infl), replacement, completeness)


def _scores(infl: Tensor, from_error: Tensor, kinds: Tensor, logit_weights: Tensor) -> tuple[float, float]:
    """(replacement, completeness) of the unpruned graph, as circuit-tracer defines them."""
    token_infl = float(infl[is_kind(kinds, Kind.TOKEN)].sum())
    error_infl = float(infl[is_kind(kinds, *ERROR_KINDS)].sum())
    replacement = token_infl / (token_infl + error_infl) if token_infl + error_infl > 0 else 0.0
    weight = infl + logit_weights
    completeness = float(((1 - from_error) * weight).sum() / weight.sum().clamp_min(1e-30))
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
