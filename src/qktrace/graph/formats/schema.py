"""The graph JSON declared once: mypy checks the writer against these declarations, pydantic validates
what is read with them (`read.validate`). What each field means: `qktrace.graph.formats`."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import ConfigDict, Strict, TypeAdapter, with_config
from typing_extensions import NotRequired, TypedDict

FORMAT_VERSION = 2
QKTRACE, CIRCUIT_TRACER, NEURONPEDIA = "qktrace", "circuit-tracer", "neuronpedia"


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


class PlacedJSON(TypedDict):
    """Where both frontends show a node: (layer, feature, ctx_idx) (`numbering`), its type and its ids."""

    node_id: str
    feature: int | None
    layer: str | int
    ctx_idx: int
    feature_type: str
    jsNodeId: str


class NodeJSON(PlacedJSON):
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


class QKOnlyNodeJSON(PlacedJSON):
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
    replacement_score: NotRequired[float]  # Neuronpedia shows these when present (else it computes its own)
    completeness_score: NotRequired[float]
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


GRAPH_ADAPTER = TypeAdapter(GraphJSON)
