"""Where each node kind sits in the graph JSON, the one place: (layer, feature, ctx_idx) per kind, written
(`node_json`) and read back from other tools' files (`foreign_node`).

- layer: the checkpoint as a string (plus the SAEs' Neuronpedia offset); tokens "E"; logits n_layers + 1.
- feature: tokens their position, logits their token id, features Cantor(layer, index) (`cantor`:
  circuit-tracer's and Neuronpedia's schema_version 1), and one negative number per other kind
  (`FEATURE_NUMBER`). Transcoder features and MLP errors are numbered as circuit-tracer numbers them:
  layer = the MLP's layer (no SAE offset), Cantor(layer, index) and -1 ("mlp reconstruction error"; no
  residual-SAE error shares a graph with them). Attention-SAE features (Neuronpedia's "lorsa") sit at their
  attention layer as Cantor(n_layers + layer, index) -- the attention layers counted after the MLP layers,
  so that none shares (layer, feature) with a transcoder feature of its layer, and the number still decodes
  to one (layer, index) -- and attention errors ("lorsa error") at -9.
  Both frontends show a node under (layer, feature, ctx_idx): no two nodes share it.
"""

from __future__ import annotations

import math

from ...nodes import LAYERED_KINDS, TRANSCODER_FEATURE_TYPES, Kind, Node
from .schema import NodeJSON

FEATURE_TYPE = {
    Kind.TOKEN: "embedding",
    Kind.FEATURE: "cross layer transcoder",
    Kind.LOGIT: "logit",
    Kind.ERROR: "mlp reconstruction error",
    Kind.SAE_BIAS: "bias",
    Kind.ATTN_BIAS: "bias",
    Kind.MLP_BIAS: "bias",
    Kind.HEAD_BIAS: "bias",
    **TRANSCODER_FEATURE_TYPES,
    Kind.ATTN_OUT: "attention output",  # QK components of transcoder graphs (qk_only_nodes), never nodes
    Kind.TC_BIAS: "bias",
    Kind.POS_EMBED: "embedding",
    Kind.ATTN_SAE_BIAS: "bias",
}
FEATURE_NUMBER = {
    Kind.ERROR: -1, Kind.SAE_BIAS: -2, Kind.ATTN_BIAS: -3, Kind.MLP_BIAS: -4, Kind.HEAD_BIAS: -5, Kind.MLP_ERROR: -1,
    Kind.ATTN_OUT: -6, Kind.TC_BIAS: -7, Kind.POS_EMBED: -8, Kind.ATTN_ERROR: -9, Kind.ATTN_SAE_BIAS: -10,
}  # fmt: skip


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
    elif node.kind is Kind.TRANSCODER:  # circuit-tracer's numbering: the MLP's layer, Cantor(layer, index)
        layer, feature = str(node.layer), cantor(node.layer, node.index)
    elif node.kind is Kind.ATTN_FEATURE:  # after every MLP layer's numbers: no transcoder feature shares it
        layer, feature = str(node.layer), cantor(n_layers + node.layer, node.index)
    elif node.kind in LAYERED_KINDS:  # MLP and attention errors, QK-only parts of a layer: the layer's number
        layer, feature = str(node.layer), FEATURE_NUMBER[node.kind]
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


def foreign_node(n: NodeJSON, n_layers: int, cantor_paired: bool) -> Node:
    """Where another tool's node sits in qktrace's terms: its kind, layer (as a checkpoint), position, index."""
    ftype, pos = n["feature_type"], n["ctx_idx"]
    feature = n.get("feature")
    layer = layer_number(n["layer"])
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


def layer_number(value: str | int) -> int | None:
    """A file's layer as a number (None for "E" and other names)."""
    text = str(value)
    return int(text) if text.isdigit() else None
