"""One case study traced both ways: on the residual-stream SAEs (the paper's chosen strategy) and on the
demo's own transcoders and attention-output SAEs (the community's replacement model, the paper's strategy 2).

1. Load the demo's transcoders (a circuit-tracer transcoder set reading the MLP input, writing its output)
   and its attention SAEs (SAELens folders on `blocks.L.attn.hook_z`, heads side by side before W_O), both
   trained by `recipes/demo/train_transcoders.py`, onto the model the residual tracer already holds.
2. The plain transcoder graph (`Tracer(model, transcoders=...)`, circuit-tracer's graph: attention frozen,
   no head loadings), written once beside the case's residual-SAE graph; its key head is the one that
   moves the answer logit's cross-position inputs most directly (`transcoder_qk.direct_carrier`).
3. The strategy-2 graph (`checkpointed`: transcoders + attention SAEs, every edge crosses at most one
   attention layer): the heads that carry the answer's most influential attention features, from the head
   loadings of their incoming cross-position edges, and its replacement and completeness scores.
4. Per graph: which heads and features carry the answer, the two scores, and the top QK terms of its key
   head from the last position to that head's key (`Traced.qk`: over SAE features with residual SAEs, over
   the residual's writers with transcoders). `section` writes it as markdown for the report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..config import DEMO_ASSETS
from ..files import atomic_write
from ..graph import Graph
from ..graph.prune import normalized
from ..nodes import Kind
from ..saes import AttentionSAESet, TranscoderSet, load_attention_saes, load_transcoders
from ..tables import markdown_table
from ..tracer import Traced, Tracer

if TYPE_CHECKING:
    from .run import CaseStudy

log = logging.getLogger(__name__)

TRANSCODERS = DEMO_ASSETS / "transcoders"  # circuit-tracer transcoder set: config.yaml + layer_L.safetensors
ATTENTION_SAES = DEMO_ASSETS / "attention_saes"  # SAELens folders on blocks.L.attn.hook_z
STRATEGY2 = "transcoders + attention SAEs (strategy 2)"
TOP = 5  # heads, features and QK terms shown per graph


@dataclass(frozen=True)
class View:
    """One graph of the case: its scores, what carries the answer, and its key head's QK terms."""

    name: str
    file: str  # the graph file (or, for strategy 2, the head-loading JSON)
    replacement: float
    completeness: float
    heads: list[dict[str, Any]]  # {"layer", "head", "share"}, largest first
    features: list[dict[str, Any]]  # {"id", "label", "influence"}, largest first
    key: tuple[int, int, int] | None  # (layer, head, key position) of the key head
    qk_terms: list[dict[str, Any]]  # top terms of the key head's score at (last position, key)
    size: str  # "N nodes, M edges"


def load_replacement(tracer: Tracer) -> tuple[TranscoderSet, AttentionSAESet]:
    """Step 1: the demo's transcoders and attention SAEs, on the device and dtype of `tracer`'s model."""
    m = tracer.model
    ts = load_transcoders(TRANSCODERS, m, device=m.device, dtype=m.anatomy.dtype)
    return ts, load_attention_saes(ATTENTION_SAES, m, device=m.device, dtype=m.anatomy.dtype)


def qk_terms(traced: Traced, key: tuple[int, int, int] | None) -> list[dict[str, Any]]:
    """Step 4: the top terms of head (layer, head)'s score from the last position to the key."""
    if key is None:
        return []
    layer, head, key_pos = key
    frame = traced.qk(layer, head, traced.trace.n_pos - 1).terms_frame(top=TOP, key_pos=key_pos)
    return frame[["query", "query_label", "key", "key_label", "value"]].to_dict(orient="records")


def top_features(graph: Graph) -> list[dict[str, Any]]:
    """The most influential feature nodes of a pruned graph."""
    feats = [n for n in graph.nodes if n.node.kind in (Kind.FEATURE, Kind.TRANSCODER)]
    feats.sort(key=lambda n: -n.influence)
    return [{"id": n.id, "label": n.label, "influence": n.influence} for n in feats[:TOP]]


def graph_view(name: str, traced: Traced, graph: Graph, file: str, key: tuple[int, int, int] | None) -> View:
    heads = [{"layer": h["layer"], "head": h["head"], "share": h["influence"]} for h in graph.top_heads(TOP)]
    size = f"{len(graph.nodes)} nodes, {graph.n_edges} edges (pruned)"
    return View(name, file, graph.replacement, graph.completeness, heads, top_features(graph), key,
                qk_terms(traced, key), size)  # fmt: skip


def answer_logit(graph: Graph) -> int:
    return next(i for i, n in enumerate(graph.nodes) if n.node.kind is Kind.LOGIT)


def residual_view(traced: Traced, graph: Graph, file: str) -> View:
    """The residual-SAE graph (head loadings on its edges): the key head carries most of the answer logit's
    cross-position inputs (`Graph.carrier`), else the graph's top cross-position head."""
    key = graph.carrier(answer_logit(graph))
    if key is None and graph.top_heads(1):
        h = graph.top_heads(1)[0]
        key = (h["layer"], h["head"], int(traced.pattern(h["layer"], h["head"], -1).argmax()))
    return graph_view("residual SAEs", traced, graph, file, key)


def transcoder_view(traced: Traced, graph: Graph, file: str) -> View:
    """Step 2: the plain transcoder graph, whose edges carry no head loadings: its key head is the one that
    moves the answer logit's cross-position inputs most directly."""
    from ..graph.transcoder_qk import direct_carrier

    assert traced.transcoders is not None
    key = direct_carrier(traced.model, traced.trace, traced.transcoders, graph, answer_logit(graph))
    return graph_view("transcoders (plain)", traced, graph, file, key)


# -- strategy 2 ----------------------------------------------------------------------------------------


def influence(adjacency: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """(normalised |adjacency|, influence = weights @ (A + A^2 + ...)) over an acyclic graph's nodes."""
    A = normalized(adjacency)
    total, walk = torch.zeros_like(weights), weights
    for _ in range(len(weights)):  # a path has fewer edges than there are nodes
        walk = walk @ A
        if not bool(walk.any()):
            break
        total += walk
    return A, total


def scores(A: Tensor, infl: Tensor, weights: Tensor, is_token: Tensor, is_error: Tensor) -> tuple[float, float]:
    """(replacement, completeness) as circuit-tracer defines them: token influence over token plus error
    influence; the (influence + logit weight)-weighted mean share of each node's normalised inputs `A` that
    does not come from error nodes."""
    token, error = float(infl[is_token].sum()), float(infl[is_error].sum())
    out = infl + weights
    return token / max(token + error, 1e-30), float(((1 - A[:, is_error].sum(1)) * out).sum() / out.sum())


def checkpointed(tracer: Tracer, ts: TranscoderSet, att: AttentionSAESet, prompt: str, answer: str) -> View:
    """Step 3, the one place that calls `graph/strategy2.py` directly (to become a `Tracer.load(...,
    attention_saes=...)` graph): the unpruned strategy-2 graph's scores (circuit-tracer's definitions over
    the answer logit), its most influential attention features, and the heads that carry them: each
    cross-position edge into one of them splits over its layer's heads (head loadings, summing to the
    edge); a head's share is its |part| share of each edge times the edge's influence, over all of them."""
    from ..graph.strategy2 import checkpointed_graph, head_loadings

    m = tracer.model
    answer_id = m.token_id(answer)
    cg = checkpointed_graph(m, ts, att, tracer.tokenize(prompt), by_head=False, batch_size=1024)
    kinds = [n.kind for n in cg.nodes]
    rows = [i for i, k in enumerate(kinds) if k is Kind.LOGIT]
    weights = cg.adjacency.new_zeros(len(kinds))
    weights[rows[cg.logit_tokens.tolist().index(answer_id)]] = 1.0
    A, infl = influence(cg.adjacency, weights)
    is_error = torch.tensor([k in (Kind.MLP_ERROR, Kind.ATTN_ERROR) for k in kinds], device=A.device)
    is_token = torch.tensor([k is Kind.TOKEN for k in kinds], device=A.device)
    replacement, completeness = scores(A, infl, weights, is_token, is_error)
    attn = [i for i, k in enumerate(kinds) if k is Kind.ATTN_FEATURE]
    order = sorted(attn, key=lambda i: -float(infl[i]))[:TOP]
    features = [{"id": cg.nodes[i].id, "label": att[cg.nodes[i].layer].label(cg.nodes[i].index),
                 "influence": float(infl[i])} for i in order]  # fmt: skip
    loads = head_loadings(cg.checkpoints, torch.tensor(order, dtype=torch.long) - cg.checkpoints.attn_col)
    pos = torch.tensor([n.pos for n in cg.nodes], device=A.device)
    cross = pos[loads.source] != pos[loads.target]
    carried = (infl + weights)[loads.target] * A[loads.target, loads.source]  # [edge]
    part = loads.parts.abs()
    share = (part / part.sum(1, keepdim=True).clamp_min(1e-30) * carried[:, None])[cross]  # [edge, head]
    layer = torch.tensor([cg.nodes[int(t)].layer for t in loads.target], device=A.device)[cross]
    per_head: dict[tuple[int, int], float] = {}
    per_key: dict[tuple[int, int, int], float] = {}
    for e, (ly, k) in enumerate(zip(layer.tolist(), pos[loads.source][cross].tolist())):
        for h, v in enumerate(share[e].tolist()):
            per_head[ly, h] = per_head.get((ly, h), 0.0) + v
            per_key[ly, h, k] = per_key.get((ly, h, k), 0.0) + v
    total = max(sum(per_head.values()), 1e-30)
    best = sorted(per_head, key=lambda lh: -per_head[lh])[:TOP]
    heads: list[dict[str, Any]] = [
        {"layer": ly, "head": h, "share": per_head[ly, h] / total} for ly, h in best if per_head[ly, h] > 0
    ]
    key = None
    if heads:
        top = (int(heads[0]["layer"]), int(heads[0]["head"]))
        key = max(((*top, k) for (ly, h, k) in per_key if (ly, h) == top), key=lambda c: per_key[c])
    size = f"{len(kinds)} nodes, {int(cg.adjacency.count_nonzero())} edges (unpruned)"
    return View(STRATEGY2, "", replacement, completeness, heads, features, key, [], size)


# -- the case, both ways ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BothWays:
    case: CaseStudy
    views: tuple[View, ...]  # residual SAEs, plain transcoders, strategy 2
    files: list[str]  # written here


def trace_both_ways(
    tracer: Tracer, case: CaseStudy, residual: tuple[Graph, str], out: Path, save: Callable[[Graph, Path], str]
) -> BothWays:
    """Steps 1-4 for one case whose residual-SAE graph (and its file) `residual` holds; `save(graph, path)`
    writes a graph once and names the file that holds it."""
    ts, att = load_replacement(tracer)
    plain = Tracer(tracer.model, transcoders=ts).run(tracer.tokenize(case.prompt))  # the residual graph's tokens
    graph = plain.graph(targets=[case.answer], progress=False)
    file = save(graph, out / f"{case.slug}.transcoders.graph.json")
    s2 = checkpointed(tracer, ts, att, case.prompt, case.answer)
    s2 = dataclasses.replace(s2, file=f"{case.slug}.checkpointed.json", qk_terms=qk_terms(plain, s2.key))
    atomic_write(out / s2.file, json.dumps(dataclasses.asdict(s2)))
    views = (residual_view(tracer.run(case.prompt), *residual), transcoder_view(plain, graph, file), s2)
    for v in views:
        log.info("%s: %s, replacement %.3f, completeness %.3f, key head %s", v.name, v.size, v.replacement,
                 v.completeness, v.key)  # fmt: skip
    return BothWays(case, views, [file, s2.file])


def _head(key: tuple[int, int, int] | None) -> str:
    return "none" if key is None else f"L{key[0]}H{key[1]} (key position {key[2]})"


def section(b: BothWays, str_tokens: tuple[str, ...]) -> str:
    """The report's comparison of the graphs of one case."""
    md = [
        f"\n## {b.case.title}: residual SAEs against transcoders\n\n",
        "The same prompt and answer on three replacement models: the residual-stream SAEs (head loadings on every "
        "edge that crosses attention), the demo's transcoders alone (circuit-tracer's graph: attention frozen, no "
        "head loadings) and the transcoders with the attention-output SAEs on hook_z (strategy 2: every edge "
        "crosses at most one attention layer and splits exactly over its heads). Scores as circuit-tracer "
        "defines them (replacement: token influence over token plus error influence; completeness: the "
        "influence-weighted share of inputs not from error nodes); strategy 2's over its unpruned graph. QK "
        "terms of each graph's key head from the last position to its key: over SAE features with residual "
        "SAEs, over the residual's writers (transcoder features, attention outputs, embeddings) with "
        "transcoders.\n\n",
    ]
    rows = [
        {
            "graph": v.name,
            "file": f"`{v.file}`",
            "size": v.size,
            "replacement": v.replacement,
            "completeness": v.completeness,
            "heads carrying the answer": ", ".join(f"L{h['layer']}H{h['head']} ({h['share']:.0%})" for h in v.heads)
            or "none (no head loadings)",
            "key head": _head(v.key),
        }
        for v in b.views
    ]
    md.append(markdown_table(rows, {"replacement": ".3f", "completeness": ".3f"}))
    for v in b.views:
        key = "" if v.key is None else f" at {str_tokens[v.key[2]]!r}"
        md.append(f"\n### {v.name}\n\nTop features: " + "; ".join(f"`{f['id']}` {f['label']!r} ({f['influence']:.3f})"
                                                                  for f in v.features) + ".\n\n")  # fmt: skip
        if v.qk_terms:
            md.append(f"QK terms of {_head(v.key)}{key}:\n\n")
            md.append(markdown_table(v.qk_terms, {"value": "+.3f"}))
    return "".join(md)
