"""Influence, pruning and scores on a graph small enough to compute by hand, read whole and in chunks;
the cover threshold's histogram path against sorting every score."""

from __future__ import annotations

import math

import pytest
import torch

from qktrace.graph.blocks import Block, BlockStore
from qktrace.graph.prune import CoverThreshold, find_threshold, influence, prune
from qktrace.nodes import CODE, Kind

# nodes: 0 logit L; features 1 A, 2 B, 3 C, 4 D; errors 5 E1, 6 E2; tokens 7 T1, 8 T2
L, A, B, C, D, E1, E2, T1, T2 = range(9)
KINDS = torch.tensor(
    [CODE[k] for k in (Kind.LOGIT, *[Kind.FEATURE] * 4, Kind.ERROR, Kind.ERROR, Kind.TOKEN, Kind.TOKEN)]
)
LOGIT_W = torch.tensor([1.0] + [0.0] * 8, dtype=torch.float64)
# block 0: L <- A, B, E1; block 1: A, B <- C, D, E2; block 2: C, D <- T1, T2 (signs must not matter)
WEIGHTS = [
    ([L], [A, B, E1], [[0.6, -0.3, 0.1]]),
    ([A, B], [C, D, E2], [[0.5, -0.5, 0.0], [0.2, 0.0, -0.8]]),
    ([C, D], [T1, T2], [[-1.0, 0.0], [0.25, 0.75]]),
]
# by hand: influence = w @ (A + A^2 + ...) with rows normalised
INFLUENCE = {A: 0.6, B: 0.3, E1: 0.1, C: 0.36, D: 0.3, E2: 0.24, T1: 0.435, T2: 0.225, L: 0.0}


def store(chunked: bool) -> BlockStore:
    blocks = []
    for t, s, w in WEIGHTS:
        weight = torch.tensor(w, dtype=torch.float64)
        targets, sources = torch.tensor(t), torch.tensor(s)
        if chunked:  # computed on demand, never held: every pass reads one row at a time
            blocks.append(Block(targets, sources, lambda r, weight=weight: weight[r]))
        else:
            blocks.append(Block.dense(targets, sources, weight))
    return BlockStore(blocks, budget=64 if chunked else 1 << 30)


@pytest.mark.parametrize("chunked", [False, True])
def test_influence_by_hand(chunked):
    infl, from_error = influence(store(chunked), LOGIT_W, error=CODE[Kind.ERROR] == KINDS)
    for node, value in INFLUENCE.items():
        assert float(infl[node]) == pytest.approx(value, abs=1e-12)
    assert from_error is not None
    assert float(from_error[L]) == pytest.approx(0.1) and float(from_error[B]) == pytest.approx(0.8)
    assert float(from_error[A]) == 0.0


@pytest.mark.parametrize("chunked", [False, True])
def test_prune_by_hand(chunked):
    s = store(chunked)
    pruned = prune(s, KINDS, LOGIT_W, node_threshold=0.8, edge_threshold=0.9)
    # nodes covering 80% of 2.56: A .6, T1 .435, C .36, B .3, D .3, E2 .24 -> E1 (.1) goes; tokens and logits stay
    assert pruned.node_mask.tolist() == [True, True, True, True, True, False, True, True, True]
    # kept influence: L->A 2/3, L->B 1/3; C .4, D 1/3, E2 4/15. Edge scores |A|_norm * (w + infl)[target]:
    # L->A .667, L->B .333, A->C .333, A->D .333, B->C .067, B->E2 .267, C->T1 .4, D->T1 .083, D->T2 .25
    # 90% of 2.733 is reached at .25: B->C and D->T1 go, every node keeps an edge in and out
    edges = {(int(s_), int(t)) for s_, t in zip(pruned.edges.source, pruned.edges.target)}
    assert edges == {(A, L), (B, L), (C, A), (D, A), (E2, B), (T1, C), (T2, D)}
    e = pruned.edges
    score = {(int(s_), int(t)): float(v) for s_, t, v in zip(e.source, e.target, e.score)}
    assert score[(A, L)] == pytest.approx(2 / 3) and score[(E2, B)] == pytest.approx(0.8 / 3)
    assert score[(T2, D)] == pytest.approx(0.25)
    weight = {(int(s_), int(t)): float(v) for s_, t, v in zip(e.source, e.target, e.weight)}
    assert weight[(B, L)] == -0.3 and weight[(T1, C)] == -1.0  # signed weights are kept as they are
    # replacement: tokens / (tokens + errors) = .66 / 1.0; completeness: 1 - error share, influence-weighted
    assert pruned.replacement == pytest.approx(0.66)
    assert pruned.completeness == pytest.approx(3.22 / 3.56)


def test_pruning_drops_nodes_left_without_edges():
    """A feature whose only outgoing edge is cut loses its place (the fixed point of step 5)."""
    pruned = prune(store(False), KINDS, LOGIT_W, node_threshold=1.0, edge_threshold=0.5)
    kept_edges = set(zip(pruned.edges.source.tolist(), pruned.edges.target.tolist()))
    for node in (A, B, C, D):
        has_in = any(t == node for _, t in kept_edges)
        has_out = any(s == node for s, _ in kept_edges)
        assert bool(pruned.node_mask[node]) == (has_in and has_out)
    assert pruned.node_mask[[L, T1, T2]].all()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.8, 0.98, 1.0])
def test_histogram_threshold_equals_sorting(seed, fraction):
    g = torch.Generator().manual_seed(seed)
    n = [10, 1000, 50_000][seed % 3]
    scores = torch.exp(3 * torch.randn(n, generator=g, dtype=torch.float64)).float()
    scores[torch.rand(n, generator=g) < 0.1] = 0.0  # zeros never count
    if seed % 2:
        scores[: n // 4] = scores[n // 4 : 2 * (n // 4)]  # ties
    parts = list(scores.split(max(1, n // 7)))
    exact = find_threshold(scores, fraction)
    assert find_threshold(parts, fraction, exact_below=0) == exact  # the histogram path
    cover = CoverThreshold(fraction, scores.device)
    for p in parts:
        cover.add(p)
    assert cover.threshold(scores[scores >= cover.floor()]) == exact


def test_threshold_of_nothing_keeps_nothing():
    assert find_threshold(torch.zeros(5), 0.8) == math.inf
    assert find_threshold([torch.zeros(3)], 0.8, exact_below=0) == math.inf
