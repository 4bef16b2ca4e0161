"""One case study traced both ways: on the residual-stream SAEs (the paper's chosen strategy) and on the
demo's own transcoders and attention-output SAEs (the community's replacement model, the paper's strategy 2).

1. Load the demo's transcoders (a circuit-tracer transcoder set reading the MLP input, writing its output)
   and its attention SAEs (SAELens folders on `blocks.L.attn.hook_z`, heads side by side before W_O), both
   trained by `recipes/demo/train_transcoders.py`, onto the model the residual tracer already holds.
2. The plain transcoder graph (`Tracer(model, transcoders=...)`, circuit-tracer's graph: attention frozen,
   no head loadings), written once beside the case's residual-SAE graph; its key head is the one that
   moves the answer logit's cross-position inputs most directly (`transcoder_qk.direct_carrier`).
3. The checkpointed graph (strategy 2: `Tracer(model, transcoders=..., attention_saes=...)`, every edge
   crosses at most one attention layer, and edges into attention features carry head loadings), written once:
   its key head is its top cross-position head, at the key it carries most into an attention feature.
4. Per graph: which heads and features carry the answer, the two scores, and the top QK terms of its key
   head from the last position to that head's key (`Traced.qk`: over SAE features with residual SAEs, over
   the residual's writers with transcoders, attention-SAE features among them in strategy 2). `section`
   writes it as markdown for the report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import DEMO_ATTENTION_SAES, DEMO_TRANSCODERS
from ..graph import Graph
from ..nodes import Kind
from ..saes import AttentionSAESet, TranscoderSet, load_attention_saes, load_transcoders
from ..tables import markdown_table
from ..tracer import Traced, Tracer

if TYPE_CHECKING:
    from .run import CaseStudy

log = logging.getLogger(__name__)

STRATEGY2 = "transcoders + attention SAEs (strategy 2)"
TOP = 5  # heads, features and QK terms shown per graph


@dataclass(frozen=True)
class View:
    """One graph of the case: its scores, what carries the answer, and its key head's QK terms."""

    name: str
    file: str  # the graph file
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
    ts = load_transcoders(DEMO_TRANSCODERS, m, device=m.device, dtype=m.anatomy.dtype)
    return ts, load_attention_saes(DEMO_ATTENTION_SAES, m, device=m.device, dtype=m.anatomy.dtype)


def qk_terms(traced: Traced, key: tuple[int, int, int] | None) -> list[dict[str, Any]]:
    """Step 4: the top terms of head (layer, head)'s score from the last position to the key."""
    if key is None:
        return []
    layer, head, key_pos = key
    frame = traced.qk(layer, head, traced.trace.n_pos - 1).terms_frame(top=TOP, key_pos=key_pos)
    return frame[["query", "query_label", "key", "key_label", "value"]].to_dict(orient="records")


def top_features(graph: Graph) -> list[dict[str, Any]]:
    """The most influential feature nodes of a pruned graph."""
    feats = [n for n in graph.nodes if n.node.kind in (Kind.FEATURE, Kind.TRANSCODER, Kind.ATTN_FEATURE)]
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


def checkpointed_view(traced: Traced, graph: Graph, file: str) -> View:
    """Step 3: the checkpointed graph (strategy 2), whose edges into attention features carry head loadings:
    its key head is the graph's top cross-position head, at the key it carries most into the most influential
    attention feature it carries."""
    key = None
    top = graph.top_heads(1)
    if top:
        head = (top[0]["layer"], top[0]["head"])
        attn = [i for i, n in enumerate(graph.nodes) if n.node.kind is Kind.ATTN_FEATURE]
        for i in sorted(attn, key=lambda i: -graph.nodes[i].influence):
            c = graph.carrier(i)
            if c is not None and c[:2] == head:
                key = c
                break
    return graph_view(STRATEGY2, traced, graph, file, key)


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
    tokens = tracer.tokenize(case.prompt)  # the residual graph's tokens
    plain = Tracer(tracer.model, transcoders=ts).run(tokens)
    graph = plain.graph(targets=[case.answer], progress=False)
    file = save(graph, out / f"{case.slug}.transcoders.graph.json")
    s2 = Tracer(tracer.model, transcoders=ts, attention_saes=att).run(tokens)
    s2_graph = s2.graph(targets=[case.answer], progress=False)
    s2_file = save(s2_graph, out / f"{case.slug}.checkpointed.graph.json")
    views = (
        residual_view(tracer.run(case.prompt), *residual),
        transcoder_view(plain, graph, file),
        checkpointed_view(s2, s2_graph, s2_file),
    )
    for v in views:
        log.info("%s: %s, replacement %.3f, completeness %.3f, key head %s", v.name, v.size, v.replacement,
                 v.completeness, v.key)  # fmt: skip
    return BothWays(case, views, [file, s2_file])


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
        "influence-weighted share of inputs not from error nodes). QK "
        "terms of each graph's key head from the last position to its key: over SAE features with residual "
        "SAEs, over the residual's writers (transcoder features, attention outputs, or with attention SAEs their "
        "features and errors, embeddings) with transcoders.\n\n",
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
