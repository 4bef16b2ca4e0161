"""`build_transcoder_graph`: the plain transcoder graph as a pruned `Graph`, scored as circuit-tracer scores it.

1. Attribute (`replacement.transcoder_graph`): the unpruned adjacency [node, node] of the traced prompt
   (features, MLP errors, tokens, logits in circuit-tracer's order).
2. Blocks (`layered_blocks`): the adjacency read as `prune`'s layered blocks (row chunks gathered per
   pass, no copy of the adjacency held), from the logits down:
   logits <- every other node; then, for each layer from the top, that layer's features <- what is
   written below them (features read at earlier layers, earlier layers' MLP errors, tokens). A feature
   at layer l reads the MLP input of l, which only earlier MLPs write (a cross-layer transcoder's too),
   so every node's influence is final before its own block is read. (The checkpointed graph,
   `strategy2_graph`, adds each layer's attention-SAE features below its transcoder features: they read
   what earlier layers wrote, and the layer's transcoder features read them.)
3. Prune and score (`prune.prune`): influence from the logits weighted by their probabilities,
   `node_threshold` / `edge_threshold` covers, `max_nodes` features at most, and the replacement and
   completeness scores (circuit-tracer's `prune_graph` and `compute_graph_scores`).
4. Assemble (`assemble.graph_from_pruned`): a `Graph` like any other, without head loadings (edges of a
   plain transcoder graph cross any number of attention layers; none splits over one layer's heads).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from ..models.model import Model
from ..models.trace import Trace
from ..nodes import CODE, Kind, Node
from ..options import GraphOptions, with_overrides
from ..saes.attention import AttentionSAESet
from ..saes.transcoder import TranscoderSet
from .assemble import NodeRows, graph_from_pruned
from .blocks import Block, BlockStore, memory_budget
from .build import logit_targets
from .graph import Graph
from .prune import Pruned, prune
from .replacement import encode, node_table, sites, transcoder_graph

log = logging.getLogger(__name__)
PRUNE_CHUNK_BYTES = 64 << 20  # pruning's blocks held, and one chunk's temporaries, at about this many bytes each
PRUNE_CELLS = 3 * PRUNE_CHUNK_BYTES // 4  # numbers pruning holds at most besides the adjacency (`graph_bytes`)


def node_rows(
    nodes: Sequence[Node], adjacency: Tensor, features: Sequence[tuple[int, Tensor]], logit_tokens: Tensor,
    logit_probs: Tensor, last_logits: Tensor,
) -> NodeRows:  # fmt: skip
    """Step 1's nodes as `assemble`'s columns: kind code, layer (tokens 0, logits n_layers), pos, index,
    activation (features their activation: `features` holds (first column, activations) per run of feature
    columns; logits their value; NaN elsewhere), logit weight."""
    dev = adjacency.device
    col = lambda f: torch.tensor([f(n) for n in nodes], dtype=torch.long, device=dev)  # noqa: E731
    kinds, layers = kinds_layers(nodes, dev)
    pos, index = col(lambda n: n.pos), col(lambda n: n.index)
    acts = torch.full((len(nodes),), float("nan"), device=dev)
    for first, act in features:
        acts[first : first + len(act)] = act.to(acts)
    n_logit = len(logit_tokens)
    acts[len(nodes) - n_logit :] = last_logits[logit_tokens.to(last_logits.device)].to(acts)
    weights = torch.zeros(len(nodes), dtype=adjacency.dtype, device=dev)
    weights[len(nodes) - n_logit :] = logit_probs.to(weights)
    return kinds, layers, pos, index, acts, weights


def kinds_layers(nodes: Sequence[Node], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Each node's kind code and layer (tokens 0, logits n_layers) [node]."""
    col = lambda f: torch.tensor([f(n) for n in nodes], dtype=torch.long, device=device)  # noqa: E731
    return col(lambda n: CODE[n.kind]), col(lambda n: n.checkpoint)


def block_index(kinds: Tensor, layers: Tensor, n_layers: int) -> list[tuple[Tensor, Tensor]]:
    """Step 2's (targets, sources) node indices: logits <- every other node, then from the top layer down:
    that layer's transcoder features <- what is written below them (earlier MLPs, attention up to their
    own layer, tokens), then that layer's attention-SAE features <- what earlier layers and the tokens wrote
    (a checkpointed graph's: none in a plain one)."""
    logits = (kinds == CODE[Kind.LOGIT]).nonzero().squeeze(1)
    out = [(logits, (kinds != CODE[Kind.LOGIT]).nonzero().squeeze(1))]
    is_ = lambda *ks: torch.stack([kinds == CODE[k] for k in ks]).any(0)  # noqa: E731
    mlp, attn, is_tok = is_(Kind.TRANSCODER, Kind.MLP_ERROR), is_(Kind.ATTN_FEATURE, Kind.ATTN_ERROR), is_(Kind.TOKEN)
    for layer in range(n_layers - 1, -1, -1):
        below = (mlp | attn) & (layers < layer)
        for kind, sources in ((Kind.TRANSCODER, below | (attn & (layers == layer))), (Kind.ATTN_FEATURE, below)):
            targets = ((kinds == CODE[kind]) & (layers == layer)).nonzero().squeeze(1)
            if len(targets):
                out.append((targets, (sources | is_tok).nonzero().squeeze(1)))
    return out


def layered_blocks(adjacency: Tensor, kinds: Tensor, layers: Tensor, n_layers: int) -> list[Block]:
    """Step 2: the blocks of `block_index`, read from the adjacency a chunk of rows at a time (`prune_adjacency`
    holds no copy of it: blocks of `PRUNE_CHUNK_BYTES` in all are held, the rest gathered again per pass)."""
    return [Block(t, s, _gather(adjacency, t, s)) for t, s in block_index(kinds, layers, n_layers)]


def _gather(adjacency: Tensor, targets: Tensor, sources: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda r: adjacency[targets[r]][:, sources]


@dataclass(frozen=True)
class MemoryPlan:
    """What a transcoder-based build will hold at its peak, in bytes, counted before its sweep."""

    n_nodes: int
    graph: int  # the adjacency [node, node], pruning's copies of its blocks, the largest block's transients
    work: int  # the sweep's chunk buffers (and strategy 2's head loadings of the kept attention features)

    @property
    def total(self) -> int:
        return self.graph + self.work

    def check(self, what: str, budget: int) -> None:
        """One line (InputError) when the plan does not fit `budget` bytes."""
        if self.total > budget:
            raise InputError(
                f"{what} of {self.n_nodes} nodes needs {_size(self.total)} ({_size(self.graph)} for its adjacency "
                f"[node, node] and pruning's blocks), over the memory budget of {_size(budget)}: raise --max-memory "
                "(GraphOptions.max_memory) or use a shorter prompt"
            )


def _size(n: int) -> str:
    return f"{n / 1e9:.4g} GB" if n >= 1e9 else f"{n / 1e6:.4g} MB"


def graph_bytes(kinds: Tensor, layers: Tensor, n_layers: int, itemsize: int) -> int:
    """Bytes of the adjacency [node, node] plus pruning's: the blocks it holds (all of them in a small graph)
    and the largest chunk's temporaries (the rows it is gathered from; |weights|), at most `PRUNE_CELLS`."""
    n = len(kinds)
    shapes = [(len(t), len(s)) for t, s in block_index(kinds, layers, n_layers)]
    transient = max((t * max(n + s, 2 * s) for t, s in shapes), default=0)
    return itemsize * (n * n + min(sum(t * s for t, s in shapes) + transient, PRUNE_CELLS))


def plain_plan(model: Model, transcoders: TranscoderSet, trace: Trace, ids: Tensor) -> MemoryPlan:
    """The plain graph's `MemoryPlan`, from its nodes (encoding is cheap; the sweep is what costs)."""
    enc = encode(transcoders, sites(model, trace, transcoders))
    nodes = node_table(enc, model.n_layers, trace.tokens, ids)
    size = enc.errors.element_size()
    n, per_source = len(nodes), trace.n_pos * model.anatomy.d_model + len(nodes)
    chunk = min(n, max(16, (16 << 20) // per_source))  # `adjacency_rows`'s sources per chunk
    work = 4 * size * chunk * per_source  # a chunk's residuals and columns, and the attention's temporaries
    return MemoryPlan(n, graph_bytes(*kinds_layers(nodes), model.n_layers, size), work)


def prune_adjacency(
    model: Model, adjacency: Tensor, rows: NodeRows, o: GraphOptions, what: str
) -> tuple[Tensor, Pruned]:
    """Steps 2-3: (logit node indices, the pruned graph) of an unpruned adjacency [node, node] whose nodes
    `rows` describe."""
    blocks = layered_blocks(adjacency, rows[0], rows[1], model.n_layers)
    store = BlockStore(blocks, budget=2 * PRUNE_CHUNK_BYTES)  # chunks' temporaries near PRUNE_CHUNK_BYTES
    pruned = prune(store, rows[0], rows[5], o.node_threshold, o.edge_threshold, o.max_nodes)
    log.info("%s: pruned to %d nodes and %d edges", what, int(pruned.node_mask.sum()), len(pruned.edges.weight))
    return (rows[0] == CODE[Kind.LOGIT]).nonzero().squeeze(1), pruned


def graph_settings(kind: str, transcoders: TranscoderSet, o: GraphOptions, top: int) -> dict[str, object]:
    """What a transcoder-based graph file records of how it was built."""
    return {
        "graph": kind,
        "transcoders": transcoders.kind,
        "node_threshold": o.node_threshold,
        "edge_threshold": o.edge_threshold,
        "max_nodes": o.max_nodes,
        "top_heads": top,
    }


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
    kept at most), max_logits and logit_probability (or `targets`: the logit tokens), max_memory (what the
    adjacency, pruning and the sweep may hold, checked before the sweep: `MemoryPlan`); the residual-SAE
    settings (readout, mode, loadings_per_edge) do not apply."""
    o = with_overrides(options, GraphOptions, overrides)
    ids, _ = logit_targets(model, trace, targets, o)
    with torch.no_grad():
        if transcoders.layers == tuple(range(model.n_layers)):  # else transcoder_graph says which are missing
            plan = plain_plan(model, transcoders, trace, ids)
            plan.check("this transcoder graph", memory_budget(model.device, o.max_memory))
        tg = transcoder_graph(model, transcoders, trace, logit_ids=ids)
        rows = node_rows(tg.nodes, tg.adjacency, [(0, tg.features.act)], tg.logit_tokens, tg.logit_probs,
                         trace.last_logits)  # fmt: skip
        logits, pruned = prune_adjacency(model, tg.adjacency, rows, o, "transcoder graph")
    n = len(pruned.edges.weight)
    dev = pruned.edges.weight.device
    no_heads = (torch.full((n,), -1, dtype=torch.long, device=dev), torch.zeros(n, 0, dtype=torch.long, device=dev),
                torch.zeros(n, 0, device=dev), torch.zeros(n, 0, device=dev))  # fmt: skip
    settings = graph_settings("transcoder", transcoders, o, 0)
    return graph_from_pruned(model, trace, rows, logits, pruned, no_heads, settings, labeller(transcoders))


def labeller(transcoders: TranscoderSet, attention_saes: AttentionSAESet | None = None) -> Callable[[Node], str]:
    """A feature node's label: its transcoder's (or its attention SAE's)."""

    def label(node: Node) -> str:
        if node.kind is Kind.ATTN_FEATURE and attention_saes is not None:
            return attention_saes[node.layer].label(node.index)
        if transcoders.clt is not None:
            return transcoders.clt.label(node.layer, node.index)
        return transcoders[node.layer].label(node.index)

    return label
