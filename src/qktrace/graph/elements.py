"""What a `Graph` is made of besides tensors: its nodes, the heads that carried an edge, a node's QK
tracing and the QK contributors that are not nodes. Plain records: the graph JSON reader
(`qktrace.graph.formats.read`) builds them, the `Graph` (`qktrace.graph.graph`) holds them."""

from __future__ import annotations

from dataclasses import dataclass

from ..nodes import Node


@dataclass(frozen=True)
class GraphNode:
    node: Node
    activation: float | None  # feature activation, logit value; None for tokens, errors, biases
    influence: float  # influence on the probability-weighted logits
    cumulative: float  # share of all influence held by nodes at least this influential
    label: str
    token_prob: float = 0.0  # logits only
    is_target_logit: bool = False
    source_id: str | None = None  # its id in another tool's file (then `node` only says where it sits)

    @property
    def id(self) -> str:
        return self.node.id if self.source_id is None else self.source_id


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


@dataclass(frozen=True)
class QKTracing:
    """Why a node's carrier head attended where it did: the QK attribution of head (layer, head) from the
    node's position to `key_pos`, the key it carries most of the node's cross-position inputs from.
    Components are node ids at checkpoint `layer` (the head's input); values are terms of `score`."""

    layer: int
    head: int
    query_pos: int
    key_pos: int
    score: float  # the head's pre-softmax score at (query_pos, key_pos): the sum of every term
    pattern: float  # its attention weight there
    pairs: tuple[tuple[str, str, float], ...]  # (query component, key component, term), largest |term| first
    query: tuple[tuple[str, float], ...]  # query components summed over key components, largest first
    key: tuple[tuple[str, float], ...]  # key components summed over query components


@dataclass(frozen=True)
class QKContributor:
    """A QK component that is not a node of the graph: its label and activation (None for non-features)."""

    label: str
    activation: float | None
