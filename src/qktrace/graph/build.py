"""`build_graph`: an attribution graph over residual-stream SAE features, with head loadings per edge.

1. Check the SAEs: edges join adjacent checkpoints, so every checkpoint 1..n_layers needs one;
   checkpoint 0 may use the token embeddings instead.
2. Logit targets: the smallest set of top tokens covering 95% probability (at most 10), or the
   tokens named; their probabilities weight the influence.
3. Encode each checkpoint (`SAE.sparse`) and lay out the node table: tokens, and per checkpoint its
   features, error and SAE-bias nodes, and the previous layer's attention- and MLP-bias nodes.
4. Blocks, from the logits down (`edges`): logits <- checkpoint n_layers (read through the final
   norm); checkpoint l+1 features <- checkpoint l and layer l's bias nodes (closed form); checkpoint-0
   features <- tokens. mode="full" defines every block lazily: its rows are computed when a sweep
   reads them, within the memory budget (`blocks.BlockStore`: whole blocks are kept while they fit,
   the rest recomputed a chunk of targets at a time). mode="target" computes edges into the current
   frontier only and keeps the top `max_nodes_per_checkpoint` features by influence before going one
   checkpoint down.
5. Prune and score (`prune`), then split each kept edge over the heads of its layer (`head_loadings`,
   recomputed for the kept edges only), and assemble the `Graph`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor

from ..errors import InputError, SAEMismatchError
from ..models.model import Model
from ..models.trace import Trace
from ..nodes import CODE, Kind, Node, of_code
from ..options import GraphOptions, with_overrides
from ..saes import SAE, FeatureActs, SAESet, require_saes
from . import edges as E
from .assemble import assemble_graph
from .blocks import Block, BlockStore, memory_budget
from .graph import Graph
from .prune import KeptEdges, prune, select_sources

log = logging.getLogger(__name__)
Tick = Callable[[], object]


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """One checkpoint's residual split into parts: features first, then one error and one SAE-bias
    part per position (or, at checkpoint 0 without an SAE, one token part per position). Vectors are
    made on demand, for the rows asked for, so long prompts never hold every feature's vector."""

    nodes: Tensor  # [part] global node indices
    pos: Tensor  # [part] positions
    n_features: int
    sae: SAE | None
    acts: FeatureActs | None
    resid: Tensor  # [pos, d_model] this checkpoint's residual (at checkpoint 0 without an SAE: the token parts)
    readout: str
    attn_bias: Tensor | None  # [pos] node index of the previous layer's attention bias at each position
    mlp_bias: Tensor | None

    def _rows(self, rows: Tensor | None, n: int) -> Tensor:
        return torch.arange(n, device=self.resid.device) if rows is None else rows.to(self.resid.device)

    def parts(self, rows: Tensor | None = None) -> E.Vectors:
        """What the parts `rows` (default all) write."""
        rows = self._rows(rows, len(self.nodes))
        pos = self.pos.to(rows.device)[rows]
        if self.sae is None or self.acts is None:
            return E.Vectors(pos, self.resid[pos])
        n_pos = self.resid.shape[0]
        cdt, dev = self.resid.dtype, self.resid.device
        vec = self.resid.new_empty(len(rows), self.resid.shape[1])
        kind = torch.div(rows - self.n_features, n_pos, rounding_mode="floor").clamp_min(-1)  # -1 f, 0 e, 1 b
        feat = rows[kind < 0]
        w = self.sae.W_dec[self.acts.feature[feat].to(self.sae.W_dec.device)].to(dev, cdt)
        vec[kind < 0] = self.acts.act[feat].to(dev, cdt)[:, None] * w
        vec[kind == 0] = self.acts.error[pos[kind == 0]].to(dev, cdt)
        vec[kind == 1] = self.sae.b_dec.to(dev, cdt)
        return E.Vectors(pos, vec)

    def readouts(self, rows: Tensor | None = None) -> E.Vectors:
        """How the features `rows` (default all; rows < n_features) read the residual."""
        assert self.sae is not None and self.acts is not None
        rows = self._rows(rows, self.n_features)
        sae, cdt, dev = self.sae, self.resid.dtype, self.resid.device
        feat = self.acts.feature[rows].to(sae.W_dec.device)
        act = self.acts.act[rows].to(dev, cdt)[:, None]
        w = sae.W_dec[feat] if self.readout == "decoder" else sae.W_enc[:, feat].T
        return E.Vectors(self.acts.pos[rows].to(dev), act * w.to(dev, cdt))


@dataclass(frozen=True, eq=False)
class LazyParts:
    """Some parts of a checkpoint, their vectors made only when taken (`edges.Sources`)."""

    checkpoint: Checkpoint
    rows: Tensor

    @property
    def pos(self) -> Tensor:
        return self.checkpoint.pos[self.rows.to(self.checkpoint.pos.device)]

    def take(self, idx: Tensor) -> E.Vectors:
        return self.checkpoint.parts(self.rows[idx.to(self.rows.device)])

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True, eq=False)
class LayerInputs:
    """What `head_loadings` needs for the edges of one block that crosses layer `layer`: its targets
    (rows of the upper checkpoint's features) and its first len(source_rows) sources (parts of the
    lower checkpoint; bias columns follow). Vectors are rebuilt on demand."""

    layer: int
    upper: Checkpoint
    target_rows: Tensor
    lower: Checkpoint
    source_rows: Tensor

    @cached_property
    def targets(self) -> E.Vectors:
        return self.upper.readouts(self.target_rows)

    @cached_property
    def sources(self) -> E.Vectors:
        return self.lower.parts(self.source_rows)


class NodeTable:
    """Global node arrays, appended group by group: kind, checkpoint, pos, index, activation."""

    def __init__(self, device: torch.device) -> None:
        self.columns: list[list[Tensor]] = [[], [], [], [], []]
        self.size = 0
        self.device = device

    def add(self, kind: Kind, checkpoint: int, pos: Tensor, index: Tensor | None = None, act: Tensor | None = None):
        n = int(pos.shape[0])
        full = lambda v: torch.full((n,), v, dtype=torch.long, device=self.device)  # noqa: E731
        idx = full(-1) if index is None else index.long().to(self.device)
        for store, col in zip(self.columns, (full(CODE[kind]), full(checkpoint), pos.long().to(self.device), idx)):
            store.append(col)
        nan = torch.full((n,), float("nan"), device=self.device)
        self.columns[4].append(nan if act is None else act.float().to(self.device))
        out = torch.arange(self.size, self.size + n, device=self.device)
        self.size += n
        return out

    def arrays(self) -> tuple[Tensor, ...]:
        return tuple(torch.cat(c) for c in self.columns)


def _check_saes(model: Model, saes: SAESet) -> None:
    L = model.n_layers
    require_saes(saes, range(1, L + 1), f"; graphs need one at every checkpoint 1..{L} (0 may use token embeddings)")
    for c in saes.checkpoints:
        if c > L:
            raise SAEMismatchError(f"SAE at checkpoint {c} is past the model's last checkpoint {L}: drop it")


def logit_targets(
    model: Model, trace: Trace, targets: Sequence[str | int] | str | int | None, options: GraphOptions | None = None
) -> tuple[Tensor, Tensor]:
    """(token ids, probabilities) of the logit nodes at the last position: `targets`, or the fewest top tokens
    covering `options.logit_probability` (at most `options.max_logits`); each target is one token
    (`Model.to_single_token`), a target named twice counts once."""
    o = options or GraphOptions()
    probs = torch.softmax(trace.last_logits.float(), -1)
    dev = probs.device
    if targets is None:
        p, ids = torch.sort(probs, descending=True)
        goal = torch.tensor([o.logit_probability], dtype=p.dtype, device=dev)
        n = int(torch.searchsorted(torch.cumsum(p, 0), goal)) + 1
        ids = ids[: min(n, o.max_logits)]
    else:
        if isinstance(targets, (str, int)):
            targets = [targets]
        chosen = [model.to_single_token(t, "target") for t in targets]
        if not chosen:
            raise InputError("targets is empty: name at least one token, or pass None for the top tokens")
        ids = torch.tensor(list(dict.fromkeys(chosen)), dtype=torch.long, device=dev)
    return ids, probs[ids]


def _checkpoints(
    model: Model, saes: SAESet, trace: Trace, table: NodeTable, readout: str
) -> tuple[Tensor, list[Checkpoint]]:
    """(token node indices, one Checkpoint per checkpoint 0..n_layers), adding every node to the table."""
    P, dev = trace.n_pos, table.device
    positions = torch.arange(P, device=dev)
    tokens = table.add(Kind.TOKEN, 0, positions, trace.tokens)
    out = []
    for c in range(model.n_layers + 1):
        ab = table.add(Kind.ATTN_BIAS, c, positions) if c > 0 else None
        mb = table.add(Kind.MLP_BIAS, c, positions) if c > 0 else None
        sae: SAE | None = saes.get(c)
        resid = trace.resid[c]
        if sae is None:  # checkpoint 0 without an SAE: the token embeddings are the parts
            out.append(Checkpoint(tokens, positions, 0, None, None, resid, readout, ab, mb))
            continue
        acts = sae.sparse(resid)
        feats = table.add(Kind.FEATURE, c, acts.pos, acts.feature, acts.act)
        errs = table.add(Kind.ERROR, c, positions)
        bias = table.add(Kind.SAE_BIAS, c, positions)
        nodes, pos = torch.cat([feats, errs, bias]), torch.cat([acts.pos.to(dev), positions, positions])
        out.append(Checkpoint(nodes, pos, len(acts.pos), sae, acts, resid, readout, ab, mb))
    return tokens, out


def _tokens(trace: Trace) -> E.Vectors:
    return E.Vectors(torch.arange(trace.n_pos, device=trace.resid[0].device), trace.resid[0])


def _same_position(targets: Tensor, readouts: E.Vectors, sources: Tensor, parts: E.Vectors) -> Block:
    """Edges of an identity step (tokens -> checkpoint-0 features, checkpoint n_layers -> logits)."""
    parts = parts.to(readouts.vec.device)
    same = readouts.pos[:, None] == parts.pos[None, :]
    return Block.dense(targets, sources, (readouts.vec @ parts.vec.T) * same)


def _with_bias_columns(edges: E.LayerEdges, pos: Tensor, n_pos: int) -> Tensor:
    """The closed-form edges, then one column per bias node of the target checkpoint: [tgt, src + 2 pos]."""
    bias = edges.weight.new_zeros(len(pos), 2 * n_pos)
    rows = torch.arange(len(pos), device=bias.device)
    pos = pos.to(bias.device)
    bias[rows, pos] = edges.attn_bias
    bias[rows, n_pos + pos] = edges.mlp_bias
    return torch.cat([edges.weight, bias], 1)


def _bias_sources(src_nodes: Tensor, top: Checkpoint) -> Tensor:
    assert top.attn_bias is not None and top.mlp_bias is not None
    return torch.cat([src_nodes, top.attn_bias, top.mlp_bias])


Layered = tuple[list[Block], dict[int, LayerInputs]]  # blocks from the logits down; block -> head inputs


def _full(model: Model, trace: Trace, tokens: Tensor, cps: list[Checkpoint], logits: Tensor, lr: E.Vectors) -> Layered:
    """Every block, defined lazily: a block's rows are computed when a sweep reads them."""
    an, L = model.anatomy, model.n_layers
    blocks = [_same_position(logits, lr, cps[L].nodes, cps[L].parts())]
    inputs: dict[int, LayerInputs] = {}
    for layer in reversed(range(L)):
        hi, lo = cps[layer + 1], cps[layer]

        def rows(r: Tensor, layer: int = layer, hi: Checkpoint = hi, lo: Checkpoint = lo) -> Tensor:
            targets = hi.readouts(r)
            edges = E.layer_edges(an, trace, layer, targets, lo.parts())
            return _with_bias_columns(edges, targets.pos, trace.n_pos)

        every = torch.arange(hi.n_features, device=hi.resid.device)
        all_parts = torch.arange(len(lo.nodes), device=lo.resid.device)
        inputs[len(blocks)] = LayerInputs(layer, hi, every, lo, all_parts)
        blocks.append(Block(hi.nodes[: hi.n_features], _bias_sources(lo.nodes, hi), rows))
    c0 = cps[0]
    if c0.sae is not None:
        blocks.append(_same_position(c0.nodes[: c0.n_features], c0.readouts(), tokens, _tokens(trace)))
    return blocks, inputs


def _target(
    model: Model, trace: Trace, tokens: Tensor, cps: list[Checkpoint], logits: Tensor, lr: E.Vectors,
    weights: Tensor, kinds: Tensor, k: int, tick: Tick,
) -> Layered:  # fmt: skip
    """Target-driven expansion. `weights` [node] holds the logit weights; influence is added as found."""
    an, L = model.anatomy, model.n_layers
    top = cps[L]
    at_last = (top.pos == trace.n_pos - 1).nonzero().squeeze(1)

    def expand(block: Block, n_parts: int, n_features: int, rows: Tensor) -> tuple[Block, Tensor, Tensor]:
        w = block.weight
        dev = w.device
        keep, contrib = select_sources(w, weights[block.targets].to(dev), kinds[block.sources].to(dev), k)
        weights.index_add_(0, block.sources, contrib.to(weights))
        kept_parts = keep[:n_parts].nonzero().squeeze(1).to(rows.device)
        frontier = rows[kept_parts][rows[kept_parts] < n_features]
        keep = keep.to(block.sources.device)
        return Block.dense(block.targets, block.sources[keep], w[:, keep.to(dev)]), kept_parts, frontier

    first = _same_position(logits, lr, top.nodes[at_last], top.parts(at_last))
    block, _, frontier = expand(first, len(at_last), top.n_features, at_last)
    blocks, inputs = [block], {}
    for layer in reversed(range(L)):
        hi, lo = cps[layer + 1], cps[layer]
        targets = hi.readouts(frontier)
        reach = (lo.pos <= int(targets.pos.max())).nonzero().squeeze(1) if len(frontier) else frontier
        edges = E.layer_edges_by_position(an, trace, layer, targets, LazyParts(lo, reach))
        weight = _with_bias_columns(edges, targets.pos, trace.n_pos)
        full = Block.dense(
            hi.nodes[frontier.to(hi.nodes.device)], _bias_sources(lo.nodes[reach.to(lo.nodes.device)], hi), weight
        )
        block, kept_parts, next_frontier = expand(full, len(reach), lo.n_features, reach)
        inputs[len(blocks)] = LayerInputs(layer, hi, frontier, lo, reach[kept_parts])
        blocks.append(block)
        frontier = next_frontier
        tick()
    c0 = cps[0]
    if c0.sae is not None:
        blocks.append(_same_position(c0.nodes[frontier], c0.readouts(frontier), tokens, _tokens(trace)))
    return blocks, inputs


@dataclass(frozen=True, eq=False)
class Attribution:
    """The unpruned layered graph: node arrays, blocks from the logits down, logit weights."""

    kinds: Tensor  # [node] nodes.CODE
    checkpoints: Tensor  # [node]
    pos: Tensor  # [node]
    index: Tensor  # [node] feature or token id, -1 otherwise
    acts: Tensor  # [node] activation (NaN where none)
    logit_weights: Tensor  # [node] probability on logit nodes, 0 elsewhere
    logits: Tensor  # [logit] node indices of the logit nodes
    store: BlockStore
    inputs: dict[int, LayerInputs]  # block index -> what its head loadings need

    @property
    def blocks(self) -> list[Block]:
        return self.store.blocks

    def node(self, i: int) -> Node:
        return of_code(int(self.kinds[i]), int(self.checkpoints[i]), int(self.pos[i]), int(self.index[i]))


def attribute(
    model: Model,
    saes: SAESet,
    trace: Trace,
    options: GraphOptions | None = None,
    *,
    targets: Sequence[str | int] | str | int | None = None,
    tick: Tick = lambda: None,
    **overrides: Any,
) -> Attribution:
    """Steps 1-4: every edge (mode="full", computed lazily within `max_memory` bytes, default a share of
    the device's free memory) or the target-driven subset (mode="target"), unpruned. `options` (or its
    fields as keywords): readout, mode, max_nodes_per_checkpoint, max_memory, the logit targets."""
    o = with_overrides(options, GraphOptions, overrides)
    readout, mode, max_memory = o.readout, o.mode, o.max_memory
    _check_saes(model, saes)
    budget = memory_budget(model.device, max_memory)
    with torch.no_grad():
        table = NodeTable(model.device)
        tokens, cps = _checkpoints(model, saes, trace, table, readout)
        ids, probs = logit_targets(model, trace, targets, o)
        last = torch.full_like(ids, trace.n_pos - 1)
        logits = table.add(Kind.LOGIT, model.n_layers, last, ids, trace.last_logits[ids])
        kinds, checkpoints, pos, index, acts = table.arrays()
        logit_w = torch.zeros(table.size, dtype=trace.resid[0].dtype, device=kinds.device)
        logit_w[logits] = probs.to(logit_w)
        lr = E.logit_readouts(model.anatomy, trace, ids)
        if mode == "full":
            blocks, inputs = _full(model, trace, tokens, cps, logits, lr)
        else:
            k = o.max_nodes_per_checkpoint
            blocks, inputs = _target(model, trace, tokens, cps, logits, lr, logit_w.clone(), kinds, k, tick)
    return Attribution(kinds, checkpoints, pos, index, acts, logit_w, logits, BlockStore(blocks, budget), inputs)


def build_graph(
    model: Model,
    saes: SAESet | Mapping[int, SAE],
    trace: Trace,
    options: GraphOptions | None = None,
    *,
    targets: Sequence[str | int] | str | int | None = None,
    progress: bool = True,
    **overrides: Any,
) -> Graph:
    """The attribution graph of `trace` from its logits down to its tokens, with head loadings.

    `options`: the settings (`qktrace.options.GraphOptions`: thresholds, node cap, readout, mode, head
    loadings per edge, memory budget), or any of its fields as keywords (`max_nodes=50`), which replace
    the options' own. `targets`: logit tokens (strings or ids; default the top tokens covering
    `logit_probability`, at most `max_logits`). Blocks that do not fit `max_memory` are recomputed in
    chunks of targets, with the same edges.
    """
    o = with_overrides(options, GraphOptions, overrides)
    saes = saes if isinstance(saes, SAESet) else SAESet(saes)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with torch.no_grad(), Progress(*columns, transient=True, disable=not progress) as bar:
        task = bar.add_task("edges, layer by layer", total=model.n_layers if o.mode == "target" else None)
        att = attribute(model, saes, trace, o, targets=targets, tick=lambda: bar.advance(task))
        bar.update(task, description="influence and pruning (3 sweeps)")
        pruned = prune(att.store, att.kinds, att.logit_weights, o.node_threshold, o.edge_threshold, o.max_nodes)
        task = bar.add_task("head loadings", total=len(att.blocks))
        top = max(0, min(o.loadings_per_edge, model.n_heads))
        edge_cols = _kept_edges(model, trace, att, pruned.edges, top, lambda: bar.advance(task))
    n_edges = pruned.edges.weight.numel()  # logged once the progress bar is gone, one line per phase
    log.info("graph: %d nodes, %d logits, %d blocks (%s)", len(att.kinds), len(att.logits), len(att.blocks), o.mode)
    log.info("graph: pruned to %d nodes and %d edges", int(pruned.node_mask.sum()), n_edges)
    log.info("graph: head loadings of %d edges, %d heads each at most", n_edges, top)
    if att.store.recomputed:
        log.info(
            "graph: %d target rows recomputed to stay within %.1f GB", att.store.recomputed, att.store.budget / 1e9
        )
    return assemble_graph(model, saes, trace, att, pruned, edge_cols, {
        "readout": o.readout,
        "mode": o.mode,
        "node_threshold": o.node_threshold,
        "edge_threshold": o.edge_threshold,
        "max_nodes": o.max_nodes,
        "max_nodes_per_checkpoint": o.max_nodes_per_checkpoint if o.mode == "target" else None,
        "top_heads": top,  # loadings_per_edge, under the name graph files have always used
    })  # fmt: skip


def _kept_edges(
    model: Model, trace: Trace, att: Attribution, kept: KeptEdges, top: int, tick: Tick
) -> tuple[Tensor, ...]:
    """Head loadings of the kept edges as columns (layer, heads, direct, via_mlp), in the edges' order."""
    n, dev = len(kept.block), kept.block.device
    layer = torch.full((n,), -1, dtype=torch.long, device=dev)
    heads = torch.full((n, top), -1, dtype=torch.long, device=dev)
    direct = torch.zeros(n, top, device=dev)
    via = torch.zeros(n, top, device=dev)
    for b in range(len(att.blocks)):
        info: LayerInputs | None = att.inputs.get(b)
        tick()
        if info is None or not top:
            continue
        here = ((kept.block == b) & (kept.col < len(info.source_rows))).nonzero().squeeze(1)
        if not len(here):
            continue
        t_uniq, t_of = torch.unique(kept.row[here], return_inverse=True)
        s_uniq, s_of = torch.unique(kept.col[here], return_inverse=True)
        targets = info.upper.readouts(info.target_rows[t_uniq.to(info.target_rows.device)])
        g = E.mlp_pullback(model.anatomy, trace, info.layer, targets)[1]
        sources = info.lower.parts(info.source_rows[s_uniq.to(info.source_rows.device)])
        d, v = E.head_loadings(model.anatomy, trace, info.layer, targets, g, sources, (t_of, s_of))
        order = torch.topk((d + v).abs(), min(top, d.shape[1]), dim=1).indices  # sorted, largest first
        width = order.shape[1]
        heads[here, :width] = order.to(dev)
        direct[here, :width] = d.gather(1, order).to(dev, direct.dtype)
        via[here, :width] = v.gather(1, order).to(dev, via.dtype)
        layer[here] = info.layer
    return layer, heads, direct, via
