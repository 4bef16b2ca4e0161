"""Assemble the `Graph` of a build: the kept nodes with their labels, the kept edges with their head
loadings, the prompt, and the scores (step 5 of `build_graph`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..models.model import Model
from ..models.trace import Trace
from ..nodes import Kind, Node, describe, of_code
from ..saes import SAESet
from .graph import Graph, GraphNode
from .prune import Pruned

if TYPE_CHECKING:
    from .build import Attribution

log = logging.getLogger(__name__)


FeatureLabel = Callable[[Node], str]  # a feature node's label (its SAE's or transcoder's)
NodeRows = tuple[Tensor, ...]  # [node] each: kind code, checkpoint (or layer), pos, index, activation, logit weight


def assemble_graph(
    model: Model, saes: SAESet, trace: Trace, att: Attribution, pruned: Pruned, edge_cols: tuple[Tensor, ...],
    settings: dict[str, object],
) -> Graph:  # fmt: skip
    rows = (att.kinds, att.checkpoints, att.pos, att.index, att.acts, att.logit_weights)
    label = lambda node: saes[node.checkpoint].label(node.index)  # noqa: E731
    return graph_from_pruned(model, trace, rows, att.logits, pruned, edge_cols, settings, label)


def graph_from_pruned(
    model: Model, trace: Trace, rows: NodeRows, logits: Tensor, pruned: Pruned, edge_cols: tuple[Tensor, ...],
    settings: dict[str, object], feature_label: FeatureLabel,
) -> Graph:  # fmt: skip
    """The `Graph` of a pruned build: `rows` describe every node of the unpruned graph, `edge_cols` are the
    kept edges' head loadings (layer [edge], heads, direct, via_mlp [edge, top]; top may be 0)."""
    keep = pruned.node_mask.nonzero().squeeze(1)
    final = torch.full((len(rows[0]),), -1, dtype=torch.long, device=keep.device)
    final[keep] = torch.arange(len(keep), device=keep.device)
    kinds, checkpoints, pos, index, acts, logit_w = rows
    node_rows = (kinds, checkpoints, pos, index, acts, pruned.influence, pruned.cumulative, logit_w)
    nodes = _graph_nodes(model, trace, keep, node_rows, logits, feature_label)
    e = pruned.edges
    layer, heads, direct, via = edge_cols
    cpu = lambda t: t.detach().to("cpu")  # noqa: E731
    f32 = lambda t: t.detach().to("cpu", torch.float32)  # noqa: E731
    graph = Graph(
        nodes=nodes,
        source=cpu(final[e.source]),
        target=cpu(final[e.target]),
        weight=f32(e.weight),
        influence=f32(e.score),
        head_layer=cpu(layer),
        heads=cpu(heads),
        direct=f32(direct),
        via_mlp=f32(via),
        tokens=tuple(int(t) for t in trace.tokens),
        str_tokens=trace.str_tokens,
        prompt=_prompt(model, trace),
        model_name=model.name,
        n_layers=model.n_layers,
        replacement=pruned.replacement,
        completeness=pruned.completeness,
        settings=settings,
    )
    log.info("graph: %s", graph.summary_text())
    return graph


def _graph_nodes(
    model: Model, trace: Trace, keep: Tensor, rows: tuple[Tensor, ...], logits: Tensor, feature_label: FeatureLabel
) -> tuple[GraphNode, ...]:
    kinds, checkpoints, pos, index, acts, infl, cum, logit_w = (r[keep].tolist() for r in rows)
    first_logit = int(logits[0]) if len(logits) else -1
    out = []
    for i, g in enumerate(keep.tolist()):
        node = of_code(kinds[i], checkpoints[i], pos[i], index[i])
        act = acts[i] if acts[i] == acts[i] else None  # NaN: no activation
        out.append(
            GraphNode(
                node=node,
                activation=act,
                influence=float(infl[i]),
                cumulative=float(cum[i]),
                label=_label(model, trace, node, float(logit_w[i]), feature_label),
                token_prob=float(logit_w[i]) if node.kind is Kind.LOGIT else 0.0,
                is_target_logit=g == first_logit,
            )
        )
    return tuple(out)


def _label(model: Model, trace: Trace, node: Node, prob: float, feature_label: FeatureLabel) -> str:
    if node.kind in (Kind.FEATURE, Kind.TRANSCODER, Kind.ATTN_FEATURE):
        return feature_label(node)
    if node.kind is Kind.TOKEN:
        return trace.str_tokens[node.pos]
    if node.kind is Kind.LOGIT:
        return f'Output "{model.str_tokens([node.index])[0]}" (p={prob:.3f})'
    return describe(node)


def _prompt(model: Model, trace: Trace) -> str:
    """The graph's prompt text: every token the model read, special ones included."""
    return model.to_string(trace.tokens, special_tokens=True)
