"""QK attributions on transcoder graphs: a head's score split over the writers of the residual it reads.

Without residual-stream SAEs, the residual at the input of layer l is the sum of everything that wrote it:

    resid[l] = token + position + sum over j < l of (attn_out_j + features writing j + tc_bias_j + mlp_error_j)

- token: the token embedding (Gemma's scale included), the graph's `token/c0/p5/t412`; position: the
  learned position embedding where the model has one (GPT-2), `pos_embed/c0/p5`.
- attn_out_j: attention layer j's whole output at the position (every head, its biases, a post-attention
  norm at its frozen scale), `attn_out/l2/p5`: one term per layer.
- features: each transcoder feature's activation times its decoder row into layer j's MLP output (through
  a frozen post-MLP norm where the set writes before it), summed over the layers j < l it writes (a
  cross-layer transcoder's feature writes several): the graph's node `transcoder/l1/p5/f12`.
- tc_bias_j: the transcoder's decoder bias plus its skip term, `tc_bias/l2/p5`.
- mlp_error_j: the rest of the MLP's output, `mlp_error/l2/p5`, so the parts sum to the residual exactly.
  Features are encoded as the graph encodes them: at the positions it zeroes (the first, as
  circuit-tracer does) no feature is active, and the MLP error holds the MLP's output less tc_bias.
- With attention-output SAEs (a checkpointed graph, `strategy2`), attn_out_j splits the same way over its
  SAE: each attention feature's activation times its decoder row (`attn/l2/p5/f12`, the graph's node; a
  hook_z row through W_O head by head), the SAE's b_dec there plus the layer's b_O (`attn_sae_bias/l2/p5`),
  both through a post-attention norm at its frozen scale where the SAE reads before it, and the rest
  (`attn_error/l2/p5`: the graph's attention error, except at the zeroed positions, where it holds the
  whole output less attn_sae_bias).

1. `residual_writers`: per traced prompt, what each layer's attention and MLP added, and the encodings.
2. `project_writers`: one side of one head at some positions: every writer through the attention-input
   norm linearised at its position's frozen scale and W_Q / W_K (plus the head's constant part), one
   layer j at a time, so only [features, d_model] of one layer is ever held.
3. `qk.finish_side` and `qk.attribution`: QK-norm, rotary, terms and their sums, as for SAE components.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.model import Model
from ..models.trace import Trace
from ..nodes import CODE, Kind, Node
from ..qk import QKAttribution, SideComponents, attribution, check_row, finish_side, head_constant, head_weights
from ..saes.attention import AttentionSAESet
from ..saes.transcoder import TranscoderSet
from .edges import norm_adjoint
from .graph import Graph
from .replacement import Encoded, Sites, encode, input_adjoint, logit_vectors, sites, token_vectors
from .strategy2 import AttentionEncoded, attention_inputs, encode_attention

Project = Callable[[Tensor, Tensor], Tensor]  # vectors [n, d_model] at positions [n] -> [n, d_head]

TOKEN, POS_EMBED, ATTN_OUT, TRANSCODER, TC_BIAS, MLP_ERROR, HEAD_BIAS, ATTN_FEATURE, ATTN_ERROR, ATTN_SAE_BIAS = (
    CODE[k] for k in (Kind.TOKEN, Kind.POS_EMBED, Kind.ATTN_OUT, Kind.TRANSCODER, Kind.TC_BIAS, Kind.MLP_ERROR,
                      Kind.HEAD_BIAS, Kind.ATTN_FEATURE, Kind.ATTN_ERROR, Kind.ATTN_SAE_BIAS)
)  # fmt: skip


@dataclass(frozen=True, eq=False)
class ResidualWriters:
    """Step 1: what wrote the residual of one traced prompt, per layer [pos, d_model], and the encodings."""

    transcoders: TranscoderSet
    sites: Sites
    enc: Encoded
    tokens: Tensor  # [pos, d_model] token embeddings as they enter the residual
    attn: tuple[Tensor, ...]  # per layer: what attention added
    mlp: tuple[Tensor, ...]  # per layer: what the MLP added (after a post-MLP norm)
    attention: AttentionSAESet | None = None  # attention-output SAEs (a checkpointed graph's), every layer
    att: AttentionEncoded | None = None  # their features, encoded as the checkpointed graph encodes them

    @property
    def nbytes(self) -> int:
        parts = (*self.attn, *self.mlp, *self.sites.x, *self.sites.y, self.tokens, self.enc.errors, self.enc.act)
        if self.att is not None:
            parts += (*self.att.errors, self.att.act)
        return sum(t.numel() * t.element_size() for t in parts)


def residual_writers(
    model: Model, trace: Trace, transcoders: TranscoderSet, zero_positions: int = 1,
    attention_saes: AttentionSAESet | None = None,
) -> ResidualWriters:  # fmt: skip
    """Step 1 (the graph's `sites` and `encode`, and each block's two writes; with `attention_saes`, their
    encodings as `strategy2` makes them)."""
    s = sites(model, trace, transcoders)
    an = model.anatomy
    mlp = []
    for layer, ly in enumerate(an.layers):
        out = trace.mlp_out[layer]
        if ly.post_mlp is not None:
            assert trace.scale_post_mlp is not None
            out = ly.post_mlp(out, trace.scale_post_mlp[layer])
        mlp.append(out)
    attn = tuple(trace.resid[j + 1] - mlp[j] - trace.resid[j] for j in range(an.n_layers))
    tokens = token_vectors(an, trace.tokens).to(trace.resid[0])
    att = None
    if attention_saes is not None:
        att = encode_attention(attention_saes, attention_inputs(an, trace, attention_saes), zero_positions)
    enc = encode(transcoders, s, zero_positions)
    return ResidualWriters(transcoders, s, enc, tokens, attn, tuple(mlp), attention_saes, att)


def _to_residual(model: Model, trace: Trace, ts: TranscoderSet, j: int, v: Tensor, pos: Tensor) -> Tensor:
    """Vectors [n, d_model] at layer j's output site -> what they add to the residual (the post-MLP norm,
    linear at its frozen scale, where the set writes before it)."""
    post = model.anatomy.layers[j].post_mlp
    if ts.output_site == "mlp_out" or post is None:
        return v
    assert trace.scale_post_mlp is not None
    scale = trace.scale_post_mlp[j]
    return post.linear(v, scale[pos.to(scale.device)].to(v))


def _decoder_rows(ts: TranscoderSet, l_in: int, j: int, index: Tensor) -> Tensor:
    dec = ts.clt.decoder(l_in, j) if ts.clt is not None else ts[l_in].W_dec
    return dec[index.to(dec.device)]


def _constant_part(model: Model, trace: Trace, w: ResidualWriters, j: int, P: Tensor) -> Tensor:
    """tc_bias_j at positions P [pos, d_model]: b_dec plus the skip term (plus a post-MLP norm's bias)."""
    ts = w.transcoders
    x = w.sites.x[j][P]
    d_sae = ts.clt.d_sae if ts.clt is not None else ts[j].d_sae
    zeros = [x.new_zeros(len(P), d_sae) for _ in range(j + 1)]
    const = _to_residual(model, trace, ts, j, ts.decode_into(j, zeros, x if ts.has_skip else None).to(x), P)
    post = model.anatomy.layers[j].post_mlp
    if ts.output_site == "mlp_module_out" and post is not None and post.bias is not None:
        const = const + post.bias.to(const)
    return const


def _post_attention(model: Model, trace: Trace, j: int, v: Tensor, pos: Tensor) -> Tensor:
    """Vectors [n, d_model] written by attention layer j -> what they add to the residual (a post-attention
    norm, linear at its frozen scale)."""
    post = model.anatomy.layers[j].post_attn
    if post is None:
        return v
    assert trace.scale_post_attn is not None
    scale = trace.scale_post_attn[j]
    return post.linear(v, scale[pos.to(scale.device)].to(v))


def _attention_parts(
    model: Model, trace: Trace, w: ResidualWriters, j: int, P: Tensor, slot: Tensor, through: Project
) -> tuple[tuple[Tensor, Tensor, Tensor], list[tuple[int, int, Tensor]]]:
    """Attention layer j's write at positions P split over its SAE: ((pos, index, projection) of its active
    features there, [(ATTN_SAE_BIAS, j, projection), (ATTN_ERROR, j, projection)]). A hook_z vector reaches
    the residual through W_O head by head (b_O joins b_dec) and the post-attention norm; an attn_out one as is."""
    assert w.att is not None and w.attention is not None
    att, sae, dev, cdt = w.att, w.attention[j], P.device, w.attn[j].dtype
    W_O = model.anatomy.layers[j].W_O.to(dev, cdt)
    out = lambda v, pos: _post_attention(model, trace, j, torch.einsum("nhe,hed->nd", sae.heads(v), W_O), pos)  # noqa: E731
    to_residual = out if sae.site == "z" else lambda v, pos: v
    rows = ((att.layer == j) & torch.isin(att.pos, P.to(att.pos.device))).nonzero().squeeze(1)
    pos, index = att.pos[rows].to(dev), att.index[rows].to(dev)
    v = att.act[rows, None].to(dev, cdt) * sae.W_dec[index.to(sae.W_dec.device)].to(dev, cdt)
    v = to_residual(v, pos)
    written = v.new_zeros(len(P), v.shape[1]).index_add_(0, slot[pos], v)
    const = to_residual(sae.b_dec.to(dev, cdt).expand(len(P), -1), P)
    if sae.site == "z":
        const = const + _post_attention(model, trace, j, model.anatomy.layers[j].b_O.to(dev, cdt).expand(len(P), -1), P)
    error = w.attn[j][P].to(dev, cdt) - written - const
    return (pos, index, through(v, pos)), [(ATTN_SAE_BIAS, j, through(const, P)), (ATTN_ERROR, j, through(error, P))]


def project_writers(
    model: Model, trace: Trace, w: ResidualWriters, layer: int, W: Tensor, positions: Sequence[int]
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """Step 2: ((kind, pos, index, layer) columns, projections [component, d_head] before QK-norm and rotary)
    of every writer of the residual at the input of `layer`, at `positions`, through W [d_model, d_head]."""
    ly, dev, cdt = model.anatomy.layers[layer], W.device, W.dtype
    P = torch.as_tensor(list(positions), dtype=torch.long, device=dev)
    s_ln = trace.scale_ln_attn[layer].to(dev, cdt)
    through = lambda v, pos: ly.ln_attn.linear(v.to(dev, cdt), s_ln[pos]) @ W  # noqa: E731  [n, d_model] -> [n, d_head]
    enc, ts = w.enc, w.transcoders
    sel = (torch.isin(enc.pos.to(dev), P) & (enc.layer.to(dev) < layer)).nonzero().squeeze(1)
    f_layer, f_pos, f_index = (t.to(dev)[sel] for t in (enc.layer, enc.pos, enc.index))
    f_act = enc.act.to(dev, cdt)[sel]
    f_proj = W.new_zeros(len(sel), W.shape[1])
    slot = torch.full((trace.n_pos,), -1, dtype=torch.long, device=dev)
    slot[P] = torch.arange(len(P), device=dev)
    parts: list[tuple[int, int, Tensor]] = [(TOKEN, 0, through(w.tokens[P], P))]
    if model.anatomy.W_pos is not None:
        parts.append((POS_EMBED, 0, through(trace.resid[0][P] - w.tokens[P], P)))
    attn_feats: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []  # (layer, pos, index, projection) per layer
    for j in range(layer):
        if w.att is None:
            parts.append((ATTN_OUT, j, through(w.attn[j][P], P)))
        else:
            (a_pos, a_index, a_proj), a_parts = _attention_parts(model, trace, w, j, P, slot, through)
            attn_feats.append((torch.full_like(a_pos, j), a_pos, a_index, a_proj))
            parts += a_parts
        written = W.new_zeros(len(P), W.shape[0])  # [pos, d_model] what the features wrote into j
        for l_in in range(j + 1):
            rows = (f_layer == l_in).nonzero().squeeze(1)
            if j not in ts.writes(l_in) or len(rows) == 0:
                continue
            v = f_act[rows, None] * _decoder_rows(ts, l_in, j, f_index[rows]).to(dev, cdt)
            v = _to_residual(model, trace, ts, j, v, f_pos[rows])
            f_proj[rows] += through(v, f_pos[rows])
            written.index_add_(0, slot[f_pos[rows]], v)
        const = _constant_part(model, trace, w, j, P).to(dev, cdt)
        error = w.mlp[j][P].to(dev, cdt) - written - const
        parts += [(TC_BIAS, j, through(const, P)), (MLP_ERROR, j, through(error, P))]
    n = len(P)
    feats = [(torch.full_like(f_pos, TRANSCODER), f_layer, f_pos, f_index, f_proj)]
    feats += [(torch.full_like(p, ATTN_FEATURE), ly_, p, i, pr) for ly_, p, i, pr in attn_feats]
    kind = torch.cat([*(f[0] for f in feats), *(torch.full_like(P, k) for k, _, _ in parts),
                      torch.full_like(P, HEAD_BIAS)])  # fmt: skip
    pos = torch.cat([*(f[2] for f in feats), P.repeat(len(parts) + 1)])
    lay = torch.cat([*(f[1] for f in feats), *(torch.full_like(P, j) for _, j, _ in parts), torch.full_like(P, layer)])
    none = torch.full((n * len(parts),), -1, dtype=torch.long, device=dev)
    index = torch.cat([*(f[3] for f in feats), trace.tokens.to(dev)[P], none])
    proj = torch.cat([*(f[4] for f in feats), *(p for _, _, p in parts), W.new_zeros(n, W.shape[1])])
    return (kind, pos, index, lay), proj


def transcoder_qk_attribution(
    model: Model,
    trace: Trace,
    writers: ResidualWriters,
    layer: int,
    head: int,
    query_pos: int,
    key_pos: int | Sequence[int] | None = None,
) -> QKAttribution:
    """Head (layer, head)'s scores from `query_pos` to `key_pos` (None: every key it may see) as a sum of
    (query writer x key writer) terms; every other `QKAttribution` answer (marginals, contrast, probability
    effects, the rotary share) reads the same."""
    row = check_row(model, trace, layer, head, query_pos, key_pos)
    layer, head, q, keys = row
    sides = []
    for side, positions in (("q", [q]), ("k", keys)):
        h, W, b = head_weights(model, layer, head, side)
        (kind, pos, index, lay), proj = project_writers(model, trace, writers, layer, W, positions)
        proj[kind == HEAD_BIAS] = head_constant(model, layer, W, b)
        sides.append(finish_side(model, trace, layer, h, side, layer, (kind, pos, index, lay), proj))
    att = attribution(model, trace, row, sides[0], sides[1])
    return dataclasses.replace(att, writer_labels=_writer_labels(writers.transcoders, sides))


def _writer_labels(transcoders: TranscoderSet, sides: list[SideComponents]) -> dict[tuple[int, int], str]:
    """The labels the transcoders hold for the transcoder features among `sides`' components, by (layer, index)."""
    out: dict[tuple[int, int], str] = {}
    for s in sides:
        assert s.layer is not None  # writers carry their own layers
        chosen = s.kind == TRANSCODER
        for ly, i in zip(s.layer[chosen].tolist(), s.feature[chosen].tolist(), strict=True):
            clt = transcoders.clt
            own = clt.labels.get((ly, i)) if clt is not None else transcoders[ly].labels.get(i)
            if own:
                out[(ly, i)] = own
    return out


# -- which head a transcoder graph's node is traced through ----------------------------------------------------


def _read_direction(model: Model, trace: Trace, ts: TranscoderSet, node: Node) -> tuple[Tensor, int] | None:
    """(how `node` reads the residual at its position [d_model], through its frozen norm; how many attention
    layers write that residual), for a transcoder feature or a logit; None for other kinds."""
    an, q = model.anatomy, node.pos
    if node.kind is Kind.TRANSCODER:
        W_enc = ts.clt.W_enc[node.layer] if ts.clt is not None else ts[node.layer].W_enc  # [d_model, d_sae]
        enc = W_enc[:, node.index][None]  # [1, d_model]
        scale = trace.scale_ln_mlp[node.layer][q : q + 1]
        g = input_adjoint(ts.input_site, an.layers[node.layer].ln_mlp, enc.to(scale.device, scale.dtype), scale)
        return g[0], node.layer + 1
    if node.kind is Kind.LOGIT:
        vec = logit_vectors(an, torch.tensor([node.index], device=an.W_U.device))
        scale = trace.scale_final[q : q + 1]
        return norm_adjoint(an.final_norm, vec.to(scale.device, vec.dtype), scale)[0], an.n_layers
    return None


def direct_carrier(model: Model, trace: Trace, ts: TranscoderSet, graph: Graph, t: int) -> tuple[int, int, int] | None:
    """(layer, head, key position) to trace node `t` of a transcoder graph through, which has no head loadings:
    the key is the source position of the most influence among the kept cross-position edges into `t`; the
    head is the one whose output at t's position from that key -- pattern x (key residual through its frozen
    norm, W_V, W_O) -- moves t's input direction the most directly (paths through later MLPs not counted).
    None when no kept edge into `t` crosses positions."""
    node = graph.nodes[t].node
    pos = [n.node.pos for n in graph.nodes]
    per_key: dict[int, float] = {}
    for e in (graph.target == t).nonzero().flatten().tolist():
        k = pos[int(graph.source[e])]
        if k != node.pos:
            per_key[k] = per_key.get(k, 0.0) + float(graph.influence[e])
    read = _read_direction(model, trace, ts, node)
    if not per_key or read is None:
        return None
    key = max(per_key, key=lambda k: (per_key[k], -k))
    g, n_attn = read
    best: tuple[float, int, int] = (-1.0, 0, 0)
    for j in range(n_attn):
        ly = model.anatomy.layers[j]
        x = ly.ln_attn(trace.resid[j][key : key + 1], trace.scale_ln_attn[j][key : key + 1])[0]  # [d_model]
        v = torch.einsum("d,hde->he", x.to(ly.W_V), ly.W_V)[ly.kv_index()]  # [head, d_head]
        p = trace.pattern(j, node.pos, list(range(ly.n_heads)))[0, :, key]  # [head]
        out = torch.einsum("he,hed->hd", v, ly.W_O) * p[:, None].to(v)  # [head, d_model]
        if ly.post_attn is not None:
            assert trace.scale_post_attn is not None
            out = ly.post_attn.linear(out, trace.scale_post_attn[j][node.pos].to(out))
        effect = (out @ g.to(out)).abs()
        h = int(effect.argmax())
        if float(effect[h]) > best[0]:
            best = (float(effect[h]), j, h)
    return best[1], best[2], key
