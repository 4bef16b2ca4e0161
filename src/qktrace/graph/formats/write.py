"""A `Graph` as graph JSON: nodes (with QK tracing), links (with head loadings and QK terms), metadata and
the QK-only contributors. The graph is read as data only: this module never imports it."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, cast

import torch

from ...config import VERSION
from ...nodes import Kind, Node
from .names import default_slug, neuronpedia_scan, neuronpedia_source_set
from .numbering import node_json
from .schema import (
    FORMAT_VERSION,
    GraphJSON,
    LinkJSON,
    MetadataJSON,
    NodeJSON,
    QKOnlyNodeJSON,
    QKTraceMeta,
    QKTracingHead,
    QParamsJSON,
)

if TYPE_CHECKING:
    from ..graph import Graph, GraphNode


def _short(x: torch.Tensor) -> list[Any]:
    """Values as Python floats with the shortest repr that reads back to the same float32 (about 40%
    less JSON than the float64 repr of a float32, and exact)."""
    arr = x.detach().to("cpu", torch.float32).numpy()
    flat = [float(v) for v in arr.reshape(-1).astype(str)]
    if arr.ndim < 2:
        return flat
    width = arr.shape[1]
    return [flat[i * width : (i + 1) * width] for i in range(arr.shape[0])]


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def qk_suffix(head: QKTracingHead) -> str:
    """What the label of a node with QK tracing ends with: which head, and the key it attends to."""
    return f" [QK L{head['layer']}H{head['head']} @{head['key_pos']}]"


def to_json(graph: Graph) -> GraphJSON:
    """The graph as circuit-tracer / Neuronpedia JSON with qktrace's fields (another tool's graph: as read)."""
    if graph.raw is not None:
        return json.loads(json.dumps(graph.raw))  # a copy
    shift = _source_set(graph)
    offset = shift[1] if shift else 0
    meta = _metadata(graph, shift)
    qparams: QParamsJSON = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    out: GraphJSON = {"metadata": meta, "qParams": qparams, "nodes": _nodes(graph, offset), "links": _links(graph)}
    only = _qk_only(graph, offset)
    if only:
        out["qk_only_nodes"] = only
    return out


def _nodes(graph: Graph, offset: int) -> list[NodeJSON]:
    """Every node's fields; a node with QK tracing carries it, and its label names the head."""
    nodes = [_graph_node_json(n, graph.n_layers, offset) for n in graph.nodes]
    for i, tr in graph.qk_tracing.items():
        head: QKTracingHead = {
            "layer": tr.layer, "head": tr.head, "query_pos": tr.query_pos, "key_pos": tr.key_pos,
            "score": tr.score, "pattern": tr.pattern,
        }  # fmt: skip
        nodes[i]["qk_tracing_results"] = {  # JSON arrays: lists, as they read back
            "pair_wise_contributors": [cast(Any, [q, k, v]) for q, k, v in tr.pairs],
            "top_q_marginal_contributors": [cast(Any, [c, v]) for c, v in tr.query],
            "top_k_marginal_contributors": [cast(Any, [c, v]) for c, v in tr.key],
        }
        nodes[i]["qk_tracing_head"] = head
        nodes[i]["clerp"] = nodes[i].get("clerp", "") + qk_suffix(head)
    return nodes


def _links(graph: Graph) -> list[LinkJSON]:
    """Every edge with its head loadings, and its QK terms where it crosses positions."""
    ids = [n.id for n in graph.nodes]
    pos = [n.node.pos for n in graph.nodes]
    weights, infl, direct, via = (_short(x) for x in (graph.weight, graph.influence, graph.direct, graph.via_mlp))
    layers, heads = graph.head_layer.tolist(), graph.heads.tolist()
    links: list[LinkJSON] = []
    for e, (s, t) in enumerate(zip(graph.source.tolist(), graph.target.tolist())):
        link: LinkJSON = {"source": ids[s], "target": ids[t], "weight": weights[e], "influence": infl[e]}
        link["head_loadings"] = [
            {"layer": layers[e], "head": h, "direct": d, "via_mlp": v}
            for h, d, v in zip(heads[e], direct[e], via[e])
            if h >= 0
        ]
        if pos[s] != pos[t]:
            link["qk_top_terms"] = graph.qk_terms.get(e)
        links.append(link)
    return links


def _metadata(graph: Graph, shift: tuple[str, int] | None) -> MetadataJSON:
    """Both frontends' metadata, with qktrace's own under "qktrace"."""
    settings = dict(graph.settings)
    ours: QKTraceMeta = {
        "format_version": FORMAT_VERSION,
        "model": graph.model_name,
        "n_layers": graph.n_layers,
        "tokens": list(graph.tokens),
        "replacement": graph.replacement,
        "completeness": graph.completeness,
        "settings": settings,
    }
    if graph.sources:
        ours["neuronpedia_ids"] = {str(c): i for c, i in sorted(graph.sources.items())}
    meta: MetadataJSON = {
        "slug": graph.slug or default_slug(graph),
        "scan": graph.scan or neuronpedia_scan(graph.model_name, graph.sources.values()),
        "transcoder_list": [],
        "prompt_tokens": list(graph.str_tokens),
        "prompt": graph.prompt,
        "schema_version": 1,
    }
    if settings.get("node_threshold") is not None:  # Neuronpedia's schema takes a number or nothing
        meta["node_threshold"] = settings["node_threshold"]
    if shift is not None:
        meta["feature_details"] = {"neuronpedia_source_set": shift[0]}

    meta["info"] = {"generator": {"name": "qktrace", "version": VERSION}}
    meta["generation_settings"] = {k: v for k, v in settings.items() if k not in ("node_threshold", "edge_threshold")}
    meta["pruning_settings"] = {k: settings[k] for k in ("node_threshold", "edge_threshold") if k in settings}
    # Neuronpedia's graph view shows these when a file has them; else its score worker computes them from the
    # file's links, which are pruned (and it sorts our "bias" nodes after the logits: replacement 0, complete 1)
    meta["replacement_score"] = graph.replacement
    meta["completeness_score"] = graph.completeness
    meta["qktrace"] = ours
    return meta


def _qk_only(graph: Graph, offset: int) -> dict[str, QKOnlyNodeJSON]:
    """QK contributors that are not nodes of the graph, by node id."""
    known = {n.id for n in graph.nodes}
    only: dict[str, QKOnlyNodeJSON] = {}
    for cid, extra in sorted(graph.qk_only.items()):
        if cid in known:
            continue
        n = node_json(Node.parse(cid), extra.label, graph.n_layers, offset)
        only[cid] = {**n, "clerp": extra.label, "activation": _finite(extra.activation)}  # type: ignore[typeddict-unknown-key]  # node fields ride along
    return only


def _source_set(graph: Graph) -> tuple[str, int] | None:
    """`neuronpedia_source_set` of the graph's SAEs, if it covers every checkpoint a node of the graph
    (or a QK component) sits at, and no layer number falls below 0."""
    shift = neuronpedia_source_set(graph.sources) if graph.sources else None
    if shift is None:
        return None
    nodes = [n.node for n in graph.nodes] + [Node.parse(c) for c in graph.qk_only]
    used = {n.checkpoint for n in nodes if n.kind not in (Kind.TOKEN, Kind.LOGIT)}
    return shift if used <= set(graph.sources) and min(used, default=0) + shift[1] >= 0 else None


def _graph_node_json(n: GraphNode, n_layers: int, offset: int) -> NodeJSON:
    out = node_json(n.node, n.label, n_layers, offset)
    out["token_prob"] = n.token_prob
    out["is_target_logit"] = n.is_target_logit
    out["run_idx"] = out["reverse_ctx_idx"] = 0
    out["influence"] = _finite(n.cumulative)
    out["activation"] = _finite(n.activation)
    out["raw_influence"] = _finite(n.influence)
    return out
