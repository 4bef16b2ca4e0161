"""Assemble the `Graph` of a build: the kept nodes with their labels, the kept edges with their head
loadings, the prompt, and the scores (step 5 of `build_graph`)."""

from __future__ import annotations

import logging
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


def assemble_graph(
    model: Model, saes: SAESet, trace: Trace, att: Attribution, pruned: Pruned, edge_cols: tuple[Tensor, ...],
    top: int, settings: dict[str, object],
) -> Graph:  # fmt: skip
    keep = pruned.node_mask.nonzero().squeeze(1)
    final = torch.full((len(att.kinds),), -1, dtype=torch.long, device=keep.device)
    final[keep] = torch.arange(len(keep), device=keep.device)
    node_rows = (att.kinds, att.checkpoints, att.pos, att.index, att.acts, pruned.influence, pruned.cumulative)
    nodes = _graph_nodes(model, saes, trace, keep, (*node_rows, att.logit_weights), att.logits)
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
    model: Model, saes: SAESet, trace: Trace, keep: Tensor, rows: tuple[Tensor, ...], logits: Tensor
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
                label=_label(model, saes, trace, node, float(logit_w[i])),
                token_prob=float(logit_w[i]) if node.kind is Kind.LOGIT else 0.0,
                is_target_logit=g == first_logit,
            )
        )
    return tuple(out)


def _label(model: Model, saes: SAESet, trace: Trace, node: Node, prob: float) -> str:
    c, p = node.checkpoint, node.pos
    if node.kind is Kind.FEATURE:
        return saes[c].label(node.index)
    if node.kind is Kind.TOKEN:
        return trace.str_tokens[p]
    if node.kind is Kind.LOGIT:
        return f'Output "{model.str_tokens([node.index])[0]}" (p={prob:.3f})'
    return describe(node)


def _prompt(model: Model, trace: Trace) -> str:
    """The graph's prompt text: every token the model read, special ones included."""
    return model.to_string(trace.tokens, special_tokens=True)
