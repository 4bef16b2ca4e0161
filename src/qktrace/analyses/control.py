"""Explain's step 7: each tested candidate's control, drawn and measured (the algorithm and the threshold
are in `qktrace.analyses.null`)."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .mechanism import Candidate, Part
from .null import QUANTILES, Null, curve_effect, flips, halves

if TYPE_CHECKING:
    from ..graph import Graph
    from ..options import ExplainSettings
    from ..tracer import Traced

log = logging.getLogger(__name__)


class Prober(Protocol):
    """What the null needs from explain's probe: the traced prompt, a pass counter and a confirmation."""

    traced: Traced
    passes: int

    def confirm(self, c: Candidate, scales: Sequence[float]) -> Candidate: ...


def has_features(traced: Traced, layer: int) -> bool:
    """Whether heads of `layer` read features explain can steer: an SAE at checkpoint `layer`, or, on a tracer
    of transcoders (and attention SAEs), transcoder (and attention) features of a layer below (every layer but
    the first)."""
    return layer in traced.saes or (traced.transcoders is not None and layer > 0)


def feature_label(traced: Traced, kind: str, layer: int, feature: int) -> str:
    """A feature's label: an SAE feature of checkpoint `layer`, the transcoder feature read at `layer`, or the
    attention-output SAE feature of layer `layer` (kind "attn")."""
    if kind == "feature":
        return traced.sae(layer).label(feature)
    if kind == "attn":
        assert traced.attention_saes is not None
        return traced.attention_saes[layer].label(feature)
    ts = traced.transcoders
    assert ts is not None
    return ts.clt.label(layer, feature) if ts.clt is not None else ts[layer].label(feature)


def carrier_heads(traced: Traced, graph: Graph, n: int) -> list[dict[str, Any]]:
    """`Graph.top_heads` for a transcoder graph, which has no head loadings: each target of a kept
    cross-position edge gives its cross-position influence to the head that carries it most directly
    (`qktrace.graph.transcoder_qk.direct_carrier`); the `n` heads with the largest share."""
    from ..graph.transcoder_qk import direct_carrier

    ts = traced.transcoders
    assert ts is not None
    inflow: dict[int, float] = {}
    for e in graph.cross_position_edges(loaded=False):
        t = int(graph.target[e])
        inflow[t] = inflow.get(t, 0.0) + float(graph.influence[e])
    totals: dict[tuple[int, int], float] = {}
    for t, weight in inflow.items():
        carrier = direct_carrier(traced.model, traced.trace, ts, graph, t)
        if carrier is not None:
            totals[carrier[:2]] = totals.get(carrier[:2], 0.0) + weight
    total = max(sum(inflow.values()), 1e-30)
    ranked = sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    return [{"layer": ly, "head": h, "influence": w / total} for (ly, h), w in ranked if w > 0]


def _pool(traced: Traced, p: Part) -> list[tuple[int, int]]:
    """The other active features a part's control draws from, as (layer, feature): of its checkpoint's SAE at
    its position, or every transcoder (attention) feature active there that its heads read (of a layer below)."""
    if p.kind in ("transcoder", "attn"):
        w = traced.writers()
        enc = w.enc if p.kind == "transcoder" else w.att
        assert enc is not None
        at = ((enc.pos == p.position) & (enc.layer < p.layer)).nonzero().flatten()
        active = set(zip(enc.layer[at].tolist(), enc.index[at].tolist()))
    else:
        feats, _ = traced.acts(p.layer).at(p.position)
        active = {(p.layer, int(f)) for f in feats.tolist()}
    return sorted(active - set(p.keys))


def draw_controls(traced: Traced, c: Candidate, n: int, seed: int) -> list[Candidate]:
    """`n` candidates like `c`, each part's features replaced by as many other active features at its layer
    and position (fewer when fewer are active); none when no part has another active feature."""
    rng = random.Random(f"{seed}:{c.name}")  # a string seed is hashed deterministically (sha512)
    pools = [_pool(traced, p) for p in c.parts]
    if not any(pools):
        return []
    out = []
    for _ in range(n):
        parts = []
        for p, pool in zip(c.parts, pools):
            keys = sorted(rng.sample(pool, min(len(p.features), len(pool))))
            layers = tuple(ly for ly, _ in keys) if p.kind != "feature" else ()
            labels = tuple(feature_label(traced, p.kind, ly, f) for ly, f in keys)
            parts.append(replace(p, features=tuple(f for _, f in keys), labels=labels, feature_layers=layers))
        out.append(Candidate(kind=c.kind, parts=tuple(parts), prob_effect=0.0, predicted=0.0, predicted_attention=()))
    return out


def null_for(
    probe: Prober,
    index: int,
    c: Candidate,
    settings: ExplainSettings,
    criterion: str,
    clean: dict[str, float],
    answer: str,
    correct: bool,
) -> Null:
    """Step 7 for one candidate (index `index` of the Mechanism's): its control, measured (module docstring).
    `clean`: the clean value of each criterion and "p_answer"."""
    start, before = time.perf_counter(), probe.passes
    controls = draw_controls(probe.traced, c, settings.null_draws, settings.null_seed)
    curves = [probe.confirm(x, settings.scales).curve for x in controls]
    effects = [curve_effect(curve, criterion, clean[criterion]) for curve in curves]
    effect = curve_effect(c.curve, criterion, clean[criterion])
    n = len(curves)
    quantiles: list[tuple[float, float, float]] = []  # none without draws
    for i in range(len(settings.scales) if n else 0):
        values = torch.tensor(
            [float(getattr(curve[i], criterion)) for curve in curves], dtype=torch.float64, device="cpu"
        )
        q = torch.quantile(values, torch.tensor(QUANTILES, dtype=torch.float64, device="cpu")).tolist()
        quantiles.append((q[0], q[1], q[2]))
    null = Null(
        candidate=index,
        criterion=criterion,
        effect=effect,
        draws=tuple(x.features for x in controls),
        effects=tuple(effects),
        curves=tuple(tuple(curve) for curve in curves),
        quantiles=tuple(quantiles),
        flip_share=sum(flips(curve, answer, correct) for curve in curves) / n if n else 0.0,
        halve_share=sum(halves(curve, clean["p_answer"]) for curve in curves) / n if n else 0.0,
        p_value=(1 + sum(e <= effect for e in effects)) / (1 + n) if n else 1.0,
        threshold=max(0.05, 1.0 / (n + 1)),
        confirmed=flips(c.curve, answer, correct) or halves(c.curve, clean["p_answer"]),
        n_passes=probe.passes - before,
        seconds=time.perf_counter() - start,
    )
    log.info(
        "explain: null of %s: p = %.3f over %d draws (%d at least as strong), %s",
        c.name,
        null.p_value,
        n,
        null.stronger,
        "specific" if null.specific else "not specific",
    )
    return null
