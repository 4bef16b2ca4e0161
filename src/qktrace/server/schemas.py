"""The one contract between the server and the page: every request and response, versioned.

Every response object carries `"version": 1` (`API_VERSION`); the page refuses any other. Errors are
`{"version": 1, "error": "<one line>"}` with a 4xx status (5xx only for bugs). Numbers are plain JSON
floats, so what the page shows is exactly what `Traced.qk(...)` computed.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, StrictStr, model_validator

from ..config import LIMITS
from ..options import GraphOptions, QKOptions, SweepOptions, doc

API_VERSION = 1

# integers are taken as JSON integers only (no "1", no true, no 1.5) and bounded, so that no later
# conversion can overflow; what they index is checked against the model by the library
Int = Annotated[int, Strict(), Field(ge=-(2**31), le=2**31 - 1)]
TokenId = Annotated[int, Strict(), Field(ge=0, le=2**31 - 1)]
Fraction = Annotated[float, Strict(), Field(gt=0, le=1, allow_inf_nan=False)]

# every default is the settings class's own (`qktrace.options`), as the CLI's and the page's are
GRAPH, SWEEP, QK = GraphOptions(), SweepOptions(), QKOptions()
_SCALES: str | list[float] = SWEEP.scales if isinstance(SWEEP.scales, str) else list(SWEEP.scales)


class Versioned(BaseModel):
    version: Literal[1] = 1  # API_VERSION


class ErrorResponse(Versioned):
    error: str


# -- requests ---------------------------------------------------------------------------------------


class PromptRequest(BaseModel):
    """A prompt as text (tokenized by the model's tokenizer) or as token ids (e.g. a graph's tokens).
    The server's token limit (`qktrace serve --max-tokens`) is checked on the tokenized prompt."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr | None = Field(None, max_length=LIMITS.max_prompt_chars)
    tokens: list[TokenId] | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> PromptRequest:
        if (self.prompt is None) == (self.tokens is None):
            raise ValueError("give exactly one of 'prompt' (text) or 'tokens' (token ids)")
        return self


class GraphRequest(PromptRequest):
    name: StrictStr | None = Field(
        None, max_length=200, description="file name to save under (default: from the prompt)"
    )
    overwrite: StrictBool = Field(False, description="replace an existing graph of that name (otherwise 409)")
    node_threshold: Fraction = GRAPH.node_threshold
    edge_threshold: Fraction = GRAPH.edge_threshold
    max_nodes: Annotated[int, Strict(), Field(ge=1, le=LIMITS.max_graph_nodes)] | None = GRAPH.max_nodes
    qk_terms: StrictBool = Field(
        GRAPH.qk_terms, description="store the top QK terms of each cross-position link's top heads"
    )
    slug: StrictStr | None = Field(None, max_length=200, description="Neuronpedia name (default: from the prompt)")
    scan: StrictStr | None = Field(None, max_length=200, description="Neuronpedia model id (default: the model's)")


HEATMAP_TOP = 10  # components per side of a QK heatmap


class QKRequest(PromptRequest):
    layer: Int
    head: Int
    query_pos: Int
    key_pos: Int | None = Field(None, description="default: the key the head attends to most")
    rival_pos: Int | None = Field(
        None, description="the key the contrast is taken against (default: the most attended other key)"
    )
    top: Annotated[int, Strict(), Field(ge=1, le=LIMITS.max_top)] = QK.top


class SweepPart(BaseModel):
    """More features steered with the request's own, at the same scale (`steering.requests.SteerPart`)."""

    model_config = ConfigDict(extra="forbid")

    heads: list[tuple[Int, Int]] = Field(description="[[layer, head], ...] of one layer")
    features: list[Int] = Field(description="features of that layer's checkpoint")
    positions: Int | list[Int]
    side: Literal["query", "key"] | None = Field(None, description="default: the request's side")


class SweepRequest(PromptRequest):
    """Checked by `qktrace.steering.requests` (the CLI's checks): list lengths, repeats, ranges, scales."""

    heads: list[tuple[Int, Int]] = Field(
        default_factory=list, description="[[layer, head], ...] of one layer; empty: steer the residual"
    )
    side: Literal["query", "key"] = SWEEP.side
    checkpoint: Int | None = Field(None, description="the feature's checkpoint (default: the heads' layer)")
    feature: Int
    positions: Int | list[Int]
    scales: Annotated[str, Field(max_length=200)] | list[Annotated[float, Strict()]] = Field(
        _SCALES, description=doc(SweepOptions, "scales")
    )
    mode: Literal["scale", "value"] = Field(SWEEP.mode, description="activation becomes scale * a, or the value itself")
    freeze_others: StrictBool = SWEEP.freeze_others
    watch_tokens: list[StrictStr | TokenId] = Field(default_factory=list)
    watch_attention: list[tuple[Int, Int, Int, Int]] = Field(default_factory=list)
    top_k: Annotated[int, Strict(), Field(ge=1, le=20)] = SWEEP.top_k
    also: list[SweepPart] = Field(
        default_factory=list, description="more feature sets steered at the same scale (a mechanism's parts)"
    )
    kind: Literal["feature", "transcoder", "attn"] | None = Field(
        None,
        description="a residual-SAE, transcoder or attention-SAE feature (default: transcoder when only transcoders "
        "are loaded)",
    )
    feature_layer: Int | None = Field(
        None, description="a transcoder or attention feature steered in heads' QK circuits: its layer (below theirs)"
    )


# -- responses --------------------------------------------------------------------------------------


class Defaults(BaseModel):
    """What a form shows before the user types: the defaults of `qktrace.options`, so the page, the CLI and
    the API agree (the page reads them from GET /api/info instead of keeping its own)."""

    sweep: dict[str, Any] = Field(default_factory=lambda: dataclasses.asdict(SWEEP))
    graph: dict[str, Any] = Field(default_factory=lambda: dataclasses.asdict(GRAPH))
    qk: dict[str, Any] = Field(default_factory=lambda: dataclasses.asdict(QK))


class AttentionSAEInfo(BaseModel):
    layer: int
    site: str = Field(description='"z" (hook_z: the heads before W_O) or "attn_out" (the attention output)')
    d_sae: int


class Load(BaseModel):
    active: int = Field(description="requests and jobs that run the model, queued or running")
    limit: int = Field(description="the most that may be queued or running; one more is answered 429")
    cancelled: int = Field(description="stopped because their client disconnected, since the server started")


class InfoResponse(Versioned):
    model: str | None
    family: str | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    checkpoints: list[int] = Field(default_factory=list, description="checkpoints with an SAE")
    graph: Literal["sae", "transcoder", "checkpointed"] | None = Field(
        default=None, description="the graph the dictionaries build (None: no model, or both SAEs and transcoders)"
    )
    transcoders: list[int] = Field(default_factory=list, description="layers whose MLP input a transcoder reads")
    attention_saes: list[AttentionSAEInfo] = Field(
        default_factory=list, description="attention-output SAEs (strategy-2 checkpoints), one per layer"
    )
    can_compute: bool = Field(description="a model is loaded: graphs, QK and sweeps can be computed")
    features: bool = Field(description="feature labels or dashboards are available")
    coder_features: dict[str, list[int]] = Field(
        default_factory=dict,
        description='layers whose transcoder ("transcoder") or attention-SAE ("attn") features GET '
        "/api/features/{kind}/{layer}/{f} answers",
    )
    defaults: Defaults = Field(default_factory=lambda: Defaults(), description="the settings' defaults, for forms")
    load: Load | None = Field(None, description="the model's line of work (None when view only)")


class GraphSummary(BaseModel):
    name: str
    prompt: str
    model: str
    n_nodes: int
    n_links: int
    tokens: list[str] = Field(
        default_factory=list, description="the prompt's tokens (metadata.prompt_tokens): which graphs align"
    )
    modified: float
    origin: Literal["qktrace", "circuit-tracer", "neuronpedia"] = Field(
        "qktrace", description="the tool that wrote it; only qktrace's graphs have head loadings"
    )


class InvalidGraph(BaseModel):
    name: str
    error: str


class MechanismSummary(BaseModel):
    name: str
    prompt: str
    answer: str
    rival: str | None


class GraphList(Versioned):
    graphs: list[GraphSummary]
    invalid: list[InvalidGraph] = Field(default_factory=list, description="JSON files that are not graphs")
    mechanisms: list[MechanismSummary] = Field(
        default_factory=list, description="`*.mechanism.json` files (`qktrace explain`), opened by GET /api/mechanisms"
    )


class Job(Versioned):
    id: str
    status: Literal["running", "done", "error"]
    stage: str
    elapsed_s: float
    graph: str | None = Field(None, description="the saved graph's name, once done")
    error: str | None = None


class TermPair(BaseModel):
    """One (query component, key component) term of a QK score."""

    query: str
    query_label: str
    key: str
    key_label: str
    key_pos: int
    value: float


class QKTerm(TermPair):
    unrotated: float
    positional: float
    prob_effect: float


class Marginal(BaseModel):
    component: str
    label: str
    value: float


class QKAttributionOut(BaseModel):
    """`QKAttribution.to_json(top)` for one (query, key) pair."""

    layer: int
    head: int
    query_pos: int
    key_positions: list[int]
    score: list[float]
    sum_of_terms: list[float]
    capped_sum: list[float]
    max_relative_error: float
    pattern: list[float]
    terms: list[QKTerm]
    query_marginals: list[Marginal]
    key_marginals: list[Marginal]


class AttentionRow(BaseModel):
    key_positions: list[int]
    pattern: list[float]
    score: list[float]


class ContrastTerm(BaseModel):
    query: str
    query_label: str
    key: str = Field(description="key component without its position: the same feature at both keys nets out")
    key_label: str
    value_a: float
    value_b: float
    diff: float


class Contrast(BaseModel):
    key_a: int
    key_b: int
    score_diff: float = Field(description="score(key_a) - score(key_b), pre-cap: the sum of every term's diff")
    terms: list[ContrastTerm]
    rest: float = Field(0.0, description="the diff of the terms not listed: listed diffs + rest = score_diff")


class Heatmap(BaseModel):
    """`QKAttribution.heatmap`: query rows x key columns of summed terms, the rest in "other"; cells sum to
    the key's pre-cap score."""

    query: list[str]
    query_labels: list[str]
    key: list[str]
    key_labels: list[str]
    values: list[list[float]]
    features_only: bool


class EffectTerm(TermPair):
    """A row of `QKAttribution.effects_frame`: a term and its first-order effect on p(key)."""

    prob_effect: float


class QKResponse(Versioned):
    model: str
    str_tokens: list[str]
    layer: int
    head: int
    query_pos: int
    key_pos: int
    qk: QKAttributionOut
    row: AttentionRow = Field(description="the head's attention over every key the query may see")
    inhibitory: list[EffectTerm] = Field(description="terms that lower p(key) most (most negative prob_effect)")
    contrast: Contrast | None = Field(description="key vs. the rival key; null with one key")
    heatmap: Heatmap = Field(description=f"the key's query x key heatmap, top {HEATMAP_TOP} of each side")
    heatmap_features: Heatmap = Field(description="the same over SAE features only (the rest in 'other')")


class SweepResponse(Versioned):
    columns: list[str]
    rows: list[dict[str, Any]]


class Context(BaseModel):
    tokens: list[str]
    i: int = Field(description="index of the activating token in `tokens`")
    act: float


class Histogram(BaseModel):
    """A feature's activations over the file's fixed bins, from its first to its last non-empty bin; the first
    bin of the file also counts smaller activations and the last larger ones."""

    lo: int = Field(ge=0, description="the first bin's index into the file's hist_edges")
    counts: list[int] = Field(description="how many tokens' activations fell in each bin")
    edges: list[float] = Field(
        default_factory=list, description="len(counts) + 1 bin edges (activation values), from the file's hist_edges"
    )


class Dashboard(BaseModel):
    """A feature's entry of dashboards.json (`qktrace.jobs.dashboards`, version 1); files without bottom
    outputs or histograms (before version 1) read with those empty."""

    freq: float | None = None
    max_act: float | None = None
    top_out: list[str] = Field(default_factory=list)
    bottom_out: list[str] = Field(default_factory=list, description="the output tokens the feature lowers most")
    contexts: list[Context] = Field(default_factory=list)
    hist: Histogram | None = None


class FeatureResponse(Versioned):
    checkpoint: int = Field(description="the residual SAE's checkpoint; a transcoder or attention feature's layer")
    feature: int
    label: str
    dashboard: Dashboard | None
    kind: Literal["feature", "transcoder", "attn"] = Field(
        default="feature", description="the node kind: a residual-SAE feature, a transcoder or attention-SAE feature"
    )
