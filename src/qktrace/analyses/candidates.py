"""Explain's step 4: each site's candidates, ranked by attribution (no forward pass), and their predictions.

A side's QK terms are exact parts of the pre-cap score, so a candidate's prediction is each site head's
attention recomputed with the candidate's terms multiplied by the most negative scale (`scaled_row`). The
features are those the site's heads read on that side: SAE features of their checkpoint, or, on a tracer of
transcoders, the transcoder features of the layers below, and with attention-output SAEs (a checkpointed
tracer) the attention features of the layers below too. A candidate's features are of one kind; singles of
every kind compete in one ranking.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from ..nodes import CODE, Kind
from ..qk import QKAttribution
from .control import feature_label
from .mechanism import Candidate, Part, Side, Site

if TYPE_CHECKING:
    from ..options import ExplainSettings
    from ..tracer import Traced

FeatureKind = Literal["feature", "transcoder", "attn"]
KINDS: dict[int, FeatureKind] = {CODE[Kind.FEATURE]: "feature", CODE[Kind.TRANSCODER]: "transcoder",
                                 CODE[Kind.ATTN_FEATURE]: "attn"}  # fmt: skip
CODES: dict[str, int] = {kind: code for code, kind in KINDS.items()}


def scaled_row(
    att: QKAttribution,
    side: Side,
    position: int,
    features: Sequence[int],
    factor: float,
    layers: Sequence[int] | None = None,
    kind: FeatureKind = "transcoder",
) -> Tensor:
    """The head's attention row [key] with the terms of `features` (on `side`, at `position`) multiplied
    by `factor`: exact, since a side's terms are parts of the pre-cap score (the same linearisation at
    frozen norm scales that `SteerQK` applies). `layers`: transcoder (or, with kind "attn", attention-SAE)
    features, each of that layer (None: SAE features of the head's checkpoint)."""
    comp = att.query if side == "query" else att.key
    sel = _selected(comp, position, features, layers, CODES[kind])
    per_kc = att.terms[sel].sum(0) if side == "query" else torch.zeros_like(att.terms[0])
    if side == "key":
        per_kc = per_kc.index_add(0, sel, att.terms[:, sel].sum(0))
    per_key = torch.zeros_like(att.sum_of_terms).index_add_(0, att.key_index, per_kc)
    scores = att.sum_of_terms + (factor - 1.0) * per_key
    if att.softcap is not None:
        scores = att.softcap * torch.tanh(scores / att.softcap)
    return torch.softmax(scores.double(), -1).to(scores.dtype)


def _selected(comp: Any, position: int, features: Sequence[int], layers: Sequence[int] | None, code: int) -> Tensor:
    """Indices of the components that are `features` at `position`: SAE features (`layers` None), or the
    features of kind `code` (transcoder, attention SAE) of `layers`."""
    dev = comp.feature.device
    at = comp.pos == position
    if layers is None:
        feats = torch.as_tensor(list(features), dtype=comp.feature.dtype, device=dev)
        return ((comp.kind == CODES["feature"]) & at & torch.isin(comp.feature, feats)).nonzero().flatten()
    width = max([int(comp.feature.max()) if len(comp.feature) else 0, *features]) + 1
    want = torch.as_tensor([ly * width + f for ly, f in zip(layers, features)], dtype=comp.feature.dtype, device=dev)
    key = comp.layer.to(dev) * width + comp.feature
    return ((comp.kind == code) & at & torch.isin(key, want)).nonzero().flatten()


def _feature_effects(
    atts: list[QKAttribution], side: Side, position: int, key_pos: int
) -> dict[tuple[int, int, int], float]:
    """Each active feature's first-order effect on the site's summed attention to its key, by (kind code,
    layer, feature): SAE features of the heads' checkpoint, or transcoder and attention features below."""
    per_feature: dict[tuple[int, int, int], float] = {}
    for att in atts:
        comp = att.query if side == "query" else att.key
        feature = torch.isin(comp.kind, torch.as_tensor(list(KINDS), dtype=comp.kind.dtype, device=comp.kind.device))
        idx = (feature & (comp.pos == position)).nonzero().flatten()
        eff = att.prob_effects(key_pos)  # [q_component, k_component]
        per = (eff.sum(1) if side == "query" else eff.sum(0))[idx]
        layers = comp.layer[idx].tolist() if comp.layer is not None else [att.layer] * len(idx)
        for c, ly, f, e in zip(comp.kind[idx].tolist(), layers, comp.feature[idx].tolist(), per.tolist()):
            key = (int(c), int(ly), int(f))
            per_feature[key] = per_feature.get(key, 0.0) + float(e)
    return per_feature


def propose(
    traced: Traced, row: Callable[[int, int], QKAttribution], index: int, site: Site, side: Side, q: int,
    settings: ExplainSettings,
) -> list[Candidate]:  # fmt: skip
    """Candidates of one site and side, ranked by predicted effect (the `settings.candidates` best)."""
    position = q if side == "query" else site.key_pos
    atts = [row(site.layer, h) for h in site.heads]
    effects = _feature_effects(atts, side, position, site.key_pos)
    out: dict[tuple[Any, ...], Candidate] = {}
    for code, kind in KINDS.items():
        per = {(ly, f): e for (c, ly, f), e in effects.items() if c == code}
        if per:
            out.update(_of_kind(traced, atts, index, site, side, position, kind, per, settings))
    ranked = sorted(out.values(), key=lambda c: (c.predicted, -abs(c.prob_effect)))
    return ranked[: settings.candidates]


def _of_kind(
    traced: Traced, atts: list[QKAttribution], index: int, site: Site, side: Side, position: int,
    kind: FeatureKind, per_feature: dict[tuple[int, int], float], settings: ExplainSettings,
) -> dict[tuple[Any, ...], Candidate]:  # fmt: skip
    """The candidates of features of one kind: singles, the top k together, supernodes (shared labels)."""
    sign = 1.0 if site.ablation <= 0 else -1.0  # the site carries the answer: its support raises p(key)
    order = sorted((f for f in per_feature if per_feature[f] * sign > 0), key=lambda f: -per_feature[f] * sign)
    if not order:
        return {}
    groups: list[tuple[str, list[tuple[int, int]]]] = [("feature", [f]) for f in order]
    groups += [("top-k", order[:k]) for k in settings.top_k if len(order) >= k]
    by_label: dict[str, list[tuple[int, int]]] = {}
    for f in per_feature:
        by_label.setdefault(feature_label(traced, kind, *f), []).append(f)
    for members in by_label.values():
        if len(members) > 1 and sum(per_feature[f] for f in members) * sign > 0:
            groups.append(("supernode", members))
    # prediction: each head's attention recomputed exactly at the most negative scale, times the site's
    # ablation effect per unit of its summed attention
    low = min(settings.scales)
    base = sum(site.attention)
    out: dict[tuple[Any, ...], Candidate] = {}
    for group, members in groups:
        keys = tuple(sorted(members))
        if (kind, keys) in out:
            continue
        k = [att.key_positions.index(site.key_pos) for att in atts]
        layers = [ly for ly, _ in keys] if kind != "feature" else None
        feats = [f for _, f in keys]
        after = tuple(float(scaled_row(att, side, position, feats, low, layers, kind)[i]) for att, i in zip(atts, k))
        predicted = -(sum(after) - base) * site.ablation / max(base, 1e-6)
        part = Part(
            index, site.layer, site.heads, side, position, site.key_pos, tuple(feats),
            tuple(feature_label(traced, kind, *f) for f in keys), kind, tuple(layers or ()),
        )  # fmt: skip
        out[kind, keys] = Candidate(
            kind=group,  # type: ignore[arg-type]
            parts=(part,),
            prob_effect=sum(per_feature[f] for f in keys),
            predicted=predicted,
            predicted_attention=after,
        )
    return out


def together(leaders: list[Candidate]) -> Candidate:
    """The strongest predicted candidate of every site, steered together (one part per site)."""
    return Candidate(
        kind="sites",
        parts=tuple(p for c in leaders for p in c.parts),
        prob_effect=sum(c.prob_effect for c in leaders),
        predicted=sum(c.predicted for c in leaders),
        predicted_attention=tuple(a for c in leaders for a in c.predicted_attention),
    )


def identity(c: Candidate) -> tuple[Any, ...]:
    return tuple((p.kind, p.layer, p.heads, p.side, p.position, p.keys) for p in c.parts)
