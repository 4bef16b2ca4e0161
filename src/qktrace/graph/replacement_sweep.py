"""The plain transcoder graph's adjacency, a column at a time: every source's write pushed up the frozen model.

Frozen (patterns, norm scales) with MLPs replaced by transcoders, the model is linear between a source's
write and a target's read, so edge(target, source) = <read vector of the target, J * write of the source>.
`replacement.Replacement.rows` computes rows (targets, backwards); this module computes the same numbers as
columns (sources, forwards), which costs less: a feature target at layer L goes back through L + 1
attention layers (its own included), a feature source at layer l forward through n_layers - 1 - l, and
the top layer's sources reach only the logits.

1. Sources (`sources`), grouped by the layer they first write at (tokens: -1) and by position bucket: a
   source at position p touches positions >= p only (causal attention), so a bucket starting at `lo`
   runs on positions [lo, n_pos) alone. Zero writes (the zeroed positions' errors) are skipped.
2. Reads (`reads`): each feature target's encoder direction pulled back through its input site's frozen
   norm (so a layer's targets read the residual after attention directly), per (layer, position) a
   contiguous block of adjacency rows; the logits' demeaned unembedding columns through the frozen final
   norm, read at the last position.
3. Sweep (`sweep`): per chunk of sources h [b, pos, d_model] starts at zero; at each layer, for the sources
   already written (a prefix of the chunk, sorted by layer): frozen attention forward (norm, W_V, pattern,
   W_O, post-norm), the layer's reads, the skip term, then the writes at this layer's MLP output (a
   cross-layer transcoder's features write again at every later layer). At the top the logits read.
4. Columns land in the adjacency (`adjacency[target, source]`) by one index_copy per chunk.

Memory follows the question: h is [chunk, pos, d_model]; the chunk is `batch_size` sources.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.anatomy import Anatomy, Norm
from ..models.trace import Trace
from ..saes.transcoder import TranscoderSet
from .edges import norm_adjoint


def decoder(ts: TranscoderSet, l_in: int, l_out: int) -> Tensor:
    """The decoder [d_sae, d_model] of features read at `l_in` into layer `l_out`'s MLP output."""
    return ts.clt.decoder(l_in, l_out) if ts.clt is not None else ts[l_in].W_dec


def encoder(ts: TranscoderSet, layer: int, index: Tensor) -> Tensor:
    """The encoder directions [n, d_model] of features `index` at `layer`."""
    W = ts.clt.W_enc[layer] if ts.clt is not None else ts[layer].W_enc
    return W[:, index.to(W.device)].T


def skip_matrix(ts: TranscoderSet, layer: int) -> Tensor | None:
    """The skip term's matrix at `layer` (skip = x @ W), or None."""
    if ts.clt is not None:
        return ts.clt.W_skip[layer] if ts.clt.W_skip is not None else None
    return ts[layer].W_skip


def norm_forward(norm: Norm | None, x: Tensor, scale: Tensor) -> Tensor:
    """A norm at frozen scales without its bias: x [..., d_model], scale [...]."""
    return x if norm is None else norm.linear(x, scale)


def input_forward(site: str, norm: Norm, h: Tensor, scale: Tensor) -> Tensor:
    """The residual after attention -> the transcoder input at `site` (the transpose of `input_adjoint`)."""
    if site == "resid_mid":
        return h
    if site == "mlp_in":
        return norm.linear(h, scale)
    h = h - h.mean(-1, keepdim=True) if norm.kind == "layernorm" else h
    return h * scale.unsqueeze(-1)


def input_pullback(site: str, norm: Norm, g: Tensor, scale: Tensor) -> Tensor:
    """A read direction at the transcoder input `site` -> at the residual after attention."""
    if site == "resid_mid":
        return g
    if site == "mlp_in":
        return norm_adjoint(norm, g, scale)
    out = g * scale.unsqueeze(-1)
    return out - out.mean(-1, keepdim=True) if norm.kind == "layernorm" else out


@dataclass(frozen=True, eq=False)
class Attention:
    """One layer's frozen attention as three matrices: x [.., d] @ WV -> per query head values,
    the pattern [head, q, k], and [head * d_head, d_model] @ WO."""

    WV: Tensor  # [d_model, head * d_head], kv heads repeated per query head
    A: Tensor  # [head, q, k]
    WO: Tensor  # [head * d_head, d_model]

    @staticmethod
    def of(an: Anatomy, trace: Trace, layer: int, dtype: torch.dtype) -> Attention:
        ly = an.layers[layer]
        h, e, d = ly.W_O.shape
        WV = ly.W_V[ly.kv_index()].permute(1, 0, 2).reshape(d, h * e)
        return Attention(WV.to(dtype).contiguous(), trace.pattern(layer).to(dtype), ly.W_O.reshape(h * e, d).to(dtype))

    def forward(self, x: Tensor, lo: int) -> Tensor:
        """x [b, pos, d_model] (positions lo..) -> the attention output, by the frozen pattern."""
        b, m, d = x.shape
        heads = self.A.shape[0]
        e = self.WO.shape[0] // heads
        v = (x.reshape(b * m, d) @ self.WV).view(b, m, heads, e).permute(2, 1, 0, 3).reshape(heads, m, b * e)
        z = torch.bmm(self.A[:, lo:, lo:], v).view(heads, m, b, e).permute(2, 1, 0, 3).reshape(b * m, heads * e)
        return (z @ self.WO).view(b, m, d)


@dataclass(frozen=True, eq=False)
class Sources:
    """Every source in sweep order (by position bucket, then layer, then column): its adjacency column,
    the layer it first writes at (tokens -1), its position and, for features, its row in `enc`."""

    col: Tensor  # [source]
    layer: Tensor
    pos: Tensor
    feature: Tensor  # row in the encoding, -1 for errors and tokens
    vec: Tensor  # [source, d_model]: the write at its first layer (tokens: the embedding)

    def chunks(self, width: int, batch_size: int) -> list[Sources]:
        """The sweep's chunks: each position bucket [b * width, (b + 1) * width) in pieces of `batch_size`."""
        bucket = self.pos // width
        cuts = torch.searchsorted(bucket, torch.arange(int(bucket.max()) + 2, device=bucket.device)).tolist()
        out = []
        for a, b in zip(cuts[:-1], cuts[1:]):
            for s in range(a, b, batch_size):
                e = min(s + batch_size, b)
                out.append(Sources(self.col[s:e], self.layer[s:e], self.pos[s:e], self.feature[s:e], self.vec[s:e]))
        return out


def sources(ts: TranscoderSet, enc_layer: Tensor, enc_pos: Tensor, enc_index: Tensor, act: Tensor,
            errors: Tensor, token_vecs: Tensor, width: int) -> Sources:  # fmt: skip
    """Step 1: features (activation x decoder row at their own layer), the non-zero MLP errors and the
    token embeddings, sorted by position bucket, layer (tokens -1) and adjacency column."""
    n_layers, n_pos, d = errors.shape
    n_feat = enc_layer.numel()
    dev, dt = errors.device, errors.dtype
    fvec = errors.new_empty(n_feat, d)
    for layer in enc_layer.unique().tolist():
        at = (enc_layer == layer).nonzero()[:, 0]
        dec = decoder(ts, layer, layer)
        fvec[at] = act[at, None].to(dt) * dec[enc_index[at].to(dec.device)].to(dev, dt)
    flat = errors.reshape(n_layers * n_pos, d)
    keep = (flat != 0).any(-1).nonzero()[:, 0]
    grid = torch.arange(n_pos, device=dev)
    col = torch.cat([torch.arange(n_feat, device=dev), n_feat + keep, n_feat + n_layers * n_pos + grid])
    layer = torch.cat([enc_layer.to(dev), keep // n_pos, torch.full_like(grid, -1)])
    pos = torch.cat([enc_pos.to(dev), keep % n_pos, grid])
    feature = torch.cat([torch.arange(n_feat, device=dev), torch.full_like(keep, -1), torch.full_like(grid, -1)])
    vec = torch.cat([fvec, flat[keep], token_vecs.to(dev, dt)])
    order = torch.argsort(col)  # already sorted; then by layer, then by bucket, each stable
    order = order[torch.argsort(layer[order], stable=True)]
    order = order[torch.argsort(pos[order] // width, stable=True)]
    return Sources(col[order], layer[order], pos[order], feature[order], vec[order])


@dataclass(frozen=True, eq=False)
class Reads:
    """Step 2: per layer, (position, first row, end row, read directions [n, d_model]) of its feature
    targets (rows of the adjacency); the logits' rows and directions at the last position."""

    features: tuple[tuple[tuple[int, int, int, Tensor], ...], ...]
    logit_row: int
    logits: Tensor  # [logit, d_model]


def reads(an: Anatomy, trace: Trace, ts: TranscoderSet, enc_layer: Tensor, enc_pos: Tensor, enc_index: Tensor,
          logit_vecs: Tensor, n_nodes: int, dtype: torch.dtype) -> Reads:  # fmt: skip
    """Step 2: each feature's encoder direction through its input site's frozen norm; logits through the
    final norm (features are sorted by layer and position, so each (layer, position) is a block of rows)."""
    per_layer: list[tuple[tuple[int, int, int, Tensor], ...]] = []
    for layer in range(an.n_layers):
        rows = (enc_layer == layer).nonzero()[:, 0]
        if rows.numel() == 0:
            per_layer.append(())
            continue
        scale = trace.scale_ln_mlp[layer]
        pos = enc_pos[rows].to(scale.device)
        R = input_pullback(
            ts.input_site,
            an.layers[layer].ln_mlp,
            encoder(ts, layer, enc_index[rows]).to(scale.device, dtype),
            scale[pos].to(dtype),
        )
        cuts = torch.searchsorted(pos, torch.arange(trace.n_pos + 1, device=pos.device)).tolist()
        first = int(rows[0])
        per_layer.append(
            tuple((p, first + a, first + b, R[a:b]) for p, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])) if b > a)
        )
    last = torch.full((logit_vecs.shape[0],), trace.n_pos - 1, device=trace.scale_final.device)
    logits = norm_adjoint(
        an.final_norm, logit_vecs.to(trace.scale_final.device, dtype), trace.scale_final[last].to(dtype)
    )
    return Reads(tuple(per_layer), n_nodes - logit_vecs.shape[0], logits)


@dataclass(frozen=True, eq=False)
class Sweep:
    """Step 3: the frozen model forwards, from the sources' writes to the targets' reads."""

    an: Anatomy
    trace: Trace
    ts: TranscoderSet
    attention: tuple[Attention, ...]
    reads: Reads
    act: Tensor  # [feature] (for a cross-layer transcoder's later writes)
    index: Tensor  # [feature]

    def _scale(self, scales: object, layer: int, at: Tensor | slice, dtype: torch.dtype) -> Tensor:
        assert isinstance(scales, (list, tuple))
        return scales[layer][at].to(dtype)

    def out_forward(self, layer: int, y: Tensor, at: Tensor | slice) -> Tensor:
        """A write at the MLP output site of `layer` -> into the residual (through a frozen post-MLP norm)."""
        post = self.an.layers[layer].post_mlp
        if self.ts.output_site == "mlp_out" or post is None:
            return y
        return post.linear(y, self._scale(self.trace.scale_post_mlp, layer, at, y.dtype))

    def step(self, layer: int, h: Tensor, lo: int, out: Tensor) -> None:
        """Layer `layer` on the sources already written (h [k, pos - lo, d_model], in place): attention,
        the layer's reads into out[:, :k], the skip term."""
        ly, tr, dt = self.an.layers[layer], self.trace, h.dtype
        live = slice(lo, None)
        a = self.attention[layer].forward(
            norm_forward(ly.ln_attn, h, self._scale(tr.scale_ln_attn, layer, live, dt)), lo
        )
        if ly.post_attn is not None:
            a = ly.post_attn.linear(a, self._scale(tr.scale_post_attn, layer, live, dt))
        h += a
        k = h.shape[0]
        for p, t0, t1, R in self.reads.features[layer]:
            if p >= lo:
                out[t0:t1, :k].addmm_(R, h[:, p - lo].T)
        W = skip_matrix(self.ts, layer)
        if W is not None:
            x = input_forward(self.ts.input_site, ly.ln_mlp, h, self._scale(tr.scale_ln_mlp, layer, live, dt))
            h += self.out_forward(layer, x @ W.to(h), live)

    def write(self, layer: int, h: Tensor, rows: Tensor, pos: Tensor, vec: Tensor, lo: int) -> None:
        """Add writes vec [r, d_model] at the MLP output site of `layer`, at rows `rows`, positions `pos`."""
        h.index_put_((rows, pos - lo), self.out_forward(layer, vec, pos), accumulate=True)

    def later_writes(self, layer: int, h: Tensor, src: Sources, k: int, lo: int) -> None:
        """A cross-layer transcoder's features read below `layer` write into its MLP output too."""
        feats = (src.feature[:k] >= 0).nonzero()[:, 0]
        for l_in in src.layer[feats].unique().tolist():
            rows = feats[src.layer[feats] == l_in]
            f = src.feature[rows]
            dec = decoder(self.ts, l_in, layer)
            vec = self.act[f, None].to(h) * dec[self.index[f].to(dec.device)].to(h)
            self.write(layer, h, rows, src.pos[rows], vec, lo)

    def chunk(self, src: Sources, n_nodes: int) -> Tensor:
        """Step 3 for one chunk: the adjacency's columns [n_nodes, chunk] of its sources."""
        n_layers, n_pos = self.an.n_layers, self.trace.n_pos
        b, lo = len(src.col), int(src.pos.min())
        h = src.vec.new_zeros(b, n_pos - lo, src.vec.shape[1])
        out = src.vec.new_zeros(n_nodes, b)
        cuts = torch.searchsorted(src.layer, torch.arange(-1, n_layers + 1, device=src.layer.device)).tolist()
        rows = torch.arange(b, device=h.device)
        h.index_put_((rows[: cuts[1]], src.pos[: cuts[1]] - lo), src.vec[: cuts[1]], accumulate=True)  # tokens
        for layer in range(n_layers):
            k, e = cuts[layer + 1], cuts[layer + 2]
            if k:
                self.step(layer, h[:k], lo, out)
                if self.ts.clt is not None:
                    self.later_writes(layer, h, src, k, lo)
            if e > k:
                self.write(layer, h, rows[k:e], src.pos[k:e], src.vec[k:e], lo)
        out[self.reads.logit_row :] = self.reads.logits @ h[:, n_pos - 1 - lo].T
        return out
