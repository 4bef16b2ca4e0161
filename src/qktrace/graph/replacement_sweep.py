"""The plain transcoder graph's adjacency, a column at a time: every source's write pushed up the frozen model.

Frozen (patterns, norm scales) with MLPs replaced by transcoders, the model is linear between a source's
write and a target's read, so edge(target, source) = <read vector of the target, J * write of the source>.
`replacement.Replacement.rows` computes rows (targets, backwards); this module computes the same numbers as
columns (sources, forwards), which costs less: a feature target at layer L goes back through L + 1
attention layers (its own included), a feature source at layer l forward through n_layers - 1 - l, and
the top layer's sources reach only the logits.

1. Sources (`sources`): features (activation x decoder row), MLP errors and token embeddings, grouped by
   position bucket and by the layer they first write at (tokens: -1). A source at position p touches
   positions >= p only (causal attention), so a bucket starting at `lo` runs on positions [lo, n_pos)
   alone. Zero writes (the zeroed positions' errors) are skipped: their columns stay zero.
2. Reads (`reads`): each feature target's encoder direction pulled back through its input site's frozen
   norm (so a layer's targets read the residual after attention directly), padded per position; the
   logits' demeaned unembedding columns through the frozen final norm, read at the last position.
3. Sweep (`Sweep.chunk`), one chunk = sources of one layer in one bucket. The first attention layer above
   them sees one position per source, so its output is rank one per head (`Attention.first`: no pass over
   positions); from there h [pos - lo, chunk, d_model] (position-major) goes through each layer whole:
   attention as three plain matmuls per head (the frozen norms folded into its matrices and pattern,
   `Attention.of`), the layer's reads, the skip term, a cross-layer transcoder's later writes. At the top
   the logits read the last position.
4. Each chunk's columns land in a source-major buffer, a contiguous run of rows per chunk piece; the
   adjacency [target, source] is its transpose (a view).

Memory follows the question: h is [pos, chunk, d_model] and the chunk's columns [chunk, node]; a chunk holds
at most `batch_size` sources.
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


def fold_norm(norm: Norm | None, W: Tensor, scale: Tensor | None = None) -> Tensor:
    """W [..., d_model, n] with the norm's centering and gain folded in: norm.linear(x, 1) @ W = x @ result."""
    if norm is None:
        return W
    W = W * norm.weight.to(W)[:, None]
    return W - W.mean(-2, keepdim=True) if norm.kind == "layernorm" else W


@dataclass(frozen=True, eq=False)
class Attention:
    """One layer's frozen attention, per query head: x @ WV[h] -> values, the pattern A[h] over positions,
    @ WO[h] -> the residual. The frozen norms are folded in: the attention-input norm's centering and gain
    into WV, its per-position scale into A's columns (keys); a post-attention norm's (Gemma-2) centering
    and gain into WO, its scale into A's rows (queries). Applied to h [pos, source, d_model]
    (position-major), each step is one plain matmul."""

    WV: Tensor  # [head, d_model, d_head] (a kv head repeated for each query head reading it)
    A: Tensor  # [head, q, k]
    WO: Tensor  # [head, d_head, d_model]

    @staticmethod
    def of(an: Anatomy, trace: Trace, layer: int, dtype: torch.dtype) -> Attention:
        ly = an.layers[layer]
        WV = fold_norm(ly.ln_attn, ly.W_V[ly.kv_index()].to(dtype))
        A = trace.pattern(layer).to(dtype) * trace.scale_ln_attn[layer].to(dtype)[None, None, :]
        WO = ly.W_O.to(dtype)
        if ly.post_attn is not None:
            assert trace.scale_post_attn is not None
            WO = fold_norm(ly.post_attn, WO.transpose(1, 2)).transpose(1, 2)
            A = A * trace.scale_post_attn[layer].to(dtype)[None, :, None]
        return Attention(WV.contiguous(), A, WO.contiguous())

    def first(self, x: Tensor, pos: Tensor, lo: int) -> Tensor:
        """The residual [pos - lo, b, d_model] after this layer for writes x [b, d_model] each at one position
        `pos` [b] (and nothing elsewhere): each head's output is rank one, A[h, :, pos] x WV[h] WO[h]."""
        b = len(pos)
        coef = self.A[:, lo:, pos]  # [head, q, b]
        h = x.new_zeros(coef.shape[1], b, x.shape[1])
        for head in range(coef.shape[0]):
            u = (x @ self.WV[head]) @ self.WO[head]  # [b, d_model]
            h.addcmul_(coef[head].unsqueeze(-1), u)
        h[pos - lo, torch.arange(b, device=pos.device)] += x
        return h

    def forward(self, x: Tensor, lo: int) -> Tensor:
        """x [pos - lo, b, d_model] (the positions lo..) -> the attention output, by the frozen pattern."""
        m, b, d = x.shape
        e = self.WO.shape[1]
        xf = x.reshape(m * b, d)
        out = None
        for head in range(self.A.shape[0]):
            v = (xf @ self.WV[head]).view(m, b * e)
            z = (self.A[head, lo:, lo:] @ v).view(m * b, e)
            out = z @ self.WO[head] if out is None else out.addmm_(z, self.WO[head])
        assert out is not None
        return out.view(m, b, d)


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
        """The sweep's chunks: the sources of one layer in one position bucket [b * width, (b + 1) * width),
        in pieces of `batch_size`."""
        group = (self.pos // width) * (self.layer.max() + 2) + self.layer + 1  # sorted: bucket, then layer
        cuts = [0, *((group[1:] != group[:-1]).nonzero()[:, 0] + 1).tolist(), len(group)]
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
    """Step 2: per layer, its feature targets' read directions padded per position, R [pos, slot, d_model],
    with their first adjacency row, positions and slots (targets are sorted by layer, position, feature);
    the logits' directions (their rows are the adjacency's last)."""

    R: tuple[Tensor | None, ...]  # per layer [pos, slot, d_model]
    first: tuple[int, ...]  # per layer: the adjacency row of its first target
    pos: tuple[Tensor, ...]  # per layer [target]
    slot: tuple[Tensor, ...]
    logits: Tensor  # [logit, d_model]

    def read(self, layer: int, h: Tensor, lo: int, out: Tensor) -> None:
        """out[:k, target] = <read direction, h [pos - lo, k, d_model] at the target's position> for layer
        `layer`'s targets at positions >= lo (a suffix of them)."""
        R, pos = self.R[layer], self.pos[layer]
        if R is None:
            return
        start = int(torch.searchsorted(pos, lo))
        if start == len(pos):
            return
        res = torch.bmm(R[lo:], h.transpose(1, 2))  # [pos - lo, slot, k]
        k = h.shape[1]
        vals = res.view(-1, k).index_select(0, (pos[start:] - lo) * R.shape[1] + self.slot[layer][start:])
        row = self.first[layer] + start
        out[:k, row : row + len(vals)] = vals.T


def reads(an: Anatomy, trace: Trace, ts: TranscoderSet, enc_layer: Tensor, enc_pos: Tensor, enc_index: Tensor,
          logit_vecs: Tensor, dtype: torch.dtype) -> Reads:  # fmt: skip
    """Step 2: each feature's encoder direction through its input site's frozen norm, padded per position
    (features are sorted by layer and position); the logits' through the final norm at the last position."""
    Rs: list[Tensor | None] = []
    first_, pos_, slot_ = [], [], []
    for layer in range(an.n_layers):
        rows = (enc_layer == layer).nonzero()[:, 0]
        scale = trace.scale_ln_mlp[layer]
        pos = enc_pos[rows].to(scale.device)
        direction = encoder(ts, layer, enc_index[rows]).to(scale.device, dtype)
        R = input_pullback(ts.input_site, an.layers[layer].ln_mlp, direction, scale[pos].to(dtype))
        first = torch.searchsorted(pos, pos, side="left")  # each target's first row at its position
        slot = torch.arange(len(pos), device=pos.device) - first
        padded = None
        if rows.numel():
            padded = R.new_zeros(trace.n_pos, int(slot.max()) + 1, R.shape[-1])
            padded[pos, slot] = R
        Rs.append(padded)
        first_.append(int(rows[0]) if rows.numel() else 0)
        pos_.append(pos)
        slot_.append(slot)
    last = torch.full((logit_vecs.shape[0],), trace.n_pos - 1, device=trace.scale_final.device)
    logits = norm_adjoint(an.final_norm, logit_vecs.to(last.device, dtype), trace.scale_final[last].to(dtype))
    return Reads(tuple(Rs), tuple(first_), tuple(pos_), tuple(slot_), logits)


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
        s = scales[layer][at].to(dtype)
        return s[:, None] if isinstance(at, slice) else s  # positions x sources: one scale per position

    def out_forward(self, layer: int, y: Tensor, at: Tensor | slice) -> Tensor:
        """A write at the MLP output site of `layer` -> into the residual (through a frozen post-MLP norm)."""
        post = self.an.layers[layer].post_mlp
        if self.ts.output_site == "mlp_out" or post is None:
            return y
        return post.linear(y, self._scale(self.trace.scale_post_mlp, layer, at, y.dtype))

    def step(self, layer: int, h: Tensor, lo: int, out: Tensor, src: Sources) -> None:
        """Layer `layer` after its attention, on h [pos - lo, b, d_model] (in place): the layer's reads into
        out, the skip term, a cross-layer transcoder's later writes."""
        ly, tr, dt = self.an.layers[layer], self.trace, h.dtype
        self.reads.read(layer, h, lo, out)
        W = skip_matrix(self.ts, layer)
        if W is not None:
            live = slice(lo, None)
            x = input_forward(self.ts.input_site, ly.ln_mlp, h, self._scale(tr.scale_ln_mlp, layer, live, dt))
            h += self.out_forward(layer, x @ W.to(h), live)
        if self.ts.clt is not None and int(src.layer[0]) >= 0:
            self.later_writes(layer, h, src, lo)

    def later_writes(self, layer: int, h: Tensor, src: Sources, lo: int) -> None:
        """A cross-layer transcoder's features read below `layer` write into its MLP output too."""
        rows = (src.feature >= 0).nonzero()[:, 0]
        f = src.feature[rows]
        dec = decoder(self.ts, int(src.layer[0]), layer)
        vec = self.act[f, None].to(h) * dec[self.index[f].to(dec.device)].to(h)
        pos = src.pos[rows]
        h.index_put_((pos - lo, rows), self.out_forward(layer, vec, pos), accumulate=True)

    def chunk(self, src: Sources, out: Tensor) -> None:
        """Step 3 for one chunk (sources of one layer): out [chunk, node] (zeros) gets their adjacency columns.
        The first attention layer above them acts on one position per source (`Attention.first`); from the
        next on, h [pos - lo, chunk, d_model] goes through each layer whole."""
        n_layers, n_pos = self.an.n_layers, self.trace.n_pos
        lo, first = int(src.pos.min()), int(src.layer[0]) + 1
        x = src.vec if first == 0 else self.out_forward(first - 1, src.vec, src.pos)
        n_logit = len(self.reads.logits)
        if first == n_layers:  # the top layer's sources: only the logits read them, at the last position
            out[:, out.shape[1] - n_logit :] = (x * (src.pos == n_pos - 1)[:, None]) @ self.reads.logits.T
            return
        h = self.attention[first].first(x, src.pos, lo)
        self.step(first, h, lo, out, src)
        for layer in range(first + 1, n_layers):
            h += self.attention[layer].forward(h, lo)
            self.step(layer, h, lo, out, src)
        out[:, out.shape[1] - n_logit :] = h[n_pos - 1 - lo] @ self.reads.logits.T
