"""The one contract between the server and the page: every request and response, versioned.

Every response object carries `"version": 1` (`API_VERSION`); the page refuses any other. Errors are
`{"version": 1, "error": "<one line>"}` with a 4xx status (5xx only for bugs). Numbers are plain JSON
floats, so what the page shows is exactly what `Traced.qk(...)` computed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import GRAPH, QK

API_VERSION = 1


class Versioned(BaseModel):
    version: Literal[1] = 1  # API_VERSION


class ErrorResponse(Versioned):
    error: str


# -- requests ---------------------------------------------------------------------------------------


class PromptRequest(BaseModel):
    """A prompt as text (tokenized by the model's tokenizer) or as token ids (e.g. a graph's tokens)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, max_length=20_000)
    tokens: list[int] | None = Field(None, max_length=4096)

    @model_validator(mode="after")
    def _one_prompt(self) -> PromptRequest:
        if (self.prompt is None) == (self.tokens is None):
            raise ValueError("give exactly one of 'prompt' (text) or 'tokens' (token ids)")
        return self


class GraphRequest(PromptRequest):
    name: str | None = Field(None, description="file name to save under (default: from the prompt)")
    node_threshold: float = Field(GRAPH.node_threshold, gt=0, le=1)
    edge_threshold: float = Field(GRAPH.edge_threshold, gt=0, le=1)
    max_nodes: int | None = Field(GRAPH.max_nodes, ge=1)
    qk_terms: bool = Field(True, description="store the top QK terms of each cross-position link's top heads")


class QKRequest(PromptRequest):
    layer: int
    head: int
    query_pos: int
    key_pos: int | None = Field(None, description="default: the key the head attends to most")
    top: int = Field(QK.top, ge=1, le=500)


class SweepRequest(PromptRequest):
    heads: list[tuple[int, int]] = Field(
        default_factory=list, description="[[layer, head], ...] of one layer; empty: steer the residual"
    )
    side: Literal["query", "key"] = "key"
    checkpoint: int | None = Field(None, description="the feature's checkpoint (default: the heads' layer)")
    feature: int
    positions: int | list[int]
    scales: str | list[float] = "0:2:5"
    mode: Literal["scale", "value"] = Field("scale", description="activation becomes scale * a, or the value itself")
    freeze_others: bool = False
    watch_tokens: list[str | int] = Field(default_factory=list, max_length=20)
    watch_attention: list[tuple[int, int, int, int]] = Field(default_factory=list, max_length=20)
    top_k: int = Field(5, ge=1, le=20)


# -- responses --------------------------------------------------------------------------------------


class InfoResponse(Versioned):
    model: str | None
    family: str | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    checkpoints: list[int] = Field(default_factory=list, description="checkpoints with an SAE")
    can_compute: bool = Field(description="a model is loaded: graphs, QK and sweeps can be computed")
    features: bool = Field(description="feature labels or dashboards are available")


class GraphSummary(BaseModel):
    name: str
    prompt: str
    model: str
    n_nodes: int
    n_links: int
    modified: float


class InvalidGraph(BaseModel):
    name: str
    error: str


class GraphList(Versioned):
    graphs: list[GraphSummary]
    invalid: list[InvalidGraph] = Field(default_factory=list, description="JSON files that are not qktrace graphs")


class Job(Versioned):
    id: str
    status: Literal["running", "done", "error"]
    stage: str
    elapsed_s: float
    graph: str | None = Field(None, description="the saved graph's name, once done")
    error: str | None = None


class QKTerm(BaseModel):
    query: str
    query_label: str
    key: str
    key_label: str
    key_pos: int
    value: float
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
    score_diff: float
    terms: list[ContrastTerm]


class QKResponse(Versioned):
    model: str
    str_tokens: list[str]
    layer: int
    head: int
    query_pos: int
    key_pos: int
    qk: QKAttributionOut
    row: AttentionRow = Field(description="the head's attention over every key the query may see")
    inhibitory: list[QKTerm] = Field(description="terms that lower p(key) most (most negative prob_effect)")
    contrast: Contrast | None = Field(description="key vs. the most attended other key; null with one key")


class SweepResponse(Versioned):
    columns: list[str]
    rows: list[dict[str, Any]]


class Context(BaseModel):
    tokens: list[str]
    i: int = Field(description="index of the activating token in `tokens`")
    act: float


class Dashboard(BaseModel):
    freq: float | None = None
    max_act: float | None = None
    top_out: list[str] = Field(default_factory=list)
    contexts: list[Context] = Field(default_factory=list)


class FeatureResponse(Versioned):
    checkpoint: int
    feature: int
    label: str
    dashboard: Dashboard | None
