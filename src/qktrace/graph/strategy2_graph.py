"""`build_checkpointed_graph`: strategy 2 (transcoders + attention-output SAEs) as a pruned `Graph` whose
edges into attention-SAE features carry their head loadings.

1. Attribute (`strategy2.checkpointed_graph`, `by_head=False`): the unpruned adjacency [node, node] of the
   traced prompt (transcoder features, MLP errors, attention features, attention errors, tokens, logits),
   without the head axis (it would multiply the attention rows' sweeps, and their memory, by n_heads).
2. Blocks, prune and score (`replacement_graph.prune_adjacency`): the plain transcoder graph's layered
   blocks with each layer's attention features below its transcoder features, circuit-tracer's pruning,
   and the replacement and completeness scores (attention errors count as errors, as MLP errors do).
3. Head loadings (`kept_loadings`): `strategy2.head_loadings` for the kept attention features only, then
   each kept edge into one of them takes its `loadings_per_edge` largest head parts. An edge into an
   attention feature of layer l crosses layer l's attention once, at its frozen pattern, and nothing else
   that splits over heads; its parts are exact and sum to the edge (all of them when `loadings_per_edge` is
   at least n_heads). They are stored as `direct`; `via_mlp` is 0: the MLPs in between are transcoders whose
   features and errors are nodes of their own, so no path into the attention feature runs through one.
   Every other edge runs through the residual stream only: no head loadings (`head_layer` -1).
4. Assemble (`assemble.graph_from_pruned`): a `Graph` like any other.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..models.model import Model
from ..models.trace import Trace
from ..nodes import CODE, Kind
from ..options import GraphOptions, with_overrides
from ..saes.attention import AttentionSAESet
from ..saes.transcoder import TranscoderSet
from .assemble import graph_from_pruned
from .blocks import memory_budget
from .build import logit_targets
from .graph import Graph
from .prune import Pruned
from .replacement import encode, sites
from .replacement_graph import (
    MemoryPlan,
    block_index,
    graph_bytes,
    graph_settings,
    kinds_layers,
    labeller,
    node_rows,
    prune_adjacency,
)
from .strategy2 import (
    CheckpointedGraph,
    attention_inputs,
    check_coverage,
    checkpointed_graph,
    encode_attention,
    head_loadings,
    node_table,
)

log = logging.getLogger(__name__)
ATTN = CODE[Kind.ATTN_FEATURE]


def kept_loadings(model: Model, cg: CheckpointedGraph, pruned: Pruned, top: int) -> tuple[Tensor, ...]:
    """Step 3: the kept edges' head loadings as columns (layer [edge], heads, direct, via_mlp [edge, top])."""
    e = pruned.edges
    n, dev = len(e.weight), e.weight.device
    layer = torch.full((n,), -1, dtype=torch.long, device=dev)
    heads = torch.full((n, top), -1, dtype=torch.long, device=dev)
    direct, via = torch.zeros(n, top, device=dev), torch.zeros(n, top, device=dev)
    first, att = cg.checkpoints.attn_col, cg.attention_features
    into = ((e.target >= first) & (e.target < first + att.layer.numel())).nonzero().squeeze(1)
    if top == 0 or len(into) == 0:
        return layer, heads, direct, via
    feats = (e.target[into] - first).to(att.layer.device)
    hl = head_loadings(cg.checkpoints, feats.unique())
    log.info("checkpointed graph: head loadings of %d kept edges into %d attention features", len(into),
             len(feats.unique()))  # fmt: skip
    n_nodes = len(cg.nodes)
    keys, order = torch.sort(hl.target.to(dev) * n_nodes + hl.source.to(dev))
    want = e.target[into] * n_nodes + e.source[into]
    at = torch.searchsorted(keys, want).clamp(max=max(len(keys) - 1, 0))
    parts = hl.parts.to(dev).new_zeros(len(into), hl.parts.shape[1])  # [kept edge, head], zero-padded
    found = (keys[at] == want) if len(keys) else torch.zeros_like(want, dtype=torch.bool)
    parts[found] = hl.parts.to(dev)[order[at[found]]]  # not found: a zero edge kept at threshold 1 (no parts)
    best = torch.topk(parts.abs(), min(top, parts.shape[1]), dim=1).indices  # largest first
    n_heads = torch.tensor([ly.n_heads for ly in model.anatomy.layers], device=dev)[att.layer.to(dev)[feats]]
    real = (best < n_heads[:, None]) & found[:, None]  # padding heads of a narrower layer, zero edges: none
    w = best.shape[1]
    heads[into, :w] = torch.where(real, best, -1)
    direct[into, :w] = torch.where(real, parts.gather(1, best), 0).to(direct)
    layer[into] = att.layer.to(dev)[feats]
    return layer, heads, direct, via


def checkpointed_plan(
    model: Model, transcoders: TranscoderSet, attention_saes: AttentionSAESet, trace: Trace, ids: Tensor,
    o: GraphOptions, top: int, batch_size: int = 256,
) -> MemoryPlan:  # fmt: skip
    """The checkpointed graph's `MemoryPlan`, from its nodes (encoding is cheap; the sweep is what costs):
    the graph's adjacency and blocks; the sweep's rows [batch, node] and the attention rows' per-head
    cotangents [batch, head, pos, d_model]; with head loadings (`top` > 0), those of every edge into the
    attention features pruning may keep (at most `max_nodes`), [edge, head] plus two indices each."""
    check_coverage(model, transcoders, attention_saes)
    an = model.anatomy
    enc = encode(transcoders, sites(model, trace, transcoders))
    att = encode_attention(attention_saes, attention_inputs(an, trace, attention_saes))
    nodes = node_table(enc, att, model.n_layers, trace.tokens, ids)
    size, n, heads = enc.errors.element_size(), len(nodes), max(ly.n_heads for ly in an.layers)
    work = 2 * size * batch_size * (n + (heads + 1) * trace.n_pos * an.d_model)  # and their temporaries
    kinds, layers = kinds_layers(nodes)
    if top > 0:  # every edge into a kept attention feature: at most its block's sources
        into = [(len(t), len(s)) for t, s in block_index(kinds, layers, model.n_layers) if kinds[t[0]] == ATTN]
        kept = min(att.layer.numel(), o.max_nodes or att.layer.numel())
        edges = min(sum(t * s for t, s in into), kept * max((s for _, s in into), default=0))
        work += edges * (heads * size + 16)
    return MemoryPlan(n, graph_bytes(kinds, layers, model.n_layers, size), work)


def build_checkpointed_graph(
    model: Model,
    transcoders: TranscoderSet,
    attention_saes: AttentionSAESet,
    trace: Trace,
    options: GraphOptions | None = None,
    *,
    targets: Sequence[str | int] | str | int | None = None,
    **overrides: Any,
) -> Graph:
    """The pruned strategy-2 graph of `trace` with head loadings on its edges into attention features (see
    the module docstring for the steps).

    `options` (`GraphOptions`, or its fields as keywords): node_threshold, edge_threshold, max_nodes (features
    kept at most, attention features included), max_logits and logit_probability (or `targets`: the logit
    tokens), loadings_per_edge, max_memory (what the adjacency, pruning, the sweep and the head loadings may
    hold, checked before the sweep: `checkpointed_plan`); the residual-SAE settings (readout, mode) do not
    apply."""
    o = with_overrides(options, GraphOptions, overrides)
    ids, _ = logit_targets(model, trace, targets, o)
    top = max(0, min(o.loadings_per_edge, model.n_heads))
    with torch.no_grad():
        plan = checkpointed_plan(model, transcoders, attention_saes, trace, ids, o, top)
        plan.check("this checkpointed graph", memory_budget(model.device, o.max_memory))
        cg = checkpointed_graph(model, transcoders, attention_saes, trace, logit_ids=ids, by_head=False)
        feats = [(0, cg.transcoder_features.act), (cg.checkpoints.attn_col, cg.attention_features.act)]
        rows = node_rows(cg.nodes, cg.adjacency, feats, cg.logit_tokens, cg.logit_probs, trace.last_logits)
        logits, pruned = prune_adjacency(model, cg.adjacency, rows, o, "checkpointed graph")
        edge_cols = kept_loadings(model, cg, pruned, top)
    settings = graph_settings("checkpointed", transcoders, o, top)
    settings["attention_saes"] = ",".join(attention_saes[layer].site for layer in attention_saes)
    label = labeller(transcoders, attention_saes)
    return graph_from_pruned(model, trace, rows, logits, pruned, edge_cols, settings, label)
