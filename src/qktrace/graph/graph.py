"""The `Graph`: kept nodes, a sparse edge list, head loadings per edge, QK tracing, and its versioned JSON.

The JSON (`formats`) is what circuit-tracer's and Neuronpedia's frontends read as is, with qktrace's
head loadings and QK terms riding along. `load_graph` also opens those tools' own graph files (no head
loadings). Node ids are `qktrace.nodes` ids. Never pickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import GraphFileError, InputError
from ..files import atomic_write
from ..nodes import Kind, Node
from . import formats
from .elements import GraphNode, HeadLoading, QKContributor, QKTracing
from .formats import FORMAT_VERSION, QKTRACE

__all__ = ["FORMAT_VERSION", "Graph", "GraphNode", "HeadLoading", "QKContributor", "QKTracing", "load_graph"]


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
    qk_tracing: Mapping[int, QKTracing] = field(default_factory=dict)  # node index -> its carrier head's QK
    qk_only: Mapping[str, QKContributor] = field(default_factory=dict)  # QK components that are not nodes
    slug: str = ""  # Neuronpedia slug ("": the prompt's words and a hash, see formats.graph_slug)
    scan: str = ""  # Neuronpedia model id ("": from the model and SAEs, see formats.neuronpedia_scan)
    sources: Mapping[int, str] = field(default_factory=dict)  # checkpoint -> its SAE's Neuronpedia id
    origin: str = QKTRACE  # "circuit-tracer" or "neuronpedia": read from another tool's file
    raw: Mapping[str, Any] | None = None  # another tool's file as read (what saving writes back)

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

    def _key(self, node_id: str) -> str:
        return Node.parse(node_id).id if self.origin == QKTRACE else node_id

    def node(self, node_id: str) -> GraphNode:
        """The node with this id (another tool's graph: the file's own id)."""
        i = self._index.get(self._key(node_id))
        if i is None:
            raise InputError(f"node '{node_id}' is not in this graph: pick one of graph.nodes (pruned nodes are gone)")
        return self.nodes[i]

    def heads_for(self, source_id: str, target_id: str) -> list[HeadLoading]:
        """Top heads of the edge source -> target, largest |direct + via_mlp| first."""
        s, t = self._index.get(self._key(source_id)), self._index.get(self._key(target_id))
        e = self._edges.get((s, t)) if s is not None and t is not None else None
        if e is None:
            raise InputError(f"no edge {source_id} -> {target_id} in this graph: pick a pair from graph links")
        return self._loadings(e)

    def _loadings(self, e: int) -> list[HeadLoading]:
        layer = int(self.head_layer[e])
        heads, direct, via = self.heads[e].tolist(), self.direct[e].tolist(), self.via_mlp[e].tolist()
        return [HeadLoading(layer, h, d, v) for h, d, v in zip(heads, direct, via) if h >= 0]

    def carrier(self, node: int) -> tuple[int, int, int] | None:
        """(layer, head, key position): the head that carries most of node `node`'s cross-position
        inputs -- the largest sum of |direct + via_mlp| over the kept cross-position edges into it -- and
        the source position it carries most from. None without such edges (or head loadings)."""
        pos = [n.node.pos for n in self.nodes]
        into = (self.target == node) & (self.head_layer >= 0)
        per_head: dict[tuple[int, int], float] = {}
        per_key: dict[tuple[int, int, int], float] = {}
        for e in into.nonzero().flatten().tolist():
            k = pos[int(self.source[e])]
            if k == pos[node]:
                continue
            for hl in self._loadings(e):
                part = abs(hl.total)
                per_head[hl.layer, hl.head] = per_head.get((hl.layer, hl.head), 0.0) + part
                per_key[hl.layer, hl.head, k] = per_key.get((hl.layer, hl.head, k), 0.0) + part
        if not per_head:
            return None
        layer, head = max(per_head, key=lambda lh: (per_head[lh], -lh[0], -lh[1]))
        keys = {k: v for (ly, h, k), v in per_key.items() if (ly, h) == (layer, head)}
        return layer, head, max(keys, key=lambda k: (keys[k], -k))

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
            "n_features": sum(kinds.count(k) for k in (Kind.FEATURE, Kind.TRANSCODER, Kind.ATTN_FEATURE)),
            "n_edges": self.n_edges,
            "completeness": self.completeness,
            "replacement": self.replacement,
            "top_cross_position_heads": self.top_heads(),
        }

    def summary_text(self) -> str:
        s = self.summary()
        size = f"{s['n_nodes']} nodes ({s['n_features']} features), {s['n_edges']} edges"
        if self.origin != QKTRACE:
            return f"{size}; made by {self.origin}: no head loadings"
        heads = ", ".join(f"L{h['layer']}H{h['head']} ({h['influence']:.0%})" for h in s["top_cross_position_heads"])
        return (
            f"{size}; completeness {s['completeness']:.3f}, replacement {s['replacement']:.3f}; "
            f"cross-position heads: {heads or 'none'}"
        )

    # -- JSON ------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """circuit-tracer / Neuronpedia JSON with qktrace's fields (`qktrace.graph.formats`)."""
        return dict(formats.to_json(self))

    def cross_position_edges(self, top: int | None = None, *, loaded: bool = True) -> list[int]:
        """Kept edges that cross positions (through attention), most influential first; `loaded`: only those
        with head loadings (False: every one, as in a transcoder graph, which has none)."""
        pos = torch.tensor([n.node.pos for n in self.nodes], dtype=torch.long, device=self.source.device)
        cross = pos[self.source] != pos[self.target]
        cross = ((self.head_layer >= 0) & cross if loaded else cross).nonzero().flatten()
        order = cross[torch.argsort(self.influence[cross], descending=True)]
        return order[:top].tolist() if top is not None else order.tolist()

    def save(
        self, path: str | os.PathLike[str], *, overwrite: bool = True, slug: str | None = None, scan: str | None = None
    ) -> Path:
        """Write the JSON to a temporary file beside `path` and rename it over `path` (`qktrace.files`): a
        crash mid-write leaves the old file intact. `overwrite=False` refuses an existing `path`.
        `slug`, `scan`: Neuronpedia's graph name and model id, instead of the graph's own."""
        graph = self.with_names(slug=slug, scan=scan)
        try:
            text = json.dumps(graph.to_json(), separators=(",", ":"), allow_nan=False)
        except ValueError:  # NaN or infinity somewhere: no tool reads them back
            raise GraphFileError(
                "the graph holds a NaN or infinite number, which JSON cannot carry: rebuild it from finite inputs"
            ) from None
        return atomic_write(path, text, overwrite=overwrite)

    def with_names(self, *, slug: str | None = None, scan: str | None = None) -> Graph:
        """This graph under another Neuronpedia slug and/or scan ([a-zA-Z0-9_.-]; InputError otherwise)."""
        if slug is None and scan is None:
            return self
        if self.raw is not None:
            raise InputError("this graph was read from another tool's file: rename it there, or build it with qktrace")
        return replace(
            self,
            slug=self.slug if slug is None else formats.check_name(slug, "slug"),
            scan=self.scan if scan is None else formats.check_name(scan, "scan"),
        )

    @staticmethod
    def from_json(data: Mapping[str, Any], where: str = "graph JSON") -> Graph:
        """A graph from qktrace's JSON (versions 1 and 2), or from circuit-tracer's / Neuronpedia's."""
        return Graph(**formats.graph_fields(data, where))


def load_graph(path: str | os.PathLike[str]) -> Graph:
    """Read a graph written by `Graph.save`, or by circuit-tracer or Neuronpedia (never unpickles)."""
    return Graph.from_json(formats.read_json(path), where=str(path))
