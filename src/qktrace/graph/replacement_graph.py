"""`build_transcoder_graph`: the plain transcoder graph as a pruned `Graph`, scored as circuit-tracer scores it.

1. Attribute (`replacement.transcoder_graph`): the unpruned adjacency [node, node] of the traced prompt
   (features, MLP errors, tokens, logits in circuit-tracer's order).
2. Blocks (`layered_blocks`): the adjacency cut into `prune`'s layered blocks, from the logits down:
   logits <- every other node; then, for each layer from the top, that layer's features <- what is
   written below them (features read at earlier layers, earlier layers' MLP errors, tokens). A feature
   at layer l reads the MLP input of l, which only earlier MLPs write (a cross-layer transcoder's too),
   so every node's influence is final before its own block is read.
3. Prune and score (`prune.prune`): influence from the logits weighted by their probabilities,
   `node_threshold` / `edge_threshold` covers, `max_nodes` features at most, and the replacement and
   completeness scores (circuit-tracer's `prune_graph` and `compute_graph_scores`).
4. Assemble (`assemble.graph_from_pruned`): a `Graph` like any other, without head loadings (edges of a
   plain transcoder graph cross any number of attention layers; none splits over one layer's heads).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..models.model import Model
from ..models.trace import Trace
from ..nodes import CODE, Kind, Node
from ..options import GraphOptions, with_overrides
from ..saes.transcoder import TranscoderSet
from .assemble import NodeRows, graph_from_pruned
from .blocks import Block, BlockStore
from .build import logit_targets
from .graph import Graph
from .prune import prune
from .replacement import TranscoderGraph, transcoder_graph

log = logging.getLogger(__name__)


def node_rows(tg: TranscoderGraph, last_logits: Tensor) -> NodeRows:
    """Step 1's nodes as `assemble`'s columns: kind code, layer (tokens 0, logits n_layers), pos, index,
    activation (features their activation, logits their value, NaN elsewhere), logit weight."""
    dev = tg.adjacency.device
    nodes = tg.nodes
    col = lambda f: torch.tensor([f(n) for n in nodes], dtype=torch.long, device=dev)  # noqa: E731
    kinds, layers = col(lambda n: CODE[n.kind]), col(lambda n: n.checkpoint)  # a layer for features, errors
    pos, index = col(lambda n: n.pos), col(lambda n: n.index)
    acts = torch.full((len(nodes),), float("nan"), device=dev)
    acts[: tg.n_features] = tg.features.act.to(acts)
    n_logit = len(tg.logit_tokens)
    acts[len(nodes) - n_logit :] = last_logits[tg.logit_tokens.to(last_logits.device)].to(acts)
    weights = torch.zeros(len(nodes), dtype=tg.adjacency.dtype, device=dev)
    weights[len(nodes) - n_logit :] = tg.logit_probs.to(weights)
    return kinds, layers, pos, index, acts, weights


def layered_blocks(tg: TranscoderGraph, kinds: Tensor, layers: Tensor, n_layers: int) -> list[Block]:
    """Step 2: logits <- every other node, then each layer's features <- the nodes written below them."""
    logits = (kinds == CODE[Kind.LOGIT]).nonzero().squeeze(1)
    others = (kinds != CODE[Kind.LOGIT]).nonzero().squeeze(1)
    blocks = [Block.dense(logits, others, tg.adjacency[logits][:, others])]
    is_tc, is_err, is_tok = (kinds == CODE[k] for k in (Kind.TRANSCODER, Kind.MLP_ERROR, Kind.TOKEN))
    for layer in range(n_layers - 1, -1, -1):
        targets = (is_tc & (layers == layer)).nonzero().squeeze(1)
        if len(targets) == 0:
            continue
        sources = (((is_tc | is_err) & (layers < layer)) | is_tok).nonzero().squeeze(1)
        blocks.append(Block.dense(targets, sources, tg.adjacency[targets][:, sources]))
    return blocks


def build_transcoder_graph(
    model: Model,
    transcoders: TranscoderSet,
    trace: Trace,
    options: GraphOptions | None = None,
    *,
    targets: Sequence[str | int] | str | int | None = None,
    **overrides: Any,
) -> Graph:
    """The pruned transcoder attribution graph of `trace` (see the module docstring for the steps).

    `options` (`GraphOptions`, or its fields as keywords): node_threshold, edge_threshold, max_nodes (features
    kept at most), max_logits and logit_probability (or `targets`: the logit tokens); the residual-SAE
    settings (readout, mode, loadings_per_edge, max_memory) do not apply."""
    o = with_overrides(options, GraphOptions, overrides)
    ids, _ = logit_targets(model, trace, targets, o)
    with torch.no_grad():
        tg = transcoder_graph(model, transcoders, trace, logit_ids=ids)
        rows = node_rows(tg, trace.last_logits)
        blocks = layered_blocks(tg, rows[0], rows[1], model.n_layers)
        store = BlockStore(blocks, budget=1 << 62)  # the adjacency is held already: every block is a view of it
        pruned = prune(store, rows[0], rows[5], o.node_threshold, o.edge_threshold, o.max_nodes)
    log.info("transcoder graph: pruned to %d nodes and %d edges", int(pruned.node_mask.sum()), len(pruned.edges.weight))
    n = len(pruned.edges.weight)
    dev = pruned.edges.weight.device
    no_heads = (torch.full((n,), -1, dtype=torch.long, device=dev), torch.zeros(n, 0, dtype=torch.long, device=dev),
                torch.zeros(n, 0, device=dev), torch.zeros(n, 0, device=dev))  # fmt: skip
    logits = (rows[0] == CODE[Kind.LOGIT]).nonzero().squeeze(1)
    settings: dict[str, object] = {
        "graph": "transcoder",
        "transcoders": transcoders.kind,
        "node_threshold": o.node_threshold,
        "edge_threshold": o.edge_threshold,
        "max_nodes": o.max_nodes,
        "top_heads": 0,
    }
    return graph_from_pruned(model, trace, rows, logits, pruned, no_heads, settings, _labeller(transcoders))


def _labeller(transcoders: TranscoderSet) -> Callable[[Node], str]:
    def label(node: Node) -> str:
        if transcoders.clt is not None:
            return transcoders.clt.label(node.layer, node.index)
        return transcoders[node.layer].label(node.index)

    return label
