"""The plain transcoder graph: circuit-tracer's attribution graph over transcoder features, computed here.

The local replacement model is the HF model at one prompt with every attention pattern and every norm
scale frozen (LayerNorm / RMSNorm denominators, the final norm's included) and each MLP replaced by its
transcoders: the features' decoder writes, b_dec, the skip term and an error node per (layer, position)
that makes the MLP's output exact. Frozen that way, everything between one MLP and the next is linear,
so an edge is the gradient of a target's input direction with respect to a source's output vector.

1. Forward pass (`Model.run`): per layer, the transcoder's input at its site and the MLP's true output
   at its output site (`Sites`).
2. Encode (`encode`): every layer's features; the first `zero_positions` positions are zeroed (features
   and errors, as circuit-tracer zeroes the BOS position); errors = true output - reconstruction.
3. Logit targets (`salient_logits`): the most probable tokens until their cumulative probability reaches
   `desired_logit_prob`, at most `max_n_logits`; each reads the final residual through the frozen final
   norm along its demeaned unembedding column (soft-capping ignored, as circuit-tracer does).
4. Node table (`node_table`), circuit-tracer's order: active features (by layer, position, feature),
   MLP errors (layer-major), token embeddings (per position), logits.
5. Edges (`adjacency_rows`), computed as columns (`replacement_sweep`): every source's write (a feature's
   activation x decoder row, an error vector, a token embedding) is pushed up the frozen model (attention
   through its pattern and norm scales, the skip term) and read by every target above it: a feature by
   its encoder direction at its layer's transcoder input (pre-activation, so the feature's own activation
   never scales its incoming edges), a logit by its demeaned unembedding column after the frozen final
   norm. Learned positions and every bias are no nodes. The same numbers as rows, each target's cotangent
   going down the model (`Replacement.rows`, `adjacency_by_rows`), cost more: a feature target at layer L
   goes back through L + 1 attention layers, a feature source forward through n_layers - 1 - l.
6. Assemble (`TranscoderGraph`): adjacency [node, node], row = target, column = source.

Memory follows the question: one chunk of sources' residuals [pos, chunk, d_model] at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError, SAEMismatchError
from ..models.anatomy import Anatomy, Norm
from ..models.model import Model
from ..models.trace import Trace
from ..nodes import Node, logit, mlp_error, token, transcoder
from ..saes.transcoder import TranscoderSet, site_input
from .edges import norm_adjoint
from .replacement_sweep import Attention, Sweep, reads, sources

log = logging.getLogger(__name__)
BUCKETS = 4  # the column sweep splits the sources into at most this many position buckets, each 8 positions or more


@dataclass(frozen=True, eq=False)
class Sites:
    """Step 1: per layer, the transcoder input x [pos, d_model] and the MLP's true output y at its site."""

    x: tuple[Tensor, ...]
    y: tuple[Tensor, ...]


@dataclass(frozen=True, eq=False)
class Encoded:
    """Step 2: the active features in circuit-tracer's order and the MLP error vectors."""

    layer: Tensor  # [feature]
    pos: Tensor  # [feature]
    index: Tensor  # [feature]
    act: Tensor  # [feature]
    errors: Tensor  # [layer, pos, d_model], zero at the zeroed positions


@dataclass(frozen=True, eq=False)
class TranscoderGraph:
    """An unpruned transcoder attribution graph (circuit-tracer's `Graph` content)."""

    nodes: tuple[Node, ...]  # features, MLP errors, tokens, logits
    adjacency: Tensor  # [node, node]: adjacency[target, source] (a transposed view: built source by source)
    features: Encoded
    tokens: Tensor  # [pos]
    logit_tokens: Tensor  # [logit]
    logit_probs: Tensor  # [logit]

    @property
    def n_features(self) -> int:
        return int(self.features.layer.numel())

    def index(self, node: Node) -> int:
        """The row / column of `node` (InputError when the graph has no such node)."""
        try:
            return self.nodes.index(node)
        except ValueError:
            raise InputError(f"node '{node.id}' is not in this transcoder graph: pick one of its nodes") from None


def sites(model: Model, trace: Trace, transcoders: TranscoderSet) -> Sites:
    """Step 1: what each layer's transcoder reads and what its MLP really wrote, at the set's sites."""
    an = trace.anatomy
    xs, ys = [], []
    for layer in range(an.n_layers):
        ly = an.layers[layer]
        if ly.parallel:
            raise SAEMismatchError(
                f"model '{model.name}' runs attention and MLP in parallel: transcoder graphs need sequential blocks"
            )
        out = trace.mlp_out[layer]
        if ly.post_mlp is not None:
            assert trace.scale_post_mlp is not None
            post = ly.post_mlp(out, trace.scale_post_mlp[layer])
        else:
            post = out
        mid = trace.resid[layer + 1] - post
        if transcoders.input_site == "mlp_in":
            xs.append(trace.mlp_in[layer])  # exactly what HF's MLP read
        else:
            xs.append(site_input(transcoders.input_site, ly.ln_mlp, mid, trace.scale_ln_mlp[layer]))
        ys.append(out if transcoders.output_site == "mlp_module_out" else post)
    return Sites(tuple(xs), tuple(ys))


def encode(transcoders: TranscoderSet, s: Sites, zero_positions: int = 1) -> Encoded:
    """Step 2: encode every layer, zero the first `zero_positions` positions, and split off the errors."""
    acts = []
    for layer, x in enumerate(s.x):
        a = transcoders.encode(layer, x).clone()
        a[:zero_positions] = 0
        acts.append(a)
    errors = []
    for layer, (x, y) in enumerate(zip(s.x, s.y)):
        err = y - transcoders.decode_into(layer, acts, x if transcoders.has_skip else None).to(y.dtype)
        err[:zero_positions] = 0
        errors.append(err)
    idx = torch.stack(acts).nonzero()  # [feature, 3] (layer, pos, index), lexicographic like a coalesced sparse
    stacked = torch.stack(acts)
    return Encoded(idx[:, 0], idx[:, 1], idx[:, 2], stacked[idx[:, 0], idx[:, 1], idx[:, 2]], torch.stack(errors))


def salient_logits(
    anatomy: Anatomy, trace: Trace, max_n_logits: int = 10, desired_logit_prob: float = 0.95
) -> tuple[Tensor, Tensor, Tensor]:
    """Step 3: (token ids [logit], probabilities [logit], demeaned unembedding columns [logit, d_model])."""
    probs = torch.softmax(trace.last_logits.float(), dim=-1)
    top_p, top_i = torch.topk(probs, min(max_n_logits, probs.numel()))
    cutoff = int(torch.searchsorted(torch.cumsum(top_p, 0), desired_logit_prob)) + 1
    ids, p = top_i[:cutoff], top_p[:cutoff]
    return ids, p, logit_vectors(anatomy, ids)


def logit_vectors(anatomy: Anatomy, ids: Tensor) -> Tensor:
    """The demeaned unembedding columns [logit, d_model] of tokens `ids`: what each logit target reads."""
    W_U = anatomy.W_U
    cols = W_U[:, ids.to(W_U.device)].T.to(anatomy.compute_dtype)
    return cols - W_U.mean(-1).to(cols)


def node_table(enc: Encoded, n_layers: int, tokens: Tensor, logit_ids: Tensor) -> tuple[Node, ...]:
    """Step 4: features, MLP errors (layer-major), token embeddings, logits."""
    feats = [transcoder(*lpf) for lpf in zip(enc.layer.tolist(), enc.pos.tolist(), enc.index.tolist())]
    n_pos = int(tokens.numel())
    errs = [mlp_error(layer, p) for layer in range(n_layers) for p in range(n_pos)]
    toks = [token(p, t) for p, t in enumerate(tokens.tolist())]
    return (*feats, *errs, *toks, *(logit(n_layers, n_pos - 1, t) for t in logit_ids.tolist()))


# -- step 5: the linear replacement model, backwards --------------------------------------------------------


def _scaled(norm: Norm, y: Tensor, scale: Tensor) -> Tensor:
    """Transpose of a norm without its gain (the 'normalized' site): y * scale, centred for LayerNorm."""
    out = y * scale.unsqueeze(-1)
    return out - out.mean(-1, keepdim=True) if norm.kind == "layernorm" else out


def input_adjoint(site: str, norm: Norm, g: Tensor, scale: Tensor) -> Tensor:
    """Cotangent at the transcoder input site [..., pos, d_model] -> at the residual after attention."""
    if site == "resid_mid":
        return g
    return norm_adjoint(norm, g, scale) if site == "mlp_in" else _scaled(norm, g, scale)


def attention_adjoint(an: Anatomy, trace: Trace, layer: int, g: Tensor) -> Tensor:
    """Cotangent at the residual after attention [b, pos, d_model] -> what flows into checkpoint `layer`
    through frozen attention (pattern, norms) alone."""
    ly = an.layers[layer]
    if ly.post_attn is not None:
        assert trace.scale_post_attn is not None
        g = norm_adjoint(ly.post_attn, g, trace.scale_post_attn[layer])
    gz = torch.einsum("bqd,hed->bhqe", g, ly.W_O)
    gv = torch.einsum("hqk,bhqe->bhke", trace.pattern(layer).to(gz), gz)
    gkv = gv.new_zeros(gv.shape[0], ly.n_kv_heads, *gv.shape[2:]).index_add_(1, ly.kv_index(), gv)
    gx = torch.einsum("bhke,hde->bkd", gkv, ly.W_V)
    return norm_adjoint(ly.ln_attn, gx, trace.scale_ln_attn[layer])


def output_cotangent(an: Anatomy, trace: Trace, site: str, layer: int, g: Tensor) -> Tensor:
    """Cotangent at checkpoint layer + 1 -> at the MLP output site of `layer` (through a frozen post-norm)."""
    post = an.layers[layer].post_mlp
    if site == "mlp_out" or post is None:
        return g
    assert trace.scale_post_mlp is not None
    return norm_adjoint(post, g, trace.scale_post_mlp[layer])


def _decoder(ts: TranscoderSet, l_in: int, l_out: int) -> Tensor:
    return ts.clt.decoder(l_in, l_out) if ts.clt is not None else ts[l_in].W_dec


def _encoder(ts: TranscoderSet, layer: int, index: Tensor) -> Tensor:
    W = ts.clt.W_enc[layer] if ts.clt is not None else ts[layer].W_enc
    return W[:, index.to(W.device)].T


def _skip_adjoint(ts: TranscoderSet, layer: int, g: Tensor) -> Tensor:
    W = ts.clt.W_skip[layer] if ts.clt is not None and ts.clt.W_skip is not None else None
    if ts.clt is None and ts[layer].W_skip is not None:
        W = ts[layer].W_skip
    return torch.zeros_like(g) if W is None else g @ W.to(g).T


@dataclass(frozen=True, eq=False)
class Replacement:
    """Everything the backward sweep reads: the model at its frozen trace, the transcoders, the sources."""

    anatomy: Anatomy
    trace: Trace
    transcoders: TranscoderSet
    enc: Encoded
    token_vectors: Tensor  # [pos, d_model]

    def read_layer(self, layer: int, g_site: Tensor, out: Tensor) -> None:
        """Edges from layer `layer`'s sources (features writing there, its errors) into the chunk's rows."""
        enc, ts = self.enc, self.transcoders
        n_pos = g_site.shape[1]
        err_col = self.enc.layer.numel() + layer * n_pos
        out[:, err_col : err_col + n_pos] += torch.einsum("bpd,pd->bp", g_site, enc.errors[layer].to(g_site))
        for l_in in range(layer + 1):
            if layer not in ts.writes(l_in):
                continue
            cols = (enc.layer == l_in).nonzero()[:, 0]
            if cols.numel() == 0:
                continue
            dec = _decoder(ts, l_in, layer)
            vec = enc.act[cols, None].to(g_site) * dec[enc.index[cols].to(dec.device)].to(g_site)
            for p in enc.pos[cols].unique().tolist():
                at = enc.pos[cols] == p
                out[:, cols[at]] += g_site[:, p] @ vec[at].T

    def rows(self, start: Tensor, pos: Tensor, inject: Tensor, n_cols: int) -> Tensor:
        """Rows [b, n_cols] for targets entering at layer `start` (n_layers: the final norm's output) and
        position `pos`, with input direction `inject` [b, d_model]."""
        an, trace, ts = self.anatomy, self.trace, self.transcoders
        b, n_pos, n = len(start), trace.n_pos, an.n_layers
        out = inject.new_zeros(b, n_cols)
        g = inject.new_zeros(b, n_pos, an.d_model)
        top = start == n
        if bool(top.any()):
            g[top, pos[top]] = norm_adjoint(an.final_norm, inject[top], trace.scale_final[pos[top]])
        for layer in range(min(int(start.max()), n - 1), -1, -1):
            g_site = output_cotangent(an, trace, ts.output_site, layer, g)
            self.read_layer(layer, g_site, out)
            gx = _skip_adjoint(ts, layer, g_site)
            here = start == layer
            gx[here, pos[here]] += inject[here]
            g = g + input_adjoint(ts.input_site, an.layers[layer].ln_mlp, gx, trace.scale_ln_mlp[layer])
            g = g + attention_adjoint(an, trace, layer, g)
        tok_col = self.enc.layer.numel() + n * n_pos
        out[:, tok_col : tok_col + n_pos] = torch.einsum("bpd,pd->bp", g, self.token_vectors.to(g))
        return out


def token_vectors(anatomy: Anatomy, tokens: Tensor) -> Tensor:
    """The token embeddings as they enter the residual (Gemma's scale included, learned positions not)."""
    emb = anatomy.W_E[tokens.to(anatomy.W_E.device)]
    if anatomy.embed_scale is not None:
        emb = emb * torch.tensor(anatomy.embed_scale, dtype=emb.dtype, device=emb.device)
    return emb.to(anatomy.compute_dtype)


def adjacency_rows(rep: Replacement, logit_vecs: Tensor, batch_size: int | None = None) -> Tensor:
    """Step 5: the adjacency [node, node], column by column (`replacement_sweep`: every source's write pushed
    up the frozen model, read by every feature and logit above it), returned as the transpose of the
    source-major buffer it fills. `batch_size`: sources per chunk (default: what keeps a chunk's residuals
    and columns near 16 M numbers, 64 MiB in float32)."""
    enc, an, trace = rep.enc, rep.anatomy, rep.trace
    n_feat, n_pos, n_logit = enc.layer.numel(), trace.n_pos, logit_vecs.shape[0]
    n_nodes = n_feat + (an.n_layers + 1) * n_pos + n_logit
    dt = enc.errors.dtype
    width = max(8, -(-n_pos // BUCKETS))
    src = sources(rep.transcoders, enc.layer, enc.pos, enc.index, enc.act, enc.errors, rep.token_vectors, width)
    rd = reads(an, trace, rep.transcoders, enc.layer, enc.pos, enc.index, logit_vecs, dt)
    attention = tuple(Attention.of(an, trace, layer, dt) for layer in range(an.n_layers))
    sweep = Sweep(an, trace, rep.transcoders, attention, rd, enc.act, enc.index)
    if batch_size is None:
        batch_size = max(16, (16 << 20) // (n_pos * an.d_model + n_nodes))
    by_source = enc.errors.new_empty(n_nodes, n_nodes)  # [source, target]: every source row written below
    covered = torch.zeros(n_nodes, dtype=torch.bool, device=by_source.device)
    covered[src.col] = True
    by_source.index_fill_(0, (~covered).nonzero()[:, 0], 0)  # the logits and the zeroed positions' errors
    out = enc.errors.new_empty(min(batch_size, len(src.col)), n_nodes)
    for chunk in src.chunks(width, batch_size):
        b = len(chunk.col)
        out[:b].zero_()
        sweep.chunk(chunk, out[:b])
        cuts = [0, *((chunk.col[1:] - chunk.col[:-1]) != 1).nonzero()[:, 0].add(1).tolist(), b]
        for c0, a, e in zip(chunk.col[cuts[:-1]].tolist(), cuts[:-1], cuts[1:]):  # runs of consecutive columns
            by_source[c0 : c0 + e - a] = out[a:e]
    return by_source.T


def adjacency_by_rows(rep: Replacement, logit_vecs: Tensor, batch_size: int) -> Tensor:
    """The same adjacency row by row (`Replacement.rows`, backwards from each target): the slower route
    strategy 2 builds on, kept as a cross-check of the column sweep."""
    enc, an = rep.enc, rep.anatomy
    n_feat, n_pos, n_logit = enc.layer.numel(), rep.trace.n_pos, logit_vecs.shape[0]
    n_nodes = n_feat + (an.n_layers + 1) * n_pos + n_logit
    dev = enc.errors.device
    start = torch.cat([torch.full((n_logit,), an.n_layers, device=dev), enc.layer.to(dev)])
    pos = torch.cat([torch.full((n_logit,), n_pos - 1, device=dev), enc.pos.to(dev)])
    row = torch.cat([torch.arange(n_logit, device=dev) + n_nodes - n_logit, torch.arange(n_feat, device=dev)])
    order = torch.argsort(start, descending=True, stable=True)
    adjacency = enc.errors.new_zeros(n_nodes, n_nodes)
    for chunk in order.split(batch_size):
        is_logit = row[chunk] >= n_feat
        inject = enc.errors.new_empty(len(chunk), an.d_model)
        inject[is_logit] = logit_vecs[row[chunk][is_logit] - (n_nodes - n_logit)].to(inject)
        f = row[chunk][~is_logit]
        for layer in enc.layer[f].unique().tolist():
            at = (~is_logit).nonzero()[:, 0][enc.layer[f] == layer]
            inject[at] = _encoder(rep.transcoders, layer, enc.index[row[chunk][at]]).to(inject)
        adjacency[row[chunk], : n_nodes - n_logit] = rep.rows(start[chunk], pos[chunk], inject, n_nodes - n_logit)
    return adjacency


def transcoder_graph(
    model: Model,
    transcoders: TranscoderSet,
    prompt: str | Sequence[int] | Tensor | Trace,
    *,
    logit_ids: Tensor | None = None,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    zero_positions: int = 1,
    batch_size: int | None = None,
) -> TranscoderGraph:
    """The unpruned transcoder attribution graph of `prompt` (or of a `Trace` already run), as circuit-tracer's
    `attribute()` computes it (every active feature a row): see the module docstring for the steps.
    `logit_ids`: the logit targets (default: the top tokens covering `desired_logit_prob`, at most
    `max_n_logits`)."""
    if transcoders.layers != tuple(range(model.n_layers)):
        raise SAEMismatchError(
            f"a transcoder graph replaces every MLP, but transcoders cover layers {transcoders.layers} of "
            f"{model.n_layers}: load one transcoder per layer"
        )
    t0 = time.perf_counter()
    trace = prompt if isinstance(prompt, Trace) else model.run(prompt)
    s = sites(model, trace, transcoders)
    enc = encode(transcoders, s, zero_positions)
    log.info("transcoder graph: %d active features over %d positions", enc.layer.numel(), trace.n_pos)
    if logit_ids is None:
        ids, probs, vecs = salient_logits(model.anatomy, trace, max_n_logits, desired_logit_prob)
    else:
        ids = logit_ids.to(trace.last_logits.device)
        probs = torch.softmax(trace.last_logits.float(), dim=-1)[ids]
        vecs = logit_vectors(model.anatomy, ids)
    rep = Replacement(model.anatomy, trace, transcoders, enc, token_vectors(model.anatomy, trace.tokens))
    with torch.no_grad():
        adjacency = adjacency_rows(rep, vecs, batch_size)
    log.info("transcoder graph: %d rows in %.2fs", enc.layer.numel() + len(ids), time.perf_counter() - t0)
    nodes = node_table(enc, model.n_layers, trace.tokens, ids)
    return TranscoderGraph(nodes, adjacency, enc, trace.tokens, ids, probs)
