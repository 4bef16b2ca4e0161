"""Strategy 2: transcoders plus attention-output SAEs as checkpoints, so that every edge crosses at most one
attention layer and an edge that crosses one splits exactly over that layer's heads (head loadings).

The paper's second way to "checkpoint" attention: SAEs trained on each attention layer's output, as nodes
beside the transcoder features. The local replacement model is the plain transcoder graph's (`replacement`:
every attention pattern and norm scale frozen, each MLP replaced by its transcoders + skip + an MLP error)
with, in addition, each layer's attention output replaced at its SAE's site by the SAE's features + b_dec +
an attention error. The site is `hook_z` (the heads' outputs before W_O, side by side) or the attention
output after W_O (after Gemma-2's post-attention norm). Every feature activation is a leaf (a node), so the
attention output no longer passes its input through: a gradient crosses an attention layer only into that
layer's own attention-SAE features.

1. Forward pass (`Model.run`): the transcoders' sites (`replacement.sites`) and, per layer, the attention
   SAE's input x [pos, d_in] (`attention_inputs`): z_h = pattern_h @ v_h with the heads side by side, or
   post_attn(sum_h z_h W_O[h] + b_O).
2. Encode: transcoder features and MLP errors (`replacement.encode`); attention features and errors
   (`encode_attention`: error = x - reconstruction, in the SAE's input space), the first `zero_positions`
   positions zeroed in both (as circuit-tracer zeroes the BOS position).
3. Logit targets (`replacement.salient_logits`).
4. Node table (`node_table`): transcoder features, MLP errors (layer-major), attention features (by layer,
   position, feature), attention errors (layer-major), token embeddings, logits.
5. The sweep (`Checkpoints.sweep`): a cotangent g at the residual stream goes down layer by layer. At layer
   j it reads the MLP-output sources (transcoder features writing there, the MLP errors: as
   `Replacement.read_layer`), goes through the skip term and the transcoder input's frozen norm to the
   residual after attention, reads layer j's attention sources at the SAE site (z: the post-attention norm's
   adjoint, then W_O per head; attn_out: as is) and goes on to layer j - 1 unchanged: the sweep never
   crosses an attention layer. At the bottom it reads the token embeddings (learned positions and every
   bias are no nodes).
   a. Logits and transcoder features (`direct_rows`) enter as in the plain graph (the final norm's adjoint /
      the encoder direction at the transcoder input): every source reaches them through the residual
      stream (and skip terms) only.
   b. An attention feature of layer l at position p (`attention_rows`) enters at its site with its encoder
      direction e and crosses layer l's attention once, at the frozen pattern A, head by head: reader r_h
      (z: e's slice for head h; attn_out: W_O[h] applied to e after the post-attention norm's adjoint),
      cotangent A_h[p, k] * W_V[kv(h)] r_h at each key position k through the frozen attention-input norm
      (`Checkpoints.head_cotangents`). The head axis rides along the sweep below layer l, so every edge
      comes out as per-head parts: the head loadings, whose sum is the edge. With `by_head=False` the heads
      are summed before the sweep (n_heads times less work, no loadings); `head_loadings` computes them
      later for the attention features asked (those a pruned graph keeps).
6. Assemble (`CheckpointedGraph`): adjacency [node, node] (row = target, column = source; logits are no
   source) and the head loadings of every non-zero edge into an attention feature (`HeadLoadings`, one
   row per edge: [edge, head], so n_heads times the non-zero entries of the attention rows).

Memory follows the question: cotangents are [chunk, pos, d_model], a chunk of attention targets times their
heads at most `batch_size`; one layer's pattern at a time in step 1, the chunk's pattern rows in step 5b.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError, SAEMismatchError
from ..models.anatomy import Anatomy
from ..models.model import Model
from ..models.trace import Trace
from ..nodes import Node, attn_error, attn_feature
from ..saes.attention import AttentionSAESet
from ..saes.transcoder import TranscoderSet
from . import replacement
from .edges import norm_adjoint
from .replacement import Encoded, Replacement, _encoder, _skip_adjoint, input_adjoint, output_cotangent

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class AttentionEncoded:
    """Step 2: the active attention-SAE features (by layer, position, feature) and the attention errors."""

    layer: Tensor  # [feature]
    pos: Tensor  # [feature]
    index: Tensor  # [feature]
    act: Tensor  # [feature]
    errors: tuple[Tensor, ...]  # [layer][pos, d_in] in the SAE's input space, zero at the zeroed positions


@dataclass(frozen=True, eq=False)
class HeadLoadings:
    """Per-head parts of every non-zero edge into an attention feature: `parts.sum(-1)` is the edge."""

    target: Tensor  # [edge] adjacency row (an attention feature of layer l)
    source: Tensor  # [edge] adjacency column
    parts: Tensor  # [edge, head]: through each head of layer l (zero-padded to the widest layer)


@dataclass(frozen=True, eq=False)
class CheckpointedGraph:
    """An unpruned transcoder + attention-SAE attribution graph (strategy 2) with its head loadings."""

    nodes: tuple[Node, ...]  # transcoder features, MLP errors, attention features, attention errors, tokens, logits
    adjacency: Tensor  # [node, node]: adjacency[target, source]
    transcoder_features: Encoded
    attention_features: AttentionEncoded
    head_loadings: HeadLoadings | None  # every non-zero edge into an attention feature (None: by_head=False)
    checkpoints: Checkpoints  # what the sweep reads: `head_loadings(graph.checkpoints, features)` on demand
    tokens: Tensor  # [pos]
    logit_tokens: Tensor  # [logit]
    logit_probs: Tensor  # [logit]

    def index(self, node: Node) -> int:
        """The row / column of `node` (InputError when the graph has no such node)."""
        try:
            return self.nodes.index(node)
        except ValueError:
            raise InputError(f"node '{node.id}' is not in this checkpointed graph: pick one of its nodes") from None


def attention_inputs(anatomy: Anatomy, trace: Trace, saes: AttentionSAESet) -> tuple[Tensor, ...]:
    """Step 1: per layer, what its attention SAE reads [pos, d_in], at the trace's frozen patterns."""
    xs = []
    for layer in range(anatomy.n_layers):
        ly = anatomy.layers[layer]
        A = trace.pattern(layer)  # [head, q_pos, k_pos]
        z = torch.einsum("hqk,hke->qhe", A, trace.v[layer][ly.kv_index()].to(A))  # [pos, head, d_head]
        if saes[layer].site == "z":
            xs.append(z.flatten(-2))
            continue
        out = torch.einsum("qhe,hed->qd", z, ly.W_O.to(z)) + ly.b_O.to(z)
        if ly.post_attn is not None:
            assert trace.scale_post_attn is not None
            out = ly.post_attn(out, trace.scale_post_attn[layer])
        xs.append(out)
    return tuple(xs)


def encode_attention(saes: AttentionSAESet, xs: Sequence[Tensor], zero_positions: int = 1) -> AttentionEncoded:
    """Step 2: every layer's attention features (first `zero_positions` positions zeroed) and errors."""
    found: list[tuple[Tensor, ...]] = []
    errors = []
    for layer, x in enumerate(xs):
        sae = saes[layer]
        acts = sae.encode(x.to(sae.W_enc)).to(x.dtype).clone()
        acts[:zero_positions] = 0
        err = x - sae.decode(acts).to(x)
        err[:zero_positions] = 0
        errors.append(err)
        nz = acts.nonzero()  # [feature, 2] (pos, index), lexicographic
        found.append((torch.full_like(nz[:, 0], layer), nz[:, 0], nz[:, 1], acts[nz[:, 0], nz[:, 1]]))
    layer_, pos, index, act = (torch.cat(col) for col in zip(*found))
    return AttentionEncoded(layer_, pos, index, act, tuple(errors))


def node_table(
    enc: Encoded, att: AttentionEncoded, n_layers: int, tokens: Tensor, logit_ids: Tensor
) -> tuple[Node, ...]:
    """Step 4: the plain graph's nodes with the attention features and errors after the MLP errors."""
    plain = replacement.node_table(enc, n_layers, tokens, logit_ids)
    n_plain = enc.layer.numel() + n_layers * int(tokens.numel())
    feats = [attn_feature(int(l), int(p), int(f)) for l, p, f in zip(att.layer, att.pos, att.index)]  # noqa: E741
    errs = [attn_error(layer, p) for layer in range(n_layers) for p in range(int(tokens.numel()))]
    return (*plain[:n_plain], *feats, *errs, *plain[n_plain:])


def _read_at_positions(g_site: Tensor, pos: Tensor, cols: Tensor, vec: Tensor, out: Tensor) -> None:
    """out[:, cols] += <g_site[:, pos], vec> for sources writing `vec` [source, d] at `pos` [source]."""
    for p in pos.unique().tolist():
        at = pos == p
        out[:, cols[at]] += g_site[:, p] @ vec[at].T.to(g_site)


@dataclass(frozen=True, eq=False)
class Checkpoints:
    """The plain graph's `Replacement` plus the attention SAEs and their encodings: what the sweep reads."""

    rep: Replacement
    saes: AttentionSAESet
    att: AttentionEncoded

    @property
    def attn_col(self) -> int:
        """Column of the first attention feature (after transcoder features and MLP errors)."""
        return self.rep.enc.layer.numel() + self.rep.anatomy.n_layers * self.rep.trace.n_pos

    @property
    def n_cols(self) -> int:
        """Every source column: up to and including the token embeddings."""
        return self.attn_col + self.att.layer.numel() + (self.rep.anatomy.n_layers + 1) * self.rep.trace.n_pos

    def read_attention(self, layer: int, g: Tensor, out: Tensor) -> None:
        """Edges from layer `layer`'s attention sources, g [b, pos, d_model] at the residual after attention."""
        an, trace, att, sae = self.rep.anatomy, self.rep.trace, self.att, self.saes[layer]
        ly = an.layers[layer]
        if sae.site == "z":
            if ly.post_attn is not None:
                assert trace.scale_post_attn is not None
                g = norm_adjoint(ly.post_attn, g, trace.scale_post_attn[layer])
            g = torch.einsum("bpd,hed->bphe", g, ly.W_O.to(g)).flatten(-2)  # [b, pos, head * d_head]
        n_pos = trace.n_pos
        col = self.attn_col + att.layer.numel() + layer * n_pos
        out[:, col : col + n_pos] += torch.einsum("bpd,pd->bp", g, att.errors[layer].to(g))
        cols = (att.layer == layer).nonzero()[:, 0]
        if cols.numel():
            vec = att.act[cols, None].to(g) * sae.W_dec[att.index[cols].to(sae.W_dec.device)].to(g)
            _read_at_positions(g, att.pos[cols], cols + self.attn_col, vec, out)

    def sweep(self, g: Tensor, top: int, out: Tensor, inject: Callable[[int, Tensor], None] | None = None) -> None:
        """Step 5: g [b, pos, d_model] at checkpoint top + 1 down to the embeddings, never crossing attention;
        `inject(layer, gx)` adds targets entering at a layer's transcoder input."""
        an, trace, ts = self.rep.anatomy, self.rep.trace, self.rep.transcoders
        for layer in range(top, -1, -1):
            g_site = output_cotangent(an, trace, ts.output_site, layer, g)
            self.rep.read_layer(layer, g_site, out)
            gx = _skip_adjoint(ts, layer, g_site)
            if inject is not None:
                inject(layer, gx)
            g = g + input_adjoint(ts.input_site, an.layers[layer].ln_mlp, gx, trace.scale_ln_mlp[layer])
            self.read_attention(layer, g, out)
        col = self.n_cols - trace.n_pos
        out[:, col:] += torch.einsum("bpd,pd->bp", g, self.rep.token_vectors.to(g))

    def rows(self, start: Tensor, pos: Tensor, inject: Tensor) -> Tensor:
        """Step 5a: rows [b, n_cols] of logits (start = n_layers, entering after the final norm) and
        transcoder features (start = their layer, entering at its transcoder input along `inject`)."""
        an, trace = self.rep.anatomy, self.rep.trace
        n = an.n_layers
        out = inject.new_zeros(len(start), self.n_cols)
        g = inject.new_zeros(len(start), trace.n_pos, an.d_model)
        top = start == n
        if bool(top.any()):
            g[top, pos[top]] = norm_adjoint(an.final_norm, inject[top], trace.scale_final[pos[top]])

        def add(layer: int, gx: Tensor) -> None:
            here = start == layer
            gx[here, pos[here]] += inject[here]

        self.sweep(g, min(int(start.max()), n - 1), out, add)
        return out

    def head_cotangents(self, layer: int, pos: Tensor, e: Tensor) -> Tensor:
        """Step 5b: attention targets of `layer` at `pos` [b] with site directions e [b, d_in] -> per-head
        cotangents [b, head, pos, d_model] at checkpoint `layer` through the frozen pattern and norms."""
        an, trace, sae = self.rep.anatomy, self.rep.trace, self.saes[layer]
        ly = an.layers[layer]
        if sae.site == "z":
            r = sae.heads(e)  # [b, head, d_head]
        else:
            if ly.post_attn is not None:
                assert trace.scale_post_attn is not None
                e = norm_adjoint(ly.post_attn, e, trace.scale_post_attn[layer][pos])
            r = torch.einsum("bd,hed->bhe", e, ly.W_O.to(e))
        u = torch.einsum("bhe,hde->bhd", r, ly.W_V[ly.kv_index()].to(r))  # [b, head, d_model]
        q_pos, inverse = pos.unique(return_inverse=True)
        A = trace.pattern(layer, q_pos.tolist()).to(u)[:, inverse]  # [head, b, k_pos]
        g = A.transpose(0, 1)[..., None] * u[:, :, None, :]  # [b, head, k_pos, d_model]
        return norm_adjoint(ly.ln_attn, g, trace.scale_ln_attn[layer].to(g))

    def head_rows(self, layer: int, pos: Tensor, e: Tensor, by_head: bool = True) -> Tensor:
        """Step 5b: rows of attention targets of `layer`: per head [b, head, n_cols] (their sum over heads is
        the row), or summed over heads before the sweep [b, n_cols] (`by_head=False`, n_heads times cheaper)."""
        g = self.head_cotangents(layer, pos, e)
        if not by_head:
            g = g.sum(1, keepdim=True)
        out = g.new_zeros(g.shape[0] * g.shape[1], self.n_cols)
        self.sweep(g.flatten(0, 1), layer - 1, out)
        return out.unflatten(0, g.shape[:2]) if by_head else out

    def encoder(self, features: Tensor) -> Tensor:
        """Site directions [b, d_in] (encoder columns) of attention features `features` (one layer's)."""
        W = self.saes[int(self.att.layer[features[0]])].W_enc
        return W[:, self.att.index[features].to(W.device)].T


def direct_rows(cp: Checkpoints, logit_vecs: Tensor, batch_size: int, adjacency: Tensor) -> None:
    """Step 5a: the rows of every transcoder feature and logit, in chunks ordered by layer (top first)."""
    enc, an = cp.rep.enc, cp.rep.anatomy
    n_tc, n_pos, dev = enc.layer.numel(), cp.rep.trace.n_pos, adjacency.device
    first_logit = adjacency.shape[0] - len(logit_vecs)
    start = torch.cat([enc.layer.to(dev), torch.full((len(logit_vecs),), an.n_layers, device=dev)])
    pos = torch.cat([enc.pos.to(dev), torch.full((len(logit_vecs),), n_pos - 1, device=dev)])
    for chunk in torch.argsort(start, descending=True, stable=True).split(batch_size):
        is_logit = chunk >= n_tc
        inject = adjacency.new_empty(len(chunk), an.d_model)
        inject[is_logit] = logit_vecs[chunk[is_logit] - n_tc].to(inject)
        for layer in start[chunk[~is_logit]].unique().tolist():
            at = ~is_logit & (start[chunk] == layer)
            inject[at] = _encoder(cp.rep.transcoders, layer, enc.index[chunk[at]]).to(inject)
        rows = torch.where(is_logit, chunk - n_tc + first_logit, chunk)
        adjacency[rows, : cp.n_cols] = cp.rows(start[chunk], pos[chunk], inject)


def _chunks(cp: Checkpoints, features: Tensor, batch_size: int, by_head: bool) -> Iterator[tuple[int, Tensor]]:
    """(layer, attention feature indices) chunks: one layer each, targets (x heads when `by_head`) <= batch_size."""
    att, an = cp.att, cp.rep.anatomy
    for layer in att.layer[features].unique().tolist():
        size = max(1, batch_size // an.layers[layer].n_heads) if by_head else batch_size
        yield from ((layer, chunk) for chunk in features[att.layer[features] == layer].split(size))


def attention_rows(cp: Checkpoints, batch_size: int, adjacency: Tensor, by_head: bool) -> HeadLoadings | None:
    """Step 5b: the rows of every attention feature; with `by_head`, also the per-head parts of their non-zero
    edges (each row's sweep then carries the head axis: n_heads times the work)."""
    features = torch.arange(cp.att.layer.numel(), device=cp.att.layer.device)
    found: list[tuple[Tensor, Tensor, Tensor]] = []
    for layer, chunk in _chunks(cp, features, batch_size, by_head):
        rows = cp.head_rows(layer, cp.att.pos[chunk], cp.encoder(chunk).to(adjacency), by_head)
        at = chunk.to(adjacency.device) + cp.attn_col
        adjacency[at, : cp.n_cols] = rows.sum(1) if by_head else rows
        if by_head:
            found.append(_nonzero(cp, at, rows))
    return _gather(cp, found, adjacency) if by_head else None


def _nonzero(cp: Checkpoints, rows: Tensor, by_head: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(target rows, source columns, parts [edge, head] zero-padded to the widest layer) of non-zero edges."""
    width = max(ly.n_heads for ly in cp.rep.anatomy.layers)
    b, c = by_head.ne(0).any(1).nonzero().unbind(1)
    return rows[b], c, torch.nn.functional.pad(by_head[b, :, c], (0, width - by_head.shape[1]))


def _gather(cp: Checkpoints, found: list[tuple[Tensor, Tensor, Tensor]], like: Tensor) -> HeadLoadings:
    if not found:
        empty = like.new_zeros(0, dtype=torch.long)
        return HeadLoadings(empty, empty, like.new_zeros(0, max(ly.n_heads for ly in cp.rep.anatomy.layers)))
    return HeadLoadings(*(torch.cat(col) for col in zip(*found)))


def head_loadings(cp: Checkpoints, features: Tensor, batch_size: int = 256) -> HeadLoadings:
    """The head loadings of every non-zero edge into the attention features `features` (indices into
    `cp.att`, e.g. those a pruned graph keeps), computed on demand: exactly what `by_head=True` stores."""
    like = cp.rep.enc.errors
    found = []
    with torch.no_grad():
        for layer, chunk in _chunks(cp, features.to(cp.att.layer.device), batch_size, by_head=True):
            rows = cp.head_rows(layer, cp.att.pos[chunk], cp.encoder(chunk).to(like))
            found.append(_nonzero(cp, chunk.to(like.device) + cp.attn_col, rows))
    return _gather(cp, found, like)


def check_coverage(model: Model, transcoders: TranscoderSet, attention_saes: AttentionSAESet) -> None:
    """One line (SAEMismatchError) unless the transcoders and the attention SAEs each cover every layer."""
    every = tuple(range(model.n_layers))
    for what, have in (("transcoders", transcoders.layers), ("attention SAEs", attention_saes.layers)):
        if tuple(have) != every:
            raise SAEMismatchError(
                f"a checkpointed graph replaces every MLP and every attention output, but the {what} cover "
                f"layers {tuple(have)} of {model.n_layers}: load one per layer"
            )


def checkpointed_graph(
    model: Model,
    transcoders: TranscoderSet,
    attention_saes: AttentionSAESet,
    prompt: str | Sequence[int] | Tensor | Trace,
    *,
    by_head: bool = True,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    zero_positions: int = 1,
    batch_size: int = 256,
    logit_ids: Tensor | None = None,
) -> CheckpointedGraph:
    """The unpruned strategy-2 graph of `prompt` (transcoders and attention-output SAEs at every layer),
    every active feature a row, with the head loadings of every non-zero edge into an attention feature
    (`by_head=False`: none, and n_heads times less work for those rows; `head_loadings` computes them later
    for the features asked): see the module docstring for the steps. `prompt` may be a `Trace` already run;
    `logit_ids`: the logit targets (default: the top tokens covering `desired_logit_prob`, at most
    `max_n_logits`)."""
    check_coverage(model, transcoders, attention_saes)
    t0 = time.perf_counter()
    trace = prompt if isinstance(prompt, Trace) else model.run(prompt)
    an = model.anatomy
    enc = replacement.encode(transcoders, replacement.sites(model, trace, transcoders), zero_positions)
    att = encode_attention(attention_saes, attention_inputs(an, trace, attention_saes), zero_positions)
    log.info(
        "checkpointed graph: %d transcoder and %d attention features over %d positions",
        enc.layer.numel(),
        att.layer.numel(),
        trace.n_pos,
    )
    if logit_ids is None:
        ids, probs, vecs = replacement.salient_logits(an, trace, max_n_logits, desired_logit_prob)
    else:
        ids = logit_ids.to(trace.last_logits.device)
        probs = torch.softmax(trace.last_logits.float(), dim=-1)[ids]
        vecs = replacement.logit_vectors(an, ids)
    rep = Replacement(an, trace, transcoders, enc, replacement.token_vectors(an, trace.tokens))
    cp = Checkpoints(rep, attention_saes, att)
    adjacency = enc.errors.new_zeros(cp.n_cols + len(ids), cp.n_cols + len(ids))
    with torch.no_grad():
        direct_rows(cp, vecs, batch_size, adjacency)
        loadings = attention_rows(cp, batch_size, adjacency, by_head)
    log.info("checkpointed graph: %d rows in %.2fs", cp.n_cols + len(ids), time.perf_counter() - t0)
    nodes = node_table(enc, att, model.n_layers, trace.tokens, ids)
    return CheckpointedGraph(nodes, adjacency, enc, att, loadings, cp, trace.tokens, ids, probs)
