"""`build_graph`: an attribution graph over residual-stream SAE features, with head loadings per edge.

1. Check the SAEs: edges join adjacent checkpoints, so every checkpoint 1..n_layers needs one;
   checkpoint 0 may use the token embeddings instead.
2. Logit targets: the smallest set of top tokens covering 95% probability (at most 10), or the
   tokens named; their probabilities weight the influence.
3. Encode each checkpoint (`SAE.sparse`) and lay out the node table: tokens, and per checkpoint its
   features, error and SAE-bias nodes, and the previous layer's attention- and MLP-bias nodes.
4. Blocks, from the logits down (`edges`): logits <- checkpoint n_layers (read through the final
   norm); checkpoint l+1 features <- checkpoint l and layer l's bias nodes (closed form); checkpoint-0
   features <- tokens. mode="target" computes edges into the current frontier only and keeps the top
   `max_nodes_per_checkpoint` features by influence before going one checkpoint down.
5. Prune and score (`prune`), then split each kept edge over the heads of its layer (`head_loadings`,
   recomputed for the kept edges only), and assemble the `Graph`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor

from ..config import GRAPH
from ..errors import InputError, OutOfRangeError, SAEMismatchError
from ..models.model import Model, Trace
from ..nodes import Kind, Node
from ..saes import SAE, FeatureActs, SAESet
from . import edges as E
from .graph import Graph, GraphNode
from .prune import KIND_CODE, Block, Pruned, graph_scores, prune, select_sources

log = logging.getLogger(__name__)
KINDS = list(Kind)
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
    embeddings: Tensor  # [pos, d_model] checkpoint-0 residual (the token parts when sae is None)
    readout: str
    attn_bias: Tensor | None  # [pos] node index of the previous layer's attention bias at each position
    mlp_bias: Tensor | None

    def parts(self, rows: Tensor | None = None) -> E.Vectors:
        """What the parts `rows` (default all) write."""
        rows = torch.arange(len(self.nodes), device=self.nodes.device) if rows is None else rows
        pos = self.pos[rows]
        if self.sae is None or self.acts is None:
            return E.Vectors(pos, self.embeddings[pos])
        n_pos = self.embeddings.shape[0]
        vec = self.embeddings.new_empty(len(rows), self.embeddings.shape[1])
        kind = torch.div(rows - self.n_features, n_pos, rounding_mode="floor").clamp_min(-1)  # -1 f, 0 e, 1 b
        feat = rows[kind < 0]
        vec[kind < 0] = (self.acts.act[feat, None] * self.sae.W_dec[self.acts.feature[feat]]).to(vec.dtype)
        vec[kind == 0] = self.acts.error[pos[kind == 0]].to(vec.dtype)
        vec[kind == 1] = self.sae.b_dec.to(vec.dtype)
        return E.Vectors(pos, vec)

    def readouts(self, rows: Tensor | None = None) -> E.Vectors:
        """How the features `rows` (default all; rows < n_features) read the residual."""
        assert self.sae is not None and self.acts is not None
        rows = torch.arange(self.n_features, device=self.nodes.device) if rows is None else rows
        feat, act = self.acts.feature[rows], self.acts.act[rows, None]
        sae = self.sae
        vec = act * (sae.W_dec[feat] if self.readout == "decoder" else sae.W_enc[:, feat].T)
        return E.Vectors(self.acts.pos[rows], vec.to(self.embeddings.dtype))


@dataclass(frozen=True, eq=False)
class LayerInputs:
    """What `head_loadings` needs for the edges of one block that crosses layer `layer`."""

    layer: int
    targets: E.Vectors
    mlp_readout: Tensor
    sources: E.Vectors  # the block's first len(sources) columns; bias columns follow


class NodeTable:
    """Global node arrays, appended group by group: kind, checkpoint, pos, index, activation."""

    def __init__(self, device: torch.device) -> None:
        self.columns: list[list[Tensor]] = [[], [], [], [], []]
        self.size = 0
        self.device = device

    def add(self, kind: Kind, checkpoint: int, pos: Tensor, index: Tensor | None = None, act: Tensor | None = None):
        n = int(pos.shape[0])
        full = lambda v: torch.full((n,), v, dtype=torch.long, device=self.device)  # noqa: E731
        cols = (full(KIND_CODE[kind]), full(checkpoint), pos.long(), full(-1) if index is None else index.long())
        for store, col in zip(self.columns, cols):
            store.append(col)
        self.columns[4].append(torch.full((n,), float("nan"), device=self.device) if act is None else act.float())
        out = torch.arange(self.size, self.size + n, device=self.device)
        self.size += n
        return out

    def arrays(self) -> tuple[Tensor, ...]:
        return tuple(torch.cat(c) for c in self.columns)


def _check_saes(model: Model, saes: SAESet) -> None:
    L = model.n_layers
    missing = [c for c in range(1, L + 1) if c not in saes]
    if missing:
        raise SAEMismatchError(
            f"graphs need an SAE at every checkpoint 1..{L} (checkpoint 0 may use token embeddings); "
            f"missing: {', '.join(map(str, missing))}: load residual SAEs for them"
        )
    for c in saes.checkpoints:
        if c > L:
            raise SAEMismatchError(f"SAE at checkpoint {c} is past the model's last checkpoint {L}: drop it")


def logit_targets(model: Model, trace: Trace, targets: Sequence[str | int] | str | int | None) -> tuple[Tensor, Tensor]:
    """(token ids, probabilities) of the logit nodes at the last position."""
    probs = torch.softmax(trace.logits[-1].float(), -1)
    if targets is None:
        p, ids = torch.sort(probs, descending=True)
        n = int(torch.searchsorted(torch.cumsum(p, 0), torch.tensor([GRAPH.logit_probability]))) + 1
        ids = ids[: min(n, GRAPH.max_logits)]
    else:
        if isinstance(targets, (str, int)):
            targets = [targets]
        chosen = [model.token_id(t) if isinstance(t, str) else int(t) for t in targets]
        if not chosen:
            raise InputError("targets is empty: name at least one token, or pass None for the top tokens")
        vocab = probs.shape[0]
        for t in chosen:
            if not 0 <= t < vocab:
                raise OutOfRangeError(f"target token id {t} is out of range: valid ids are 0..{vocab - 1}")
        ids = torch.tensor(list(dict.fromkeys(chosen)), dtype=torch.long, device=probs.device)
    return ids.to(trace.tokens.device), probs[ids]


def _checkpoints(
    model: Model, saes: SAESet, trace: Trace, table: NodeTable, readout: str
) -> tuple[Tensor, list[Checkpoint]]:
    """(token node indices, one Checkpoint per checkpoint 0..n_layers), adding every node to the table."""
    P, dev = trace.n_pos, trace.tokens.device
    positions = torch.arange(P, device=dev)
    tokens = table.add(Kind.TOKEN, 0, positions, trace.tokens)
    out = []
    for c in range(model.n_layers + 1):
        ab = table.add(Kind.ATTN_BIAS, c, positions) if c > 0 else None
        mb = table.add(Kind.MLP_BIAS, c, positions) if c > 0 else None
        sae: SAE | None = saes.get(c)
        if sae is None:  # checkpoint 0 without an SAE: the token embeddings are the parts
            out.append(Checkpoint(tokens, positions, 0, None, None, trace.resid[0], readout, ab, mb))
            continue
        acts = sae.sparse(trace.resid[c])
        feats = table.add(Kind.FEATURE, c, acts.pos, acts.feature, acts.act)
        errs = table.add(Kind.ERROR, c, positions)
        bias = table.add(Kind.SAE_BIAS, c, positions)
        nodes, pos = torch.cat([feats, errs, bias]), torch.cat([acts.pos, positions, positions])
        out.append(Checkpoint(nodes, pos, len(acts.pos), sae, acts, trace.resid[0], readout, ab, mb))
    return tokens, out


def _tokens(trace: Trace) -> E.Vectors:
    return E.Vectors(torch.arange(trace.n_pos, device=trace.tokens.device), trace.resid[0])


def _same_position_block(targets: Tensor, readouts: E.Vectors, sources: Tensor, parts: E.Vectors) -> Block:
    """Edges of an identity step (tokens -> checkpoint-0 features, checkpoint n_layers -> logits)."""
    same = readouts.pos[:, None] == parts.pos[None, :]
    return Block(targets, sources, (readouts.vec @ parts.vec.T) * same)


def _layer_block(edges: E.LayerEdges, targets: Tensor, pos: Tensor, src_nodes: Tensor, top: Checkpoint) -> Block:
    """The closed-form edges, then one column per bias node of the target checkpoint."""
    assert top.attn_bias is not None and top.mlp_bias is not None
    n_pos = top.attn_bias.shape[0]
    bias = edges.weight.new_zeros(len(targets), 2 * n_pos)
    rows = torch.arange(len(targets), device=bias.device)
    bias[rows, pos] = edges.attn_bias
    bias[rows, n_pos + pos] = edges.mlp_bias
    sources = torch.cat([src_nodes, top.attn_bias, top.mlp_bias])
    return Block(targets, sources, torch.cat([edges.weight, bias], 1))


Layered = tuple[list[Block], dict[int, LayerInputs]]  # blocks from the logits down; block -> head inputs


def _full(
    model: Model, trace: Trace, tokens: Tensor, cps: list[Checkpoint], logits: Tensor, lr: E.Vectors, tick: Tick
) -> Layered:
    an, L = model.anatomy, model.n_layers
    blocks = [_same_position_block(logits, lr, cps[L].nodes, cps[L].parts())]
    inputs: dict[int, LayerInputs] = {}
    for layer in reversed(range(L)):
        hi, lo = cps[layer + 1], cps[layer]
        targets, sources = hi.readouts(), lo.parts()
        edges = E.layer_edges(an, trace, layer, targets, sources)
        inputs[len(blocks)] = LayerInputs(layer, targets, edges.mlp_readout, sources)
        blocks.append(_layer_block(edges, hi.nodes[: hi.n_features], targets.pos, lo.nodes, hi))
        tick()
    c0 = cps[0]
    if c0.sae is not None:
        blocks.append(_same_position_block(c0.nodes[: c0.n_features], c0.readouts(), tokens, _tokens(trace)))
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
        keep, contrib = select_sources(block.weight, weights[block.targets], kinds[block.sources], k)
        weights.index_add_(0, block.sources, contrib.to(weights.dtype))
        kept_parts = keep[:n_parts].nonzero().squeeze(1)
        frontier = rows[kept_parts][rows[kept_parts] < n_features]
        return Block(block.targets, block.sources[keep], block.weight[:, keep]), kept_parts, frontier

    first = _same_position_block(logits, lr, top.nodes[at_last], top.parts(at_last))
    block, _, frontier = expand(first, len(at_last), top.n_features, at_last)
    blocks, inputs = [block], {}
    for layer in reversed(range(L)):
        hi, lo = cps[layer + 1], cps[layer]
        targets = hi.readouts(frontier)
        reach = (lo.pos <= int(targets.pos.max())).nonzero().squeeze(1) if len(frontier) else frontier
        sources = lo.parts(reach)
        edges = E.layer_edges_by_position(an, trace, layer, targets, sources)
        full = _layer_block(edges, hi.nodes[frontier], targets.pos, lo.nodes[reach], hi)
        block, kept_parts, frontier = expand(full, len(reach), lo.n_features, reach)
        inputs[len(blocks)] = LayerInputs(layer, targets, edges.mlp_readout, sources.take(kept_parts))
        blocks.append(block)
        tick()
    c0 = cps[0]
    if c0.sae is not None:
        blocks.append(_same_position_block(c0.nodes[frontier], c0.readouts(frontier), tokens, _tokens(trace)))
    return blocks, inputs


@dataclass(frozen=True, eq=False)
class Attribution:
    """The unpruned layered graph: node arrays, blocks from the logits down, logit weights."""

    kinds: Tensor  # [node] KIND_CODE
    checkpoints: Tensor  # [node]
    pos: Tensor  # [node]
    index: Tensor  # [node] feature or token id, -1 otherwise
    acts: Tensor  # [node] activation (NaN where none)
    logit_weights: Tensor  # [node] probability on logit nodes, 0 elsewhere
    logits: Tensor  # [logit] node indices of the logit nodes
    blocks: list[Block]
    inputs: dict[int, LayerInputs]  # block index -> what its head loadings need

    def node(self, i: int) -> Node:
        return Node(KINDS[int(self.kinds[i])], int(self.checkpoints[i]), int(self.pos[i]), int(self.index[i]))


def attribute(
    model: Model,
    saes: SAESet,
    trace: Trace,
    *,
    targets: Sequence[str | int] | str | int | None = None,
    readout: str = GRAPH.readout,
    mode: str = "full",
    max_nodes_per_checkpoint: int = 256,
    tick: Tick = lambda: None,
) -> Attribution:
    """Steps 1-4: every edge (mode="full") or the target-driven subset (mode="target"), unpruned."""
    if readout not in ("decoder", "encoder"):
        raise InputError(f"readout='{readout}' is not known: use 'decoder' (the paper's) or 'encoder'")
    if mode not in ("full", "target"):
        raise InputError(f"mode='{mode}' is not known: use 'full' or 'target'")
    _check_saes(model, saes)
    with torch.no_grad():
        table = NodeTable(trace.tokens.device)
        tokens, cps = _checkpoints(model, saes, trace, table, readout)
        ids, probs = logit_targets(model, trace, targets)
        last = torch.full_like(ids, trace.n_pos - 1)
        logits = table.add(Kind.LOGIT, model.n_layers, last, ids, trace.logits[-1, ids])
        kinds, checkpoints, pos, index, acts = table.arrays()
        logit_w = torch.zeros(table.size, dtype=trace.resid.dtype, device=kinds.device)
        logit_w[logits] = probs.to(logit_w.dtype)
        lr = E.logit_readouts(model.anatomy, trace, ids)
        if mode == "full":
            blocks, inputs = _full(model, trace, tokens, cps, logits, lr, tick)
        else:
            k = max_nodes_per_checkpoint
            blocks, inputs = _target(model, trace, tokens, cps, logits, lr, logit_w.clone(), kinds, k, tick)
    return Attribution(kinds, checkpoints, pos, index, acts, logit_w, logits, blocks, inputs)


def build_graph(
    model: Model,
    saes: SAESet | Mapping[int, SAE],
    trace: Trace,
    *,
    targets: Sequence[str | int] | str | int | None = None,
    readout: str = GRAPH.readout,
    node_threshold: float = GRAPH.node_threshold,
    edge_threshold: float = GRAPH.edge_threshold,
    max_nodes: int | None = GRAPH.max_nodes,
    mode: str = "full",
    max_nodes_per_checkpoint: int = 256,
    top_heads: int = 5,
    progress: bool = True,
) -> Graph:
    """The attribution graph of `trace` from its logits down to its tokens, with head loadings.

    `targets`: logit tokens (strings or ids; default the top tokens covering 95% probability, at most
    10). `readout`: how a target feature reads the residual, "decoder" (a * W_dec row, the paper) or
    "encoder" (a * W_enc column). `max_nodes`: keep at most this many features after pruning.
    `mode`: "full" computes every edge; "target" expands from the logits, keeping the top
    `max_nodes_per_checkpoint` features per checkpoint. `top_heads`: head loadings kept per edge.
    """
    saes = saes if isinstance(saes, SAESet) else SAESet(saes)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with torch.no_grad(), Progress(*columns, transient=True, disable=not progress) as bar:
        task = bar.add_task("edges, layer by layer", total=model.n_layers)
        att = attribute(
            model, saes, trace, targets=targets, readout=readout, mode=mode,
            max_nodes_per_checkpoint=max_nodes_per_checkpoint, tick=lambda: bar.advance(task),
        )  # fmt: skip
        replacement, completeness = graph_scores(att.blocks, att.kinds, att.logit_weights)
        pruned = prune(att.blocks, att.kinds, att.logit_weights, node_threshold, edge_threshold, max_nodes)
        task = bar.add_task("head loadings", total=len(att.blocks))
        top = max(0, min(top_heads, model.n_heads))
        edge_cols = _kept_edges(model, trace, att, pruned, top, lambda: bar.advance(task))
    keep = pruned.node_mask.nonzero().squeeze(1)
    final = torch.full((len(att.kinds),), -1, dtype=torch.long, device=keep.device)
    final[keep] = torch.arange(len(keep), device=keep.device)
    node_rows = (att.kinds, att.checkpoints, att.pos, att.index, att.acts, pruned.influence, pruned.cumulative)
    nodes = _graph_nodes(model, saes, trace, keep, (*node_rows, att.logit_weights), att.logits)
    src, tgt, w, score, layer, heads, direct, via = edge_cols
    cpu = lambda t: t.detach().to("cpu")  # noqa: E731
    f32 = lambda t: t.detach().to("cpu", torch.float32)  # noqa: E731
    settings = {
        "readout": readout,
        "mode": mode,
        "node_threshold": node_threshold,
        "edge_threshold": edge_threshold,
        "max_nodes": max_nodes,
        "max_nodes_per_checkpoint": max_nodes_per_checkpoint if mode == "target" else None,
        "top_heads": top,
    }
    graph = Graph(
        nodes=nodes,
        source=cpu(final[src]),
        target=cpu(final[tgt]),
        weight=f32(w),
        influence=f32(score),
        head_layer=cpu(layer),
        heads=cpu(heads),
        direct=f32(direct),
        via_mlp=f32(via),
        tokens=tuple(int(t) for t in trace.tokens),
        str_tokens=trace.str_tokens,
        prompt=_prompt(model, trace),
        model_name=model.name,
        n_layers=model.n_layers,
        replacement=replacement,
        completeness=completeness,
        settings=settings,
    )
    log.info("graph: %s", graph.summary_text())
    return graph


def _kept_edges(
    model: Model, trace: Trace, att: Attribution, pruned: Pruned, top: int, tick: Tick
) -> tuple[Tensor, ...]:
    """Kept edges as columns (source, target, weight, score, layer, heads, direct, via_mlp)."""
    cols: list[list[Tensor]] = [[] for _ in range(8)]
    for b, block in enumerate(att.blocks):
        t, s = pruned.edge_masks[b].nonzero(as_tuple=True)
        n = len(t)
        dev = block.weight.device
        layer = torch.full((n,), -1, dtype=torch.long, device=dev)
        heads = torch.full((n, top), -1, dtype=torch.long, device=dev)
        direct = block.weight.new_zeros(n, top)
        via = block.weight.new_zeros(n, top)
        info: LayerInputs | None = att.inputs.get(b)
        if info is not None and n and top:
            regular = (s < len(info.sources)).nonzero().squeeze(1)
            d, v = E.head_loadings(
                model.anatomy, trace, info.layer, info.targets, info.mlp_readout, info.sources, (t[regular], s[regular])
            )
            order = torch.topk((d + v).abs(), min(top, d.shape[1]), dim=1).indices  # sorted, largest first
            width = order.shape[1]
            heads[regular, :width] = order
            direct[regular, :width] = d.gather(1, order)
            via[regular, :width] = v.gather(1, order)
            layer[regular] = info.layer
        found = (block.sources[s], block.targets[t], block.weight[t, s], pruned.edge_scores[b][t, s])
        for store, col in zip(cols, (*found, layer, heads, direct, via)):
            store.append(col)
        tick()
    return tuple(torch.cat(c) for c in cols)


def _graph_nodes(
    model: Model, saes: SAESet, trace: Trace, keep: Tensor, rows: tuple[Tensor, ...], logits: Tensor
) -> tuple[GraphNode, ...]:
    kinds, checkpoints, pos, index, acts, infl, cum, logit_w = (r[keep].tolist() for r in rows)
    first_logit = int(logits[0]) if len(logits) else -1
    out = []
    for i, g in enumerate(keep.tolist()):
        kind = KINDS[kinds[i]]
        node = Node(kind, checkpoints[i], pos[i], index[i])
        act = acts[i] if acts[i] == acts[i] else None  # NaN: no activation
        out.append(
            GraphNode(
                node=node,
                activation=act,
                influence=float(infl[i]),
                cumulative=float(cum[i]),
                label=_label(model, saes, trace, node, float(logit_w[i])),
                token_prob=float(logit_w[i]) if kind is Kind.LOGIT else 0.0,
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
        return f'Output "{model.str_tokens(torch.tensor([node.index]))[0]}" (p={prob:.3f})'
    return {
        Kind.ERROR: f"SAE error at checkpoint {c}",
        Kind.SAE_BIAS: f"SAE decoder bias at checkpoint {c}",
        Kind.ATTN_BIAS: f"attention bias of layer {c - 1}",
        Kind.MLP_BIAS: f"MLP bias of layer {c - 1}",
    }[node.kind]


def _prompt(model: Model, trace: Trace) -> str:
    tok = model.tokenizer
    if tok is None:
        return " ".join(trace.str_tokens)
    return str(tok.decode(trace.tokens.tolist()))  # type: ignore[attr-defined]
