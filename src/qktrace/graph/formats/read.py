"""Graph files read, the one reader: bytes to JSON (`read_json`), which tool wrote it (`origin`), checked
against the declaration (`validate`), then a `Graph`'s fields (`graph_fields`) or what a listing shows of
it (`describe`). `load_graph` and the server's graph store both read through here.

Versions: 2 is written. 1 (biases typed as errors with feature -1, a fixed slug, the load path as scan,
no QK tracing) is read as it was written; node kinds come from node ids, and slug and scan are derived
again when the graph is saved. Files without metadata.qktrace are other tools' graphs (circuit-tracer,
Neuronpedia): their nodes keep the file's own ids and fields, they have no head loadings, and saving one
writes the file back as it was read.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from ...config import LIMITS
from ...errors import GraphFileError, QKTraceError
from ...nodes import Node
from ..elements import GraphNode, QKContributor, QKTracing
from .numbering import foreign_node, layer_number
from .schema import CIRCUIT_TRACER, FORMAT_VERSION, GRAPH_ADAPTER, NEURONPEDIA, QKTRACE, GraphJSON, LinkJSON, NodeJSON
from .write import qk_suffix

log = logging.getLogger(__name__)
_CPU = torch.device("cpu")  # a Graph lives on the CPU

# -- the file -------------------------------------------------------------------------------------------


def read_json(path: str | os.PathLike[str], max_bytes: int | None = None, shown: str | None = None) -> dict[str, Any]:
    """The JSON object in a graph file (never unpickles; no NaN or Infinity); GraphFileError naming the file
    (as `shown`, default its path) and the fix when it cannot be read, is past `max_bytes`, or is not an object."""
    p = Path(path)
    name = str(p) if shown is None else shown
    try:
        st = p.stat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block or never end
            raise GraphFileError(f"{name} is not a regular file: give a graph file written by Graph.save")
        size = st.st_size
        if max_bytes is not None and size > max_bytes:
            raise GraphFileError(
                f"{name} is {size / 2**20:.0f} MiB, more than the {max_bytes / 2**20:.0f} MiB this server reads: "
                "open it with qktrace.load_graph, or prune it"
            )
        data = json.loads(p.read_bytes().decode("utf-8"), parse_constant=_no_constant, parse_float=_finite)
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise GraphFileError(f"cannot read graph {name} ({type(e).__name__}): check it or write it again") from None
    except RecursionError:
        raise GraphFileError(f"{name} is nested too deeply to be a qktrace graph: write it again") from None
    if not isinstance(data, dict):
        raise GraphFileError(f"{name} is not a JSON object: it is not a qktrace graph")
    return data


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid in a graph")


def _finite(text: str) -> float:
    """A JSON number as a float; a literal past float's range (`1e999`) is refused, not read as infinity."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} is past float's range")
    return value


def origin(data: Mapping[str, Any]) -> str:
    """Which tool wrote a graph file: qktrace (metadata.qktrace), Neuronpedia (its metadata.info,
    feature_details, settings or QK side channel) or circuit-tracer; GraphFileError if it is none of them."""
    meta = data.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(data.get("nodes"), list) or "links" not in data:
        raise GraphFileError(
            "not a qktrace graph, nor a circuit-tracer or Neuronpedia one (no metadata, nodes and links): "
            "write it again with Graph.save"
        )
    if "qktrace" in meta:
        return QKTRACE
    np_keys = ("info", "feature_details", "generation_settings", "pruning_settings")
    return NEURONPEDIA if "qk_only_nodes" in data or any(k in meta for k in np_keys) else CIRCUIT_TRACER


@dataclass(frozen=True)
class GraphHeader:
    """What a listing shows of a graph file, read without building the graph."""

    origin: str
    prompt: str
    model: str
    n_nodes: int
    n_links: int


def describe(data: Mapping[str, Any]) -> GraphHeader:
    """The header of a graph file `origin` knows (GraphFileError otherwise)."""
    kind = origin(data)
    meta = data["metadata"]
    ours = meta.get("qktrace") if kind == QKTRACE else None
    model = ours.get("model", "") if isinstance(ours, dict) else meta.get("scan", "")
    n_nodes, n_links = len(data.get("nodes") or []), len(data.get("links") or [])
    return GraphHeader(kind, str(meta.get("prompt", "")), str(model), n_nodes, n_links)


def validate(data: Mapping[str, Any]) -> GraphJSON:
    """The file checked against the declaration (`schema`); GraphFileError naming the first bad field."""
    try:
        return GRAPH_ADAPTER.validate_python(data)
    except ValidationError as e:
        raise GraphFileError(_problem(e.errors()[0])) from None


_EXPECTED = {
    "list_type": "a list", "tuple_type": "a list", "int_type": "an integer", "float_type": "a number",
    "string_type": "a string", "dict_type": "an object", "typed_dict_type": "an object", "bool_type": "true or false",
}  # fmt: skip
_JSON_NAMES = {"dict": "an object", "list": "a list", "str": "a string", "int": "an integer", "float": "a number",
               "bool": "a boolean", "NoneType": "null"}  # fmt: skip


def _problem(err: Any) -> str:
    """One pydantic error as one line: where, what it is, what it should be."""
    where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("str", "int", "float", "none")) or "the file"
    if err.get("type") == "missing":
        return f"{where} is missing: is it a graph file?"
    expected = _EXPECTED.get(err.get("type", ""))
    if expected is None:
        return f"{where}: {err.get('msg', 'invalid')}: is it a graph file?"
    value = err.get("input")
    got = _JSON_NAMES.get(type(value).__name__, type(value).__name__)
    return f"{where} is {got} {str(value)[:40]!r}, not {expected}: is it a graph file?"


def _bounded_int(value: Any, lo: int, hi: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise GraphFileError(f"{what} is {str(value)[:40]!r}, not an integer in {lo}..{hi}")
    return value


# -- a Graph's fields ---------------------------------------------------------------------------------


def graph_fields(data: Mapping[str, Any], where: str = "graph JSON") -> dict[str, Any]:
    """The fields of a `Graph` (`Graph(**fields)`) from any graph file `origin` knows: qktrace's JSON
    (versions 1 and 2), circuit-tracer's or Neuronpedia's. GraphFileError, one line naming `where`."""
    try:
        kind = origin(data)
        if kind == QKTRACE:
            _check_version(data["metadata"])
        checked = validate(data)
        return _ours(checked) if kind == QKTRACE else _theirs(checked, data, kind)
    except QKTraceError as e:
        raise GraphFileError(f"{where}: {e}") from None
    except RecursionError:
        raise GraphFileError(f"{where} is nested too deeply to be a graph: write it again") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError, RuntimeError) as e:
        first = " ".join(str(e).split())[:200]
        raise GraphFileError(
            f"{where} is not a qktrace graph ({type(e).__name__}: {first}): write it again with Graph.save"
        ) from None


def _check_version(meta: Mapping[str, Any]) -> None:
    version = meta["qktrace"].get("format_version") if isinstance(meta["qktrace"], Mapping) else None
    if version not in (1, FORMAT_VERSION):
        raise GraphFileError(
            f"format_version {str(version)[:20]} is not supported (this qktrace reads 1 and {FORMAT_VERSION}): "
            "rebuild the graph with this version"
        )


def _ours(data: GraphJSON) -> dict[str, Any]:
    """qktrace's own file: nodes, links with head loadings, QK terms and tracing, token ids."""
    meta = data["metadata"]
    ours = meta["qktrace"]
    v2 = ours["format_version"] == FORMAT_VERSION
    n_layers = _bounded_int(ours["n_layers"], 1, LIMITS.max_layers, "metadata.qktrace.n_layers")
    tokens = tuple(_bounded_int(t, 0, 2**31 - 1, "a token id") for t in ours["tokens"])
    nodes, tracing = _our_nodes(data["nodes"], len(tokens), n_layers, v2)
    index = _index(nodes, "two nodes share one node_id: write the graph again with Graph.save")
    links = data["links"]
    settings = dict(ours.get("settings") or {})
    loadings = _head_loadings(links, settings, n_layers)
    try:
        ends = [(index[link["source"]], index[link["target"]]) for link in links]
    except KeyError as e:
        raise GraphFileError(f"a link names node {str(e)[:80]}, which is not among the nodes") from None
    only = {
        cid: QKContributor(str(entry["clerp"]), entry.get("activation"))
        for cid, entry in (data.get("qk_only_nodes") or {}).items()
    }
    for cid in only:
        Node.parse(cid)
    sources = {_bounded_int(int(c), 0, n_layers, "neuronpedia_ids checkpoint"): str(i)
               for c, i in (ours.get("neuronpedia_ids") or {}).items() if str(c).isdigit()}  # fmt: skip
    return {
        "nodes": tuple(nodes),
        **_edges(ends, links),
        **loadings,
        "tokens": tokens,
        "str_tokens": tuple(meta["prompt_tokens"]),
        "prompt": meta["prompt"],
        "model_name": ours["model"],
        "n_layers": n_layers,
        "replacement": ours["replacement"],
        "completeness": ours["completeness"],
        "settings": settings,
        "qk_terms": {e: terms for e, link in enumerate(links) if (terms := link.get("qk_top_terms"))},
        "qk_tracing": tracing,
        "qk_only": only,
        "slug": meta["slug"] if v2 else "",
        "scan": meta["scan"] if v2 else "",
        "sources": sources,
    }


def _our_nodes(
    items: list[NodeJSON], n_tokens: int, n_layers: int, v2: bool
) -> tuple[list[GraphNode], dict[int, QKTracing]]:
    """qktrace's nodes, and the QK tracing of those that carry it (version 2)."""
    nodes, tracing = [], {}
    for i, n in enumerate(items):
        node = Node.parse(n["node_id"])
        if not (0 <= node.pos < n_tokens and 0 <= node.checkpoint <= n_layers):
            raise GraphFileError(f"node {node.id} lies outside the graph's {n_tokens} tokens and {n_layers} layers")
        label = n.get("clerp", "")
        head = n.get("qk_tracing_head")
        results = n.get("qk_tracing_results")
        if v2 and head is not None and results is not None:
            _check_tracing_head(head, node.id, n_tokens, n_layers)
            label = label.removesuffix(qk_suffix(head))
            tracing[i] = QKTracing(
                head["layer"], head["head"], head["query_pos"], head["key_pos"], head["score"], head["pattern"],
                pairs=tuple((q, k, float(v)) for q, k, v in results["pair_wise_contributors"]),
                query=tuple((c, float(v)) for c, v in results["top_q_marginal_contributors"]),
                key=tuple((c, float(v)) for c, v in results["top_k_marginal_contributors"]),
            )  # fmt: skip
        nodes.append(_graph_node(n, node, label, float(n.get("raw_influence") or 0.0)))
    return nodes, tracing


def _check_tracing_head(head: Mapping[str, Any], node_id: str, n_tokens: int, n_layers: int) -> None:
    """A node's qk_tracing_head names a real head and positions of the graph's prompt (query after key)."""
    where = f"node {node_id[:80]} qk_tracing_head"
    _bounded_int(head["layer"], 0, n_layers - 1, f"{where}.layer")
    _bounded_int(head["head"], 0, LIMITS.max_heads_per_layer - 1, f"{where}.head")
    query = _bounded_int(head["query_pos"], 0, max(n_tokens - 1, 0), f"{where}.query_pos")
    _bounded_int(head["key_pos"], 0, query, f"{where}.key_pos")


def _graph_node(n: NodeJSON, node: Node, label: str, influence: float, source_id: str | None = None) -> GraphNode:
    return GraphNode(
        node=node,
        activation=n.get("activation"),
        influence=influence,
        cumulative=float(n.get("influence") or 0.0),
        label=label,
        token_prob=float(n.get("token_prob", 0.0)),
        is_target_logit=bool(n.get("is_target_logit", False)),
        source_id=source_id,
    )


def _index(nodes: Sequence[GraphNode], duplicate: str) -> dict[str, int]:
    index = {n.id: i for i, n in enumerate(nodes)}
    if len(index) != len(nodes):
        raise GraphFileError(duplicate)
    return index


def _edges(ends: list[tuple[int, int]], links: Sequence[LinkJSON]) -> dict[str, torch.Tensor]:
    return {
        "source": torch.tensor([s for s, _ in ends], dtype=torch.long, device=_CPU),
        "target": torch.tensor([t for _, t in ends], dtype=torch.long, device=_CPU),
        "weight": torch.tensor([link["weight"] for link in links], device=_CPU),
    }


def _head_loadings(links: list[LinkJSON], settings: Mapping[str, Any], n_layers: int) -> dict[str, torch.Tensor]:
    """Per link: its edge influence, the layer whose heads carried it, and (head, direct, via_mlp) of its
    top heads, padded with head -1 to the most any link keeps (or to settings.top_heads, where that padding
    stays within what the file holds). Memory is bounded by the file: the padded table has at most
    `_PAD_FACTOR` cells per link and loading in it (GraphFileError otherwise)."""
    max_head = LIMITS.max_heads_per_layer - 1
    n_links, lists = len(links), [link.get("head_loadings") or [] for link in links]
    top = max((len(x) for x in lists), default=0)
    budget = _PAD_FACTOR * (n_links + sum(len(x) for x in lists))
    if top > LIMITS.max_heads_per_layer or n_links * top > budget:
        raise GraphFileError(
            f"a link has {top} head loadings, more than one layer's heads or than the file's other links "
            "can carry: write the graph again with Graph.save"
        )
    stated = _bounded_int(settings.get("top_heads") or 0, 0, LIMITS.max_heads_per_layer, "settings.top_heads")
    if stated > top and n_links * stated <= budget:
        top = stated
    layer = [-1] * n_links  # per link: the layer of its heads
    where: list[tuple[int, int]] = []  # (link, slot) of each loading
    cells: list[tuple[float, float, float]] = []  # its (head, direct, via_mlp)
    for e, loadings in enumerate(lists):
        for j, h in enumerate(loadings):
            layer[e] = _bounded_int(h["layer"], 0, n_layers - 1, "head_loadings layer")
            _bounded_int(h["head"], 0, max_head, "head_loadings head")
            where.append((e, j))
            cells.append((h["head"], h["direct"], h["via_mlp"]))
    table = torch.zeros(n_links, top, 3, dtype=torch.float64, device=_CPU)  # [edge, top, (head, direct, via)]
    table[..., 0] = -1
    if cells:
        at = torch.tensor(where, dtype=torch.long, device=_CPU)
        table[at[:, 0], at[:, 1]] = torch.tensor(cells, dtype=torch.float64, device=_CPU)
    return {
        "influence": torch.tensor([link.get("influence", 0.0) for link in links], device=_CPU),
        "head_layer": torch.tensor(layer, dtype=torch.long, device=_CPU),
        "heads": table[..., 0].long(),
        "direct": table[..., 1].float(),
        "via_mlp": table[..., 2].float(),
    }


_PAD_FACTOR = 16  # padded head-loading cells allowed per link and loading the file holds


def _theirs(data: GraphJSON, raw: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """Another tool's graph: nodes keep their ids; no head loadings, no QK terms, no token ids."""
    meta = data["metadata"]
    str_tokens = tuple(meta["prompt_tokens"])
    n_layers = _their_layers(data["nodes"])
    cantor_paired = meta.get("schema_version") == 1
    nodes = []
    for n in data["nodes"]:
        if not 0 <= n["ctx_idx"] < len(str_tokens):
            raise GraphFileError(
                f"node {n['node_id'][:80]} has ctx_idx {n['ctx_idx']}, outside the {len(str_tokens)} tokens"
            )
        node = foreign_node(n, n_layers, cantor_paired)
        nodes.append(_graph_node(n, node, n.get("clerp", ""), 0.0, source_id=n["node_id"]))
    index = _index(nodes, "two nodes share one node_id: is the file complete?")
    kept = [link for link in data["links"] if link["source"] in index and link["target"] in index]
    if len(kept) < len(data["links"]):  # as both frontends do
        log.warning("%d links name nodes that are not in the file: skipped", len(data["links"]) - len(kept))
    n_links = len(kept)
    return {
        "nodes": tuple(nodes),
        **_edges([(index[link["source"]], index[link["target"]]) for link in kept], kept),
        "influence": torch.zeros(n_links, device=_CPU),
        "head_layer": torch.full((n_links,), -1, dtype=torch.long, device=_CPU),
        "heads": torch.zeros(n_links, 0, dtype=torch.long, device=_CPU),
        "direct": torch.zeros(n_links, 0, device=_CPU),
        "via_mlp": torch.zeros(n_links, 0, device=_CPU),
        "tokens": (),
        "str_tokens": str_tokens,
        "prompt": meta["prompt"],
        "model_name": meta["scan"],
        "n_layers": n_layers,
        "replacement": math.nan,
        "completeness": math.nan,
        "settings": {},
        "slug": meta["slug"],
        "scan": meta["scan"],
        "origin": kind,
        "raw": raw,
    }


def _their_layers(nodes: list[NodeJSON]) -> int:
    """The number of layers another tool's file implies: circuit-tracer puts logits at n_layers + 1,
    Neuronpedia's CRM converter at n_layers; the larger bound."""
    inner = [layer_number(n["layer"]) for n in nodes if n["feature_type"] not in ("embedding", "logit")]
    logits = [layer_number(n["layer"]) for n in nodes if n["feature_type"] == "logit"]
    n_layers = max([x + 1 for x in inner if x is not None] + [x - 1 for x in logits if x is not None] + [1])
    return _bounded_int(n_layers, 1, LIMITS.max_layers, "the file's number of layers")
