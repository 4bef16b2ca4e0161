"""Graph JSON as circuit-tracer's and Neuronpedia's frontends read it: declared once, written and read here.

The file (circuit-tracer 0.5's frontend models and Neuronpedia's upload schema, plus qktrace's fields):

    metadata       slug, scan, prompt_tokens, prompt, transcoder_list, node_threshold, schema_version,
                   feature_details (when the SAEs are on Neuronpedia), info, generation_settings,
                   pruning_settings; qktrace: {format_version, model, n_layers, tokens, replacement,
                   completeness, settings, neuronpedia_ids}
    qParams        pinnedIds, supernodes, linkType, clickedId, sg_pos
    nodes          node_id, feature, layer, ctx_idx, feature_type, jsNodeId, clerp, token_prob,
                   is_target_logit, run_idx, reverse_ctx_idx, influence (cumulative), activation;
                   qktrace: raw_influence; on targets of cross-position links, Neuronpedia's
                   qk_tracing_results and qktrace's qk_tracing_head (which head, query and key)
    links          source, target, weight; qktrace: influence, head_loadings, qk_top_terms
    qk_only_nodes  QK contributors that are not nodes of the graph, keyed by node_id (Neuronpedia's)

Conventions:
- node_id and jsNodeId are qktrace ids (`qktrace.nodes` writes and parses them).
- layer: the checkpoint as a string; tokens "E"; logits n_layers + 1. When every SAE has a Neuronpedia id
  of one source set, metadata.feature_details names it and layers use that set's layer numbers (Gemma
  Scope's resid_post SAE of layer L reads checkpoint L + 1: layer = checkpoint - 1), so Neuronpedia finds
  each feature's dashboard at `{layer}-{source set}`.
- feature: tokens their position, logits their token id, features Cantor(layer, index) (schema_version 1;
  Neuronpedia decodes it), and one negative number per other kind: `FEATURE_NUMBER`, error -1, SAE bias -2,
  attention bias -3, MLP bias -4, head bias -5. Both frontends show a node under (layer, feature,
  ctx_idx), so no two nodes of a graph share it.
- feature_type: "embedding", "cross layer transcoder" (SAE features), "logit", "mlp reconstruction error"
  (SAE errors only) and "bias" (SAE, attention, MLP and head biases: Neuronpedia's type for bias leaves,
  never counted as error).
- slug: [a-zA-Z0-9_.-] (Neuronpedia's rule), by default the prompt's words and a hash of the model, tokens
  and settings. scan: the Neuronpedia model id when the model or its SAEs name one (`NEURONPEDIA_MODELS`),
  else the model's name made safe (the demo model is `qktrace-demo`). Both can be given.
- QK tracing: a target node of cross-position links carries, for the head that carries most of those
  links, the top (query, key) term pairs and both sides' marginals at (the node's position, the key the
  head carries most from); every contributor id is a node of the graph or a key of qk_only_nodes. The
  head is named in qk_tracing_head and at the end of the node's clerp (" [QK L2H6 @5]").

Versions: 2 is written. 1 (biases typed as errors with feature -1, a fixed slug, the load path as scan,
no QK tracing) is read as it was written; node kinds come from node ids, and slug and scan are derived
again when the graph is saved. Files without metadata.qktrace are other tools' graphs (circuit-tracer,
Neuronpedia): their nodes keep the file's own ids and fields, they have no head loadings, and saving one
writes the file back as it was read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Annotated, Any, cast

import torch
from pydantic import ConfigDict, Strict, TypeAdapter, ValidationError, with_config
from typing_extensions import NotRequired, TypedDict

from ..config import DEMO_MODEL, DEMO_NAME, LIMITS, VERSION
from ..errors import GraphFileError, InputError
from ..nodes import Kind, Node

if TYPE_CHECKING:
    from .graph import Graph, GraphNode

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
QKTRACE, CIRCUIT_TRACER, NEURONPEDIA = "qktrace", "circuit-tracer", "neuronpedia"

# -- the JSON, declared once (mypy checks the writer against it, pydantic validates what is read) ---------


class QKTracingResults(TypedDict):
    """Neuronpedia's per-node QK tracing: [q_id, k_id, value], [q_id, value], [k_id, value]."""

    pair_wise_contributors: list[Annotated[tuple[str, str, float], Strict(False)]]  # JSON arrays as tuples
    top_q_marginal_contributors: list[Annotated[tuple[str, float], Strict(False)]]
    top_k_marginal_contributors: list[Annotated[tuple[str, float], Strict(False)]]


class QKTracingHead(TypedDict):
    """qktrace's: the head whose QK attribution qk_tracing_results holds, at (query_pos, key_pos)."""

    layer: int
    head: int
    query_pos: int
    key_pos: int
    score: float  # the head's pre-softmax score there (sum of every term)
    pattern: float  # its attention weight


class NodeJSON(TypedDict):
    node_id: str
    feature: int | None
    layer: str | int
    ctx_idx: int
    feature_type: str
    jsNodeId: str
    clerp: NotRequired[str]  # required by Neuronpedia's schema; circuit-tracer's default is ""
    token_prob: NotRequired[float]
    is_target_logit: NotRequired[bool]
    run_idx: NotRequired[int]
    reverse_ctx_idx: NotRequired[int]
    influence: NotRequired[float | None]
    activation: NotRequired[float | None]
    raw_influence: NotRequired[float | None]
    qk_tracing_results: NotRequired[QKTracingResults]
    qk_tracing_head: NotRequired[QKTracingHead]


class QKOnlyNodeJSON(TypedDict):
    node_id: str
    feature: int | None
    layer: str | int
    ctx_idx: int
    feature_type: str
    jsNodeId: str
    clerp: str
    activation: NotRequired[float | None]


class HeadLoadingJSON(TypedDict):
    layer: int
    head: int
    direct: float
    via_mlp: float


class LinkJSON(TypedDict):
    source: str
    target: str
    weight: float
    influence: NotRequired[float]
    head_loadings: NotRequired[list[HeadLoadingJSON] | None]
    qk_top_terms: NotRequired[list[dict[str, Any]] | None]  # per top head: QK terms at (target, source)


class QKTraceMeta(TypedDict):
    format_version: int
    model: str
    n_layers: int
    tokens: list[int]
    replacement: float
    completeness: float
    settings: NotRequired[dict[str, Any] | None]
    neuronpedia_ids: NotRequired[dict[str, str]]  # checkpoint -> the SAE's Neuronpedia id


class FeatureDetails(TypedDict, total=False):
    neuronpedia_source_set: str
    neuronpedia_lorsa_source_set: str
    feature_json_base_url: str


class MetadataJSON(TypedDict):
    slug: str
    scan: str
    prompt_tokens: list[str]
    prompt: str
    transcoder_list: NotRequired[list[str]]
    node_threshold: NotRequired[float | None]
    schema_version: NotRequired[int | None]
    feature_details: NotRequired[FeatureDetails]
    info: NotRequired[dict[str, Any]]
    generation_settings: NotRequired[dict[str, Any]]
    pruning_settings: NotRequired[dict[str, Any]]
    qktrace: NotRequired[QKTraceMeta]


class QParamsJSON(TypedDict, total=False):
    pinnedIds: list[str] | str
    supernodes: list[list[str]]
    linkType: str
    clickedId: str
    sg_pos: str


@with_config(ConfigDict(strict=True))  # JSON types as they are: no "2" for 2, no 1.0 for an index
class GraphJSON(TypedDict):
    metadata: MetadataJSON
    qParams: NotRequired[QParamsJSON]  # required by both frontends' writers; Neuronpedia's CRM writes {}
    nodes: list[NodeJSON]
    links: list[LinkJSON]
    qk_only_nodes: NotRequired[dict[str, QKOnlyNodeJSON]]


_GRAPH = TypeAdapter(GraphJSON)

# -- node numbering ---------------------------------------------------------------------------------------

FEATURE_TYPE = {
    Kind.TOKEN: "embedding",
    Kind.FEATURE: "cross layer transcoder",
    Kind.LOGIT: "logit",
    Kind.ERROR: "mlp reconstruction error",
    Kind.SAE_BIAS: "bias",
    Kind.ATTN_BIAS: "bias",
    Kind.MLP_BIAS: "bias",
    Kind.HEAD_BIAS: "bias",
}
FEATURE_NUMBER = {Kind.ERROR: -1, Kind.SAE_BIAS: -2, Kind.ATTN_BIAS: -3, Kind.MLP_BIAS: -4, Kind.HEAD_BIAS: -5}


def cantor(layer: int, index: int) -> int:
    """circuit-tracer's and Neuronpedia's one number for (layer, feature index)."""
    return (layer + index) * (layer + index + 1) // 2 + index


def uncantor(value: int) -> tuple[int, int]:
    """(layer, index) of a Cantor number."""
    w = (math.isqrt(8 * value + 1) - 1) // 2
    index = value - w * (w + 1) // 2
    return w - index, index


def node_json(node: Node, label: str, n_layers: int, offset: int = 0) -> NodeJSON:
    """The frontend fields of one node; `offset` shifts checkpoints to the SAEs' Neuronpedia layers."""
    if node.kind is Kind.TOKEN:
        layer, feature = "E", node.pos
    elif node.kind is Kind.LOGIT:
        layer, feature = str(n_layers + 1 + offset), node.index
    elif node.kind is Kind.FEATURE:
        layer, feature = str(node.checkpoint + offset), cantor(node.checkpoint + offset, node.index)
    else:
        layer, feature = str(node.checkpoint + offset), FEATURE_NUMBER[node.kind]
    return {
        "node_id": node.id,
        "feature": feature,
        "layer": layer,
        "ctx_idx": node.pos,
        "feature_type": FEATURE_TYPE[node.kind],
        "jsNodeId": node.id,
        "clerp": label,
    }


# -- slug and scan --------------------------------------------------------------------------------------

SAFE = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
NEURONPEDIA_MODELS = {  # the last part of a hub id or folder name, lower case -> Neuronpedia model id
    "gpt2": "gpt2-small",
    "gpt2-small": "gpt2-small",
    "gemma-2-2b": "gemma-2-2b",
    "gemma-2-9b": "gemma-2-9b",
    "llama-3.1-8b": "llama3.1-8b",
    "meta-llama-3.1-8b": "llama3.1-8b",
    "llama3.1-8b": "llama3.1-8b",
    "qwen3-4b": "qwen3-4b",
    "qwen3-1.7b": "qwen3-1.7b",
    "pythia-70m-deduped": "pythia-70m-deduped",
}
DEMO_SCAN = "qktrace-demo"  # the embedded demo model is no Neuronpedia model


def check_name(value: str, what: str) -> str:
    """`value` if it is a safe slug or scan ([a-zA-Z0-9_.-], 1-200 characters), else one-line InputError."""
    if not isinstance(value, str) or not SAFE.match(value):
        raise InputError(
            f"{what} {str(value)[:60]!r} may hold only letters, digits, '_', '.' and '-' (Neuronpedia's rule, "
            f"at most 200): e.g. 'aunt-sally-induction'"
        )
    return value


def sanitise(text: str, limit: int = 60) -> str:
    """`text` with every run of other characters replaced by '-', cut to `limit`: a safe name or ''."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-._")[:limit].strip("-._")


def neuronpedia_scan(model_name: str, neuronpedia_ids: Iterable[str] = ()) -> str:
    """The Neuronpedia model id of a graph: the one its SAEs' Neuronpedia ids name, else the model's name
    looked up in `NEURONPEDIA_MODELS`, else the model's name made safe."""
    models = {i.split("/", 1)[0] for i in neuronpedia_ids if "/" in i}
    if len(models) == 1:
        (only,) = models
        if SAFE.match(only):
            return only
    name = str(model_name).rstrip("/\\")
    if name in (DEMO_NAME, str(DEMO_MODEL)):
        return DEMO_SCAN
    last = re.split(r"[/\\]", name)[-1].lower()
    return NEURONPEDIA_MODELS.get(last) or sanitise(last) or "model"


def graph_slug(
    prompt: str, model_name: str, tokens: Iterable[int], settings: Mapping[str, Any], targets: Iterable[str] = ()
) -> str:
    """The prompt's first words (letters and digits joined by '-') and a short hash of the model, tokens,
    settings and logit targets: 'i-always-loved-visiting-aunt-sally-1f3a9c2e'."""
    key = json.dumps([model_name, list(tokens), dict(settings), sorted(targets)], sort_keys=True, default=str)
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    text = re.sub(r"<[^<>\s]{1,40}>", " ", prompt)  # special tokens such as <bos> or <|endoftext|> say nothing
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48].strip("-") or "graph"
    return f"{words}-{digest}"


def default_slug(graph: Graph) -> str:
    """`graph_slug` of a graph: its prompt, model, tokens, settings and logit nodes."""
    logits = [n.id for n in graph.nodes if n.node.kind is Kind.LOGIT]
    return graph_slug(graph.prompt, graph.model_name, graph.tokens, graph.settings, logits)


def neuronpedia_source_set(neuronpedia_ids: Mapping[int, str]) -> tuple[str, int] | None:
    """(source set, layer offset) when every SAE is in one Neuronpedia source set and its layer number is
    the checkpoint plus one offset for all of them ('gpt2-small/8-res-jb' at checkpoint 8: ('res-jb', 0));
    else None."""
    found = set()
    for c, np_id in neuronpedia_ids.items():
        m = re.match(r"^[^/]+/(\d+)-([A-Za-z0-9_.-]+)$", np_id or "")
        if m is None:
            return None
        found.add((m[2], int(m[1]) - c))
    return found.pop() if len(found) == 1 else None


# -- writing --------------------------------------------------------------------------------------------


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
    n_layers = graph.n_layers
    shift = _source_set(graph)
    offset = shift[1] if shift else 0
    ids = [n.id for n in graph.nodes]
    nodes = [_graph_node_json(n, n_layers, offset) for n in graph.nodes]
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
    settings = dict(graph.settings)
    ours: QKTraceMeta = {
        "format_version": FORMAT_VERSION,
        "model": graph.model_name,
        "n_layers": n_layers,
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
    meta["qktrace"] = ours
    qparams: QParamsJSON = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    out: GraphJSON = {"metadata": meta, "qParams": qparams, "nodes": nodes, "links": links}
    if graph.qk_only:
        known = set(ids)
        only: dict[str, QKOnlyNodeJSON] = {}
        for cid, extra in sorted(graph.qk_only.items()):
            if cid in known:
                continue
            n = node_json(Node.parse(cid), extra.label, n_layers, offset)
            only[cid] = {**n, "clerp": extra.label, "activation": _finite(extra.activation)}  # type: ignore[typeddict-item]
        if only:
            out["qk_only_nodes"] = only
    return out


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


# -- reading --------------------------------------------------------------------------------------------


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


def validate(data: Mapping[str, Any]) -> GraphJSON:
    """The file checked against the declaration above; GraphFileError naming the first bad field."""
    try:
        return _GRAPH.validate_python(data)
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


def from_json(data: Mapping[str, Any]) -> Graph:
    """A `Graph` from any graph file `origin` knows."""
    kind = origin(data)
    if kind == QKTRACE:
        meta = data["metadata"]
        version = meta["qktrace"].get("format_version") if isinstance(meta["qktrace"], Mapping) else None
        if version not in (1, FORMAT_VERSION):
            raise GraphFileError(
                f"format_version {str(version)[:20]} is not supported (this qktrace reads 1 and {FORMAT_VERSION}): "
                "rebuild the graph with this version"
            )
    checked = validate(data)
    return _ours(checked) if kind == QKTRACE else _theirs(checked, data, kind)


def _ours(data: GraphJSON) -> Graph:
    from .graph import Graph, GraphNode, QKContributor, QKTracing

    meta = data["metadata"]
    ours = meta["qktrace"]  # type: ignore[typeddict-item]
    v2 = ours["format_version"] == FORMAT_VERSION
    n_layers = _bounded_int(ours["n_layers"], 1, LIMITS.max_layers, "metadata.qktrace.n_layers")
    tokens = tuple(_bounded_int(t, 0, 2**31 - 1, "a token id") for t in ours["tokens"])
    nodes, tracing = [], {}
    for i, n in enumerate(data["nodes"]):
        node = Node.parse(n["node_id"])
        if not (0 <= node.pos < len(tokens) and 0 <= node.checkpoint <= n_layers):
            raise GraphFileError(f"node {node.id} lies outside the graph's {len(tokens)} tokens and {n_layers} layers")
        label = n.get("clerp", "")
        head = n.get("qk_tracing_head")
        results = n.get("qk_tracing_results")
        if v2 and head is not None and results is not None:
            label = label.removesuffix(qk_suffix(head))
            tracing[i] = QKTracing(
                head["layer"], head["head"], head["query_pos"], head["key_pos"], head["score"], head["pattern"],
                pairs=tuple((q, k, float(v)) for q, k, v in results["pair_wise_contributors"]),
                query=tuple((c, float(v)) for c, v in results["top_q_marginal_contributors"]),
                key=tuple((c, float(v)) for c, v in results["top_k_marginal_contributors"]),
            )  # fmt: skip
        nodes.append(
            GraphNode(
                node=node,
                activation=n.get("activation"),
                influence=float(n.get("raw_influence") or 0.0),
                cumulative=float(n.get("influence") or 0.0),
                label=label,
                token_prob=float(n.get("token_prob", 0.0)),
                is_target_logit=bool(n.get("is_target_logit", False)),
            )
        )
    index = {n.id: i for i, n in enumerate(nodes)}
    if len(index) != len(nodes):
        raise GraphFileError("two nodes share one node_id: write the graph again with Graph.save")
    links = data["links"]
    settings = dict(ours.get("settings") or {})
    top = max((len(link.get("head_loadings") or []) for link in links), default=0)
    top = max(top, _bounded_int(settings.get("top_heads") or 0, 0, LIMITS.max_heads_per_layer, "settings.top_heads"))
    n_links, pad = len(links), [(-1, 0.0, 0.0)] * top
    layer, rows = [-1] * n_links, []  # per link: its layer, and (head, direct, via_mlp) padded to `top`
    max_head = LIMITS.max_heads_per_layer - 1
    for e, link in enumerate(links):
        row = [(h["head"], h["direct"], h["via_mlp"]) for h in link.get("head_loadings") or []]
        for h in link.get("head_loadings") or []:
            layer[e] = _bounded_int(h["layer"], 0, n_layers - 1, "head_loadings layer")
            _bounded_int(h["head"], 0, max_head, "head_loadings head")
        rows.append(row + pad[len(row) :])
    cpu = torch.device("cpu")  # a Graph lives on the CPU
    table = torch.tensor(rows, dtype=torch.float64, device=cpu).reshape(n_links, top, 3)
    heads = table[..., 0].long()
    direct, via = table[..., 1].float(), table[..., 2].float()
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
    return Graph(
        nodes=tuple(nodes),
        source=torch.tensor([s for s, _ in ends], dtype=torch.long, device=cpu),
        target=torch.tensor([t for _, t in ends], dtype=torch.long, device=cpu),
        weight=torch.tensor([link["weight"] for link in links], device=cpu),
        influence=torch.tensor([link.get("influence", 0.0) for link in links], device=cpu),
        head_layer=torch.tensor(layer, dtype=torch.long, device=cpu),
        heads=heads,
        direct=direct,
        via_mlp=via,
        tokens=tokens,
        str_tokens=tuple(meta["prompt_tokens"]),
        prompt=meta["prompt"],
        model_name=ours["model"],
        n_layers=n_layers,
        replacement=ours["replacement"],
        completeness=ours["completeness"],
        settings=settings,
        qk_terms={e: terms for e, link in enumerate(links) if (terms := link.get("qk_top_terms"))},
        qk_tracing=tracing,
        qk_only=only,
        slug=meta["slug"] if v2 else "",
        scan=meta["scan"] if v2 else "",
        sources=sources,
    )


def _foreign_node(n: NodeJSON, n_layers: int, cantor_paired: bool) -> Node:
    """Where another tool's node sits in qktrace's terms: its kind, layer (as a checkpoint), position, index."""
    ftype, pos = n["feature_type"], n["ctx_idx"]
    feature = n.get("feature")
    layer = _layer_number(n["layer"])
    if ftype == "embedding":
        return Node(Kind.TOKEN, 0, pos, -1)
    if ftype == "logit":
        return Node(Kind.LOGIT, n_layers, pos, feature if isinstance(feature, int) else -1)
    if "error" in ftype:
        return Node(Kind.ERROR, layer or 0, pos)
    if ftype in ("bias", "unknown"):
        return Node(Kind.SAE_BIAS, layer or 0, pos)
    index = feature if isinstance(feature, int) and feature >= 0 else -1
    if cantor_paired and index >= 0 and uncantor(index)[0] == layer:
        index = uncantor(index)[1]
    return Node(Kind.FEATURE, layer or 0, pos, index)


def _layer_number(value: str | int) -> int | None:
    text = str(value)
    return int(text) if text.isdigit() else None


def _theirs(data: GraphJSON, raw: Mapping[str, Any], kind: str) -> Graph:
    """Another tool's graph: nodes keep their ids; no head loadings, no QK terms, no token ids."""
    from .graph import Graph, GraphNode

    meta = data["metadata"]
    str_tokens = tuple(meta["prompt_tokens"])
    inner = [_layer_number(n["layer"]) for n in data["nodes"] if n["feature_type"] not in ("embedding", "logit")]
    logits = [_layer_number(n["layer"]) for n in data["nodes"] if n["feature_type"] == "logit"]
    # circuit-tracer puts logits at n_layers + 1, Neuronpedia's CRM converter at n_layers: the larger bound
    n_layers = max([x + 1 for x in inner if x is not None] + [x - 1 for x in logits if x is not None] + [1])
    n_layers = _bounded_int(n_layers, 1, LIMITS.max_layers, "the file's number of layers")
    cantor_paired = meta.get("schema_version") == 1
    nodes = []
    for n in data["nodes"]:
        if not 0 <= n["ctx_idx"] < len(str_tokens):
            raise GraphFileError(
                f"node {n['node_id'][:80]} has ctx_idx {n['ctx_idx']}, outside the {len(str_tokens)} tokens"
            )
        nodes.append(
            GraphNode(
                node=_foreign_node(n, n_layers, cantor_paired),
                activation=n.get("activation"),
                influence=0.0,
                cumulative=float(n.get("influence") or 0.0),
                label=n.get("clerp", ""),
                token_prob=float(n.get("token_prob", 0.0)),
                is_target_logit=bool(n.get("is_target_logit", False)),
                source_id=n["node_id"],
            )
        )
    index = {n.id: i for i, n in enumerate(nodes)}
    if len(index) != len(nodes):
        raise GraphFileError("two nodes share one node_id: is the file complete?")
    kept = [link for link in data["links"] if link["source"] in index and link["target"] in index]
    if len(kept) < len(data["links"]):  # as both frontends do
        log.warning("%d links name nodes that are not in the file: skipped", len(data["links"]) - len(kept))
    n_links, cpu = len(kept), torch.device("cpu")
    return Graph(
        nodes=tuple(nodes),
        source=torch.tensor([index[link["source"]] for link in kept], dtype=torch.long, device=cpu),
        target=torch.tensor([index[link["target"]] for link in kept], dtype=torch.long, device=cpu),
        weight=torch.tensor([link["weight"] for link in kept], device=cpu),
        influence=torch.zeros(n_links, device=cpu),
        head_layer=torch.full((n_links,), -1, dtype=torch.long, device=cpu),
        heads=torch.zeros(n_links, 0, dtype=torch.long, device=cpu),
        direct=torch.zeros(n_links, 0, device=cpu),
        via_mlp=torch.zeros(n_links, 0, device=cpu),
        tokens=(),
        str_tokens=str_tokens,
        prompt=meta["prompt"],
        model_name=meta["scan"],
        n_layers=n_layers,
        replacement=math.nan,
        completeness=math.nan,
        settings={},
        slug=meta["slug"],
        scan=meta["scan"],
        origin=kind,
        raw=raw,
    )
