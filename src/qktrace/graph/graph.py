"""The `Graph`: kept nodes, a sparse edge list, head loadings per edge, and its versioned JSON.

The JSON is what the circuit-tracer / Neuronpedia frontend reads as is: top-level `metadata`,
`qParams`, `nodes` (node_id, feature, layer, ctx_idx, feature_type, token_prob, is_target_logit,
run_idx, reverse_ctx_idx, jsNodeId, clerp, influence, activation) and `links` (source, target,
weight). Our additions ride along where the frontend ignores them: `metadata.qktrace` (format
version, scores, settings), per node `raw_influence`, per link `influence`, `head_loadings`
([{layer, head, direct, via_mlp}], largest first) and, on cross-position links, `qk_top_terms`
(filled by the QK module; null here). Node ids are `qktrace.nodes` ids. Never pickled.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import LIMITS
from ..errors import GraphFileError, InputError, QKTraceError
from ..files import atomic_write
from ..nodes import Kind, Node

FORMAT_VERSION = 1
FEATURE_TYPE = {
    Kind.TOKEN: "embedding",
    Kind.FEATURE: "cross layer transcoder",
    Kind.LOGIT: "logit",
    Kind.ERROR: "mlp reconstruction error",
    Kind.SAE_BIAS: "mlp reconstruction error",
    Kind.ATTN_BIAS: "mlp reconstruction error",
    Kind.MLP_BIAS: "mlp reconstruction error",
}


@dataclass(frozen=True)
class GraphNode:
    node: Node
    activation: float | None  # feature activation, logit value; None for tokens, errors, biases
    influence: float  # influence on the probability-weighted logits
    cumulative: float  # share of all influence held by nodes at least this influential
    label: str
    token_prob: float = 0.0  # logits only
    is_target_logit: bool = False

    @property
    def id(self) -> str:
        return self.node.id


@dataclass(frozen=True)
class HeadLoading:
    """What head (layer, head) carried of one edge: through the residual (direct) and via the MLP."""

    layer: int
    head: int
    direct: float
    via_mlp: float

    @property
    def total(self) -> float:
        return self.direct + self.via_mlp


@dataclass(frozen=True, eq=False)
class Graph:
    nodes: tuple[GraphNode, ...]
    source: Tensor  # [edge] long, index into nodes
    target: Tensor  # [edge] long
    weight: Tensor  # [edge]
    influence: Tensor  # [edge] edge influence score used for pruning
    head_layer: Tensor  # [edge] long: the attention layer whose heads carried the edge, -1 if none (or none kept)
    heads: Tensor  # [edge, top] long, largest |direct + via_mlp| first, -1 padding
    direct: Tensor  # [edge, top]
    via_mlp: Tensor  # [edge, top]
    tokens: tuple[int, ...]
    str_tokens: tuple[str, ...]
    prompt: str
    model_name: str
    n_layers: int
    replacement: float
    completeness: float
    settings: Mapping[str, Any] = field(default_factory=dict)
    qk_terms: Mapping[int, list[dict[str, Any]]] = field(default_factory=dict)  # edge -> per top head

    # -- lookup ------------------------------------------------------------------------------------
    @property
    def n_edges(self) -> int:
        return int(self.source.shape[0])

    @cached_property
    def _index(self) -> dict[str, int]:
        return {n.id: i for i, n in enumerate(self.nodes)}

    @cached_property
    def _edges(self) -> dict[tuple[int, int], int]:
        return {(s, t): e for e, (s, t) in enumerate(zip(self.source.tolist(), self.target.tolist()))}

    def node(self, node_id: str) -> GraphNode:
        i = self._index.get(Node.parse(node_id).id)
        if i is None:
            raise InputError(f"node '{node_id}' is not in this graph: pick one of graph.nodes (pruned nodes are gone)")
        return self.nodes[i]

    def heads_for(self, source_id: str, target_id: str) -> list[HeadLoading]:
        """Top heads of the edge source -> target, largest |direct + via_mlp| first."""
        s, t = self._index.get(Node.parse(source_id).id), self._index.get(Node.parse(target_id).id)
        e = self._edges.get((s, t)) if s is not None and t is not None else None
        if e is None:
            raise InputError(f"no edge {source_id} -> {target_id} in this graph: pick a pair from graph links")
        return self._loadings(e)

    def _loadings(self, e: int) -> list[HeadLoading]:
        layer = int(self.head_layer[e])
        heads, direct, via = self.heads[e].tolist(), self.direct[e].tolist(), self.via_mlp[e].tolist()
        return [HeadLoading(layer, h, d, v) for h, d, v in zip(heads, direct, via) if h >= 0]

    # -- summary -----------------------------------------------------------------------------------
    def top_heads(self, n: int = 5) -> list[dict[str, Any]]:
        """Heads carrying the most cross-position influence: per kept cross-position edge, each head's
        share of |direct + via_mlp| (among the stored heads) times the edge's influence, summed and
        divided by the total influence of those edges."""
        pos = torch.tensor([node.node.pos for node in self.nodes], dtype=torch.long, device=self.source.device)
        cross = (self.head_layer >= 0) & (pos[self.source] != pos[self.target])
        if not bool(cross.any()) or self.heads.numel() == 0:
            return []
        part = (self.direct[cross] + self.via_mlp[cross]).abs()
        carried = part / part.sum(1, keepdim=True).clamp_min(1e-30) * self.influence[cross][:, None]
        layer = self.head_layer[cross][:, None].expand_as(self.heads[cross])
        n_heads = int(self.heads.max()) + 1
        key = layer * n_heads + self.heads[cross]
        valid = self.heads[cross] >= 0
        totals = torch.zeros(self.n_layers * n_heads, dtype=carried.dtype, device=carried.device)
        totals.index_add_(0, key[valid], carried[valid])
        total = max(float(self.influence[cross].sum()), 1e-30)
        order = torch.argsort(totals, descending=True)[:n]
        return [
            {"layer": int(k) // n_heads, "head": int(k) % n_heads, "influence": float(totals[k]) / total}
            for k in order
            if float(totals[k]) > 0
        ]

    def summary(self) -> dict[str, Any]:
        kinds = [n.node.kind for n in self.nodes]
        return {
            "n_nodes": len(self.nodes),
            "n_features": kinds.count(Kind.FEATURE),
            "n_edges": self.n_edges,
            "completeness": self.completeness,
            "replacement": self.replacement,
            "top_cross_position_heads": self.top_heads(),
        }

    def summary_text(self) -> str:
        s = self.summary()
        heads = ", ".join(f"L{h['layer']}H{h['head']} ({h['influence']:.0%})" for h in s["top_cross_position_heads"])
        return (
            f"{s['n_nodes']} nodes ({s['n_features']} features), {s['n_edges']} edges; "
            f"completeness {s['completeness']:.3f}, replacement {s['replacement']:.3f}; "
            f"cross-position heads: {heads or 'none'}"
        )

    # -- JSON --------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        n_layers = self.n_layers
        nodes = [_node_json(n, n_layers) for n in self.nodes]
        ids = [n.id for n in self.nodes]
        pos = [n.node.pos for n in self.nodes]
        links = []
        weights, infl, direct, via = (_short(x) for x in (self.weight, self.influence, self.direct, self.via_mlp))
        layers, heads = self.head_layer.tolist(), self.heads.tolist()
        for e, (s, t) in enumerate(zip(self.source.tolist(), self.target.tolist())):
            link: dict[str, Any] = {"source": ids[s], "target": ids[t], "weight": weights[e], "influence": infl[e]}
            link["head_loadings"] = [
                {"layer": layers[e], "head": h, "direct": d, "via_mlp": v}
                for h, d, v in zip(heads[e], direct[e], via[e])
                if h >= 0
            ]
            if pos[s] != pos[t]:
                link["qk_top_terms"] = self.qk_terms.get(e)
            links.append(link)
        meta = {
            "slug": str(self.settings.get("slug", "qktrace-graph")),
            "scan": self.model_name,
            "transcoder_list": [],
            "prompt_tokens": list(self.str_tokens),
            "prompt": self.prompt,
            "node_threshold": self.settings.get("node_threshold"),
            "schema_version": 1,
            "qktrace": {
                "format_version": FORMAT_VERSION,
                "model": self.model_name,
                "n_layers": n_layers,
                "tokens": list(self.tokens),
                "replacement": self.replacement,
                "completeness": self.completeness,
                "settings": dict(self.settings),
            },
        }
        qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
        return {"metadata": meta, "qParams": qparams, "nodes": nodes, "links": links}

    def cross_position_edges(self, top: int | None = None) -> list[int]:
        """Kept edges that cross positions (through attention), most influential first."""
        pos = torch.tensor([n.node.pos for n in self.nodes], dtype=torch.long, device=self.source.device)
        cross = ((self.head_layer >= 0) & (pos[self.source] != pos[self.target])).nonzero().flatten()
        order = cross[torch.argsort(self.influence[cross], descending=True)]
        return order[:top].tolist() if top is not None else order.tolist()

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = True) -> Path:
        """Write the JSON to a temporary file beside `path` and rename it over `path` (`qktrace.files`): a
        crash mid-write leaves the old file intact. `overwrite=False` refuses an existing `path`."""
        text = json.dumps(self.to_json(), separators=(",", ":"), allow_nan=False)
        return atomic_write(path, text, overwrite=overwrite)

    @staticmethod
    def from_json(data: Mapping[str, Any], where: str = "graph JSON") -> Graph:
        try:
            return _from_json(data)
        except QKTraceError as e:
            raise GraphFileError(f"{where}: {e}") from None
        except RecursionError:
            raise GraphFileError(f"{where} is nested too deeply to be a qktrace graph: write it again") from None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError, RuntimeError) as e:
            first = " ".join(str(e).split())[:200]
            raise GraphFileError(
                f"{where} is not a qktrace graph ({type(e).__name__}: {first}): write it again with Graph.save"
            ) from None


def load_graph(path: str | os.PathLike[str]) -> Graph:
    """Read a graph written by `Graph.save` (never unpickles)."""
    p = Path(path)
    try:
        data = json.loads(p.read_bytes().decode("utf-8"), parse_constant=_no_constant)
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise GraphFileError(f"cannot read graph {p} ({type(e).__name__}): check the path or write it again") from None
    except RecursionError:
        raise GraphFileError(f"{p} is nested too deeply to be a qktrace graph: write it again") from None
    if not isinstance(data, Mapping):
        raise GraphFileError(f"{p} is not a JSON object: it is not a qktrace graph")
    return Graph.from_json(data, where=str(p))


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid in a graph")


def _short(x: Tensor) -> list[Any]:
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


def _node_json(n: GraphNode, n_layers: int) -> dict[str, Any]:
    node = n.node
    if node.kind is Kind.TOKEN:
        layer, feature = "E", node.pos
    elif node.kind is Kind.LOGIT:
        layer, feature = str(n_layers + 1), node.index
    elif node.kind is Kind.FEATURE:  # circuit-tracer's Cantor pairing of (layer, feature)
        layer, feature = str(node.checkpoint), (node.checkpoint + node.index) * (node.checkpoint + node.index + 1) // 2
        feature += node.index
    else:
        layer, feature = str(node.checkpoint), -1
    return {
        "node_id": node.id,
        "feature": feature,
        "layer": layer,
        "ctx_idx": node.pos,
        "feature_type": FEATURE_TYPE[node.kind],
        "token_prob": n.token_prob,
        "is_target_logit": n.is_target_logit,
        "run_idx": 0,
        "reverse_ctx_idx": 0,
        "jsNodeId": node.id,
        "clerp": n.label,
        "influence": _finite(n.cumulative),
        "activation": _finite(n.activation),
        "raw_influence": _finite(n.influence),
    }


def _bounded_int(value: Any, lo: int, hi: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise GraphFileError(f"{what} is {str(value)[:40]!r}, not an integer in {lo}..{hi}")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise GraphFileError(f"{what} is a {type(value).__name__}, not a list")
    return value


def _from_json(data: Mapping[str, Any]) -> Graph:
    meta = data["metadata"]
    ours = meta.get("qktrace") if isinstance(meta, Mapping) else None
    if not isinstance(ours, Mapping) or "format_version" not in ours:
        raise GraphFileError("no metadata.qktrace.format_version: this JSON was not written by qktrace")
    if ours["format_version"] != FORMAT_VERSION:
        raise GraphFileError(
            f"format_version {ours['format_version']} is not supported (this qktrace reads {FORMAT_VERSION}): "
            "rebuild the graph with this version"
        )
    nodes = tuple(
        GraphNode(
            node=Node.parse(n["node_id"]),
            activation=n.get("activation"),
            influence=float(n.get("raw_influence") or 0.0),
            cumulative=float(n.get("influence") or 0.0),
            label=str(n.get("clerp", "")),
            token_prob=float(n.get("token_prob", 0.0)),
            is_target_logit=bool(n.get("is_target_logit", False)),
        )
        for n in data["nodes"]
    )
    # numbers read from the file are bounded by its content before anything is allocated from them
    n_layers = _bounded_int(ours["n_layers"], 1, LIMITS.max_layers, "metadata.qktrace.n_layers")
    tokens = tuple(_bounded_int(t, 0, 2**31 - 1, "a token id") for t in _list(ours["tokens"], "tokens"))
    for gn in nodes:
        if not (0 <= gn.node.pos < len(tokens) and 0 <= gn.node.checkpoint <= n_layers):
            raise GraphFileError(
                f"node {gn.id[:80]} lies outside the graph's {len(tokens)} tokens and {n_layers} layers"
            )
    index = {n.id: i for i, n in enumerate(nodes)}
    links = _list(data["links"], "links")
    settings = dict(ours.get("settings") or {})
    top = max((len(_list(link.get("head_loadings"), "head_loadings")) for link in links), default=0)
    top_setting = settings.get("top_heads") or 0
    top = max(top, _bounded_int(top_setting, 0, LIMITS.max_heads_per_layer, "settings.top_heads"))
    n = len(links)
    cpu = torch.device("cpu")  # a Graph lives on the CPU
    heads = torch.full((n, top), -1, dtype=torch.long, device=cpu)
    direct, via = torch.zeros(n, top, device=cpu), torch.zeros(n, top, device=cpu)
    layer = torch.full((n,), -1, dtype=torch.long, device=cpu)
    for e, link in enumerate(links):
        for j, h in enumerate(link.get("head_loadings") or []):
            layer[e] = _bounded_int(h["layer"], 0, n_layers - 1, "head_loadings layer")
            heads[e, j] = _bounded_int(h["head"], 0, LIMITS.max_heads_per_layer - 1, "head_loadings head")
            direct[e, j], via[e, j] = float(h["direct"]), float(h["via_mlp"])
    return Graph(
        nodes=nodes,
        source=torch.tensor([index[link["source"]] for link in links], dtype=torch.long, device=cpu),
        target=torch.tensor([index[link["target"]] for link in links], dtype=torch.long, device=cpu),
        weight=torch.tensor([float(link["weight"]) for link in links], device=cpu),
        influence=torch.tensor([float(link.get("influence", 0.0)) for link in links], device=cpu),
        head_layer=layer,
        heads=heads,
        direct=direct,
        via_mlp=via,
        tokens=tokens,
        str_tokens=tuple(meta["prompt_tokens"]),
        prompt=str(meta["prompt"]),
        model_name=str(ours["model"]),
        n_layers=n_layers,
        replacement=float(ours["replacement"]),
        completeness=float(ours["completeness"]),
        settings=settings,
        qk_terms={e: link["qk_top_terms"] for e, link in enumerate(links) if link.get("qk_top_terms")},
    )
