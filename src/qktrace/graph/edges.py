"""Closed-form edges between adjacent checkpoints, and their split over attention heads.

Layer l maps checkpoint l (x) to checkpoint l + 1 with attention patterns and every norm scale
frozen, and the MLP linearised at the point the prompt actually put it:

    resid_{l+1} = x + post_attn(attn(ln_attn(x))) + post_mlp(mlp(ln_mlp(mid))),
    mid = x + post_attn(...)  (sequential)   or   mid = x  (parallel families, GPT-NeoX).

A source s at checkpoint l writes u_s at p_s; a target t at checkpoint l + 1 reads r_t at p_t. Then

 1. MLP pullback: h_t = J_mlp(mlp_in[p_t])^T post_mlp^T r_t, one batched vjp through the HF MLP,
    and g_t = ln_mlp^T h_t (adjoints of the norms at their frozen scales).
 2. Residual and MLP paths, same position only: [p_s == p_t] (r_t + g_t) . u_s.
 3. Attention, per head h: V = ln_attn(u_s) @ W_V[kv]   [kv_head, src, d_head]   (sources, once),
    R_h = W_O[h] post_attn^T (r_t + g_t)                 [head, tgt, d_head]      (targets, once),
    edge += sum_h pattern_h[p_t, p_s] * R_h[t] . V_kv(h)[s]. Per target position p_t the pattern
    scales the sources' d_head rows, so one matmul over (head, d_head) sums every head for all
    targets there; [head, tgt, src] is never formed. Parallel families read the attention output
    with r_t alone (their MLP reads x, which term 2 covers).
 4. Constant nodes: attn_bias(p_t) -> t = (r_t + g_t) . b_attn[p_t] (b_O, b_V and the ln_attn bias
    through the frozen pattern and W_O), and mlp_bias(p_t) -> t = r_t . mlp_write[p_t] - h_t .
    (mlp_in[p_t] - ln_mlp.bias): what remains of the MLP once its linear share is attributed.

Then r_t . resid_{l+1}[p_t] = sum_s edge(s, t) + attn_bias + mlp_bias exactly (the edges are the
exact linearisation of `models.replay.frozen_layer`). `head_loadings` recomputes the per-head direct
(r_t) and via-MLP (g_t) parts for chosen edges; `layer_edges_by_position` is the same sum contracted in
the other order (each target pulled back to a d_model vector per source position), cheaper when a few
targets face many sources (target-driven graphs).

Patterns are read from the trace a few query rows at a time (`Trace.pattern(layer, rows)`), never as a
whole [layer, head, pos, pos] tensor; everything is computed on the layer's own device, in the
anatomy's compute dtype (float32 for half-precision models, whose MLP is run as a float32 copy).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ..models.anatomy import Anatomy, Norm
from ..models.replay import float_mlp
from ..models.trace import Trace

TILE = 1 << 24  # elements of one [source position, target, d_model] tile, or of a block of pattern rows


@dataclass(frozen=True, eq=False)
class Vectors:
    """Rows placed in the residual stream: positions [n] and vectors [n, d_model]."""

    pos: Tensor  # [n] long
    vec: Tensor  # [n, d_model]

    def __len__(self) -> int:
        return int(self.pos.shape[0])

    def take(self, idx: Tensor) -> Vectors:
        return Vectors(self.pos[idx], self.vec[idx])

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> Vectors:
        return Vectors(self.pos.to(device), self.vec.to(device=device, dtype=dtype or self.vec.dtype))


@dataclass(frozen=True, eq=False)
class LayerEdges:
    """Edges of one layer into its targets; rows are targets, columns sources."""

    weight: Tensor  # [tgt, src] all paths summed
    attn_bias: Tensor  # [tgt] from the attention-bias node at the target's position
    mlp_bias: Tensor  # [tgt] from the MLP-bias node at the target's position
    mlp_readout: Tensor  # [tgt, d_model] g_t: what the target reads through the MLP


@dataclass(frozen=True, eq=False)
class EdgeParts:
    """Every path of every (target, source) pair, dense: for tests and small sets."""

    residual: Tensor  # [tgt, src]
    mlp: Tensor  # [tgt, src]
    direct: Tensor  # [head, tgt, src]
    via_mlp: Tensor  # [head, tgt, src]

    @property
    def total(self) -> Tensor:
        return self.residual + self.mlp + self.direct.sum(0) + self.via_mlp.sum(0)


# ------------------------------------------------------------------------------------------ readouts


def norm_adjoint(norm: Norm | None, y: Tensor, scale: Tensor) -> Tensor:
    """Transpose of `norm.linear` at frozen scales: y [..., d_model], scale [...] -> [..., d_model]."""
    if norm is None:
        return y
    out = y * (scale.unsqueeze(-1) * norm.weight)
    return out - out.mean(-1, keepdim=True) if norm.kind == "layernorm" else out


def logit_readouts(anatomy: Anatomy, trace: Trace, token_ids: Tensor) -> Vectors:
    """d logit / d resid_final at the last position: final norm at its frozen scale, W_U column,
    soft-capping linearised at the actual logit."""
    last = trace.n_pos - 1
    dev = trace.scale_final.device
    ids = token_ids.to(dev)
    cols = anatomy.W_U[:, ids.to(anatomy.W_U.device)].T.to(dev, anatomy.compute_dtype)  # [n, d_model]
    pos = torch.full_like(ids, last)
    r = norm_adjoint(anatomy.final_norm, cols, trace.scale_final[pos])
    if anatomy.logit_softcap is not None:
        capped = trace.last_logits[ids] / anatomy.logit_softcap
        r = r * (1 - capped.square())[:, None]
    return Vectors(pos, r)


# ------------------------------------------------------------------------------- the frozen layer


def pattern_rows(trace: Trace, layer: int, positions: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
    """(query positions, their pattern rows [head, n, k_pos]) for `positions`, a tile of rows at a time."""
    heads = trace.anatomy.layers[layer].n_heads
    step = max(1, TILE // max(1, heads * trace.n_pos))
    for i in range(0, len(positions), step):
        rows = positions[i : i + step]
        yield rows, trace.pattern(layer, rows)


def attention_bias(anatomy: Anatomy, trace: Trace, layer: int, pos: Tensor | None = None) -> Tensor:
    """attn_bias vectors [pos, d_model] at `pos` (default every position): the attention write of a
    zero residual at frozen patterns."""
    ly = anatomy.layers[layer]
    pos = torch.arange(trace.n_pos, device=ly.device) if pos is None else pos.to(ly.device)
    v0 = ly.b_V if ly.ln_attn.bias is None else ly.b_V + torch.einsum("d,kde->ke", ly.ln_attn.bias, ly.W_V)
    per_head = torch.einsum("he,hed->hd", v0[ly.kv_index()], ly.W_O)  # [head, d_model]
    uniq, inverse = torch.unique(pos, return_inverse=True)
    sums = torch.cat([p.sum(-1) for _, p in pattern_rows(trace, layer, uniq)], 1)  # [head, n], 1 up to rounding
    out = torch.einsum("hq,hd->qd", sums, per_head)[inverse] + ly.b_O
    if ly.post_attn is not None:
        assert trace.scale_post_attn is not None
        out = ly.post_attn(out, trace.scale_post_attn[layer][pos])
    return out


def mlp_write(anatomy: Anatomy, trace: Trace, layer: int, pos: Tensor) -> Tensor:
    """What the MLP path added to the residual [n, d_model] at positions `pos` (after any post-norm)."""
    ly = anatomy.layers[layer]
    out = trace.mlp_out[layer][pos]
    if ly.post_mlp is None:
        return out
    assert trace.scale_post_mlp is not None
    return ly.post_mlp(out, trace.scale_post_mlp[layer][pos])


def _slots(pos: Tensor) -> tuple[Tensor, int]:
    """Rank of each row among rows at the same position, and the largest group size."""
    if len(pos) == 0:
        return pos.clone(), 0
    order = torch.argsort(pos, stable=True)
    sorted_pos = pos[order]
    start = torch.searchsorted(sorted_pos, sorted_pos)  # first row of each row's group
    rank = torch.empty_like(pos)
    rank[order] = torch.arange(len(pos), device=pos.device) - start
    return rank, int(rank.max()) + 1


def _mlp_vjp(mlp: Callable[[Tensor], Tensor], mlp_in: Tensor, pos: Tensor, cot: Tensor) -> Tensor:
    """J_mlp(mlp_in[pos])^T cot [n, d_model] through the HF module, one batched backward."""
    if len(pos) == 0:
        return torch.zeros_like(cot)
    uniq, inverse = torch.unique(pos, return_inverse=True)
    rank, m = _slots(pos)
    with torch.enable_grad():
        if len(uniq) * (1 + m) < 2 * len(pos):  # one forward per position, m cotangents each
            _, pullback = torch.func.vjp(mlp, mlp_in[uniq].detach())[:2]
            cots = cot.new_zeros(m, len(uniq), cot.shape[1])
            cots[rank, inverse] = cot
            (grad,) = torch.func.vmap(pullback)(cots)  # [rank, position, d_model]
            return grad[rank, inverse].detach()
        x = mlp_in[pos].detach().requires_grad_(True)  # one forward row per target
        (grad,) = torch.autograd.grad(mlp(x), x, cot)
        return grad.detach()


def mlp_pullback(
    anatomy: Anatomy, trace: Trace, layer: int, targets: Vectors, mlp: Callable[[Tensor], Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """(h, g) [tgt, d_model]: the readout pulled back to the MLP input (h) and to the residual (g)."""
    ly = anatomy.layers[layer]
    r, pt = targets.vec, targets.pos
    if ly.post_mlp is not None:
        assert trace.scale_post_mlp is not None
        r = norm_adjoint(ly.post_mlp, r, trace.scale_post_mlp[layer][pt])
    h = _mlp_vjp(mlp or float_mlp(anatomy, layer), trace.mlp_in[layer], pt, r)
    return h, norm_adjoint(ly.ln_mlp, h, trace.scale_ln_mlp[layer][pt])


def _attn_readers(anatomy: Anatomy, trace: Trace, layer: int, pos: Tensor, reader: Tensor) -> Tensor:
    """Readers of the attention output pulled into each head's d_head space: [head, tgt, d_head]."""
    ly = anatomy.layers[layer]
    if ly.post_attn is not None:
        assert trace.scale_post_attn is not None
        reader = norm_adjoint(ly.post_attn, reader, trace.scale_post_attn[layer][pos])
    return torch.einsum("td,hed->hte", reader, ly.W_O)


def _values(anatomy: Anatomy, trace: Trace, layer: int, sources: Vectors) -> Tensor:
    """Sources through ln_attn (frozen scale, no bias) and W_V, per kv head: [kv_head, src, d_head]."""
    ly = anatomy.layers[layer]
    xn = ly.ln_attn.linear(sources.vec, trace.scale_ln_attn[layer][sources.pos])
    return torch.einsum("sd,kde->kse", xn, ly.W_V)


def _same_position(reader: Tensor, targets: Vectors, sources: Vectors, out: Tensor) -> None:
    """out[t, s] += [p_t == p_s] reader_t . u_s, one small matmul per position."""
    if len(targets) == 0 or len(sources) == 0:
        return
    n_pos = int(max(targets.pos.max(), sources.pos.max())) + 1
    t_rank, mt = _slots(targets.pos)
    s_rank, ms = _slots(sources.pos)
    d = reader.shape[1]
    R = reader.new_zeros(n_pos, mt, d)
    R[targets.pos, t_rank] = reader
    U = reader.new_zeros(n_pos, ms, d)
    U[sources.pos, s_rank] = sources.vec
    t_at = torch.full((n_pos, mt), -1, dtype=torch.long, device=reader.device)
    t_at[targets.pos, t_rank] = torch.arange(len(targets), device=reader.device)
    s_at = torch.full((n_pos, ms), -1, dtype=torch.long, device=reader.device)
    s_at[sources.pos, s_rank] = torch.arange(len(sources), device=reader.device)
    block = torch.bmm(R, U.transpose(1, 2))  # [pos, mt, ms]
    p, i, j = torch.nonzero((t_at[:, :, None] >= 0) & (s_at[:, None, :] >= 0), as_tuple=True)
    out[t_at[p, i], s_at[p, j]] += block[p, i, j]


def _bias_edges(
    anatomy: Anatomy, trace: Trace, layer: int, targets: Vectors, h: Tensor, attn_reader: Tensor
) -> tuple[Tensor, Tensor]:
    ly = anatomy.layers[layer]
    pt = targets.pos
    attn_bias = (attn_reader * attention_bias(anatomy, trace, layer, pt)).sum(-1)
    mlp_in = trace.mlp_in[layer][pt]
    if ly.ln_mlp.bias is not None:
        mlp_in = mlp_in - ly.ln_mlp.bias
    mlp_bias = (targets.vec * mlp_write(anatomy, trace, layer, pt)).sum(-1) - (h * mlp_in).sum(-1)
    return attn_bias, mlp_bias


def _unsort(x: Tensor, dim: int, order: Tensor) -> Tensor:
    """Undo `x.index_select(dim, order)` (free when `order` is already the identity)."""
    if bool((order[1:] > order[:-1]).all()):
        return x
    return torch.empty_like(x).index_copy_(dim, order, x)


def _compact(idx: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """(the distinct values of idx in increasing order, each entry's rank among them), without sorting."""
    present = torch.zeros(size, dtype=torch.bool, device=idx.device)
    present[idx] = True
    distinct = present.nonzero().squeeze(1)
    rank = torch.full((size,), -1, dtype=torch.long, device=idx.device)
    rank[distinct] = torch.arange(len(distinct), device=idx.device)
    return distinct, rank[idx]


def _sorted(v: Vectors) -> tuple[Vectors, Tensor]:
    order = torch.argsort(v.pos, stable=True)
    return v.take(order), order


def layer_edges(anatomy: Anatomy, trace: Trace, layer: int, targets: Vectors, sources: Vectors) -> LayerEdges:
    """All edges from sources at checkpoint `layer` into targets at `layer + 1`, head-factored."""
    ly = anatomy.layers[layer]
    targets, sources = targets.to(ly.device), sources.to(ly.device)
    h, g = mlp_pullback(anatomy, trace, layer, targets)
    rg = targets.vec + g
    attn_reader = targets.vec if ly.parallel else rg
    tgt, t_order = _sorted(targets)
    src, s_order = _sorted(sources)
    weight = rg.new_zeros(len(tgt), len(src))
    _same_position(rg[t_order], tgt, src, weight)
    R = _attn_readers(anatomy, trace, layer, tgt.pos, attn_reader[t_order])  # [head, tgt, d_head]
    R = R.permute(1, 0, 2).reshape(len(tgt), -1)  # [tgt, head * d_head]
    V = _values(anatomy, trace, layer, src)[ly.kv_index()].permute(1, 0, 2).contiguous()  # [src, head, d_head]
    t_pos, counts = torch.unique_consecutive(tgt.pos, return_counts=True)
    starts = (torch.cumsum(counts, 0) - counts).tolist()
    i = 0
    for rows, pattern in pattern_rows(trace, layer, t_pos):  # pattern [head, n, k_pos] of a tile of positions
        for j, p in enumerate(rows.tolist()):
            t0, n = starts[i], int(counts[i])
            i += 1
            n_s = int(torch.searchsorted(src.pos, p, right=True))  # causal: keys up to the query position
            a = pattern[:, j, src.pos[:n_s]].T  # [src, head]
            scaled = (V[:n_s] * a[:, :, None]).reshape(n_s, -1)  # [src, head * d_head]
            weight[t0 : t0 + n, :n_s].addmm_(R[t0 : t0 + n], scaled.T)  # sum over heads and d_head at once
    out = _unsort(_unsort(weight, 0, t_order), 1, s_order)
    attn_bias, mlp_bias = _bias_edges(anatomy, trace, layer, targets, h, attn_reader)
    return LayerEdges(out, attn_bias, mlp_bias, g)


class Sources(Protocol):
    """Source parts by position, their vectors made on demand (`Vectors` is one; a lazy view is another)."""

    @property
    def pos(self) -> Tensor: ...

    def take(self, idx: Tensor) -> Vectors: ...

    def __len__(self) -> int: ...


def layer_edges_by_position(
    anatomy: Anatomy, trace: Trace, layer: int, targets: Vectors, sources: Sources
) -> LayerEdges:
    """The same edges as `layer_edges`, contracted target-first: each target becomes one d_model
    vector per source position (its exact gradient there), dotted with that position's sources.

    Source positions are visited a tile at a time, and only that tile's source vectors are made:
    a long prompt's [source, d_model] vectors are never held at once."""
    ly = anatomy.layers[layer]
    dev = ly.device
    targets = targets.to(dev)
    h, g = mlp_pullback(anatomy, trace, layer, targets)
    rg = targets.vec + g
    attn_reader = targets.vec if ly.parallel else rg
    R = _attn_readers(anatomy, trace, layer, targets.pos, attn_reader)  # [head, tgt, d_head]
    pulled = torch.einsum("hte,hde->htd", R, ly.W_V[ly.kv_index()])  # [head, tgt, d_model]
    src_pos = sources.pos.to(dev)
    weight = rg.new_zeros(len(targets), len(sources))
    if len(targets) and len(sources):
        n_pos = int(max(targets.pos.max(), src_pos.max())) + 1
        uniq, inverse = torch.unique(targets.pos, return_inverse=True)
        rows = torch.cat([p for _, p in pattern_rows(trace, layer, uniq)], 1)  # [head, distinct q, k_pos]
        a = rows[:, inverse, :n_pos]  # [head, tgt, k_pos]
        scale = trace.scale_ln_attn[layer]
        order = torch.argsort(src_pos, stable=True)
        bounds = torch.searchsorted(src_pos[order], torch.arange(n_pos + 1, device=dev))
        step = max(1, TILE // max(1, len(targets) * rg.shape[1]))
        t_idx = torch.arange(len(targets), device=dev)
        for p0 in range(0, n_pos, step):
            p1 = min(n_pos, p0 + step)
            sel = order[int(bounds[p0]) : int(bounds[p1])]
            if not len(sel):
                continue
            grad = torch.einsum("htk,htd->ktd", a[:, :, p0:p1], pulled)  # [k_pos tile, tgt, d_model]
            grad = norm_adjoint(ly.ln_attn, grad, scale[p0:p1, None])
            here = (targets.pos >= p0) & (targets.pos < p1)
            grad[targets.pos[here] - p0, t_idx[here]] += rg[here]  # the residual path, same position
            part = sources.take(sel.to(sources.pos.device)).to(dev)
            rank, ms = _slots(part.pos)
            U = rg.new_zeros(p1 - p0, ms, rg.shape[1])
            U[part.pos - p0, rank] = part.vec
            block = torch.bmm(grad, U.transpose(1, 2))  # [k_pos tile, tgt, ms]
            weight[:, sel] = block[part.pos - p0, :, rank].T
    attn_bias, mlp_bias = _bias_edges(anatomy, trace, layer, targets, h, attn_reader)
    return LayerEdges(weight, attn_bias, mlp_bias, g)


def head_loadings(
    anatomy: Anatomy,
    trace: Trace,
    layer: int,
    targets: Vectors,
    mlp_readout: Tensor,
    sources: Vectors,
    pairs: tuple[Tensor, Tensor],
) -> tuple[Tensor, Tensor]:
    """Per-head (direct, via_mlp) parts [edge, head] of the edges `pairs` = (target rows, source rows).

    Only the targets and sources the pairs touch are projected; per target position, one
    [head, tgt, src] tile of head scores over them, from which the pairs are read.
    """
    ly = anatomy.layers[layer]
    targets, sources, mlp_readout = targets.to(ly.device), sources.to(ly.device), mlp_readout.to(ly.device)
    ti, si = pairs[0].to(ly.device), pairs[1].to(ly.device)
    rows, t_of = _compact(ti, len(targets))
    cols, s_of = _compact(si, len(sources))
    tgt = targets.take(rows)
    R = _attn_readers(anatomy, trace, layer, tgt.pos, tgt.vec)  # [head, tgt, d_head]
    G = None if ly.parallel else _attn_readers(anatomy, trace, layer, tgt.pos, mlp_readout[rows])
    src = sources.take(cols)
    Vt = _values(anatomy, trace, layer, src)[ly.kv_index()].transpose(1, 2)  # [head, d_head, src]
    direct = R.new_zeros(len(ti), R.shape[0])
    via = R.new_zeros(len(ti), R.shape[0])
    edge_pos = tgt.pos[t_of]
    ordered = bool((edge_pos[1:] >= edge_pos[:-1]).all())
    order = torch.arange(len(ti), device=ti.device) if ordered else torch.sort(edge_pos).indices
    t_rank, _ = _slots(tgt.pos)  # row of each target within its position's tile
    e0 = 0
    for p, n in zip(*(x.tolist() for x in torch.unique_consecutive(edge_pos[order], return_counts=True))):
        here = order[e0 : e0 + n]
        e0 += n
        at_p = (tgt.pos == p).nonzero().squeeze(1)  # tile rows, in t_rank order
        r, c = t_rank[t_of[here]], s_of[here]
        a = trace.pattern(layer, [p])[:, 0, src.pos[c]]  # [head, edge]
        direct[here] = (torch.bmm(R[:, at_p], Vt)[:, r, c] * a).T
        if G is not None:
            via[here] = (torch.bmm(G[:, at_p], Vt)[:, r, c] * a).T
    return direct, via


def edge_parts(anatomy: Anatomy, trace: Trace, layer: int, targets: Vectors, sources: Vectors) -> EdgeParts:
    """Residual, MLP and per-head (direct, via-MLP) parts of every (target, source) pair, densely."""
    ly = anatomy.layers[layer]
    targets, sources = targets.to(ly.device), sources.to(ly.device)
    h, g = mlp_pullback(anatomy, trace, layer, targets)
    same = (targets.pos[:, None] == sources.pos[None, :]).to(g.dtype)
    dev = targets.pos.device
    ti, si = torch.meshgrid(
        torch.arange(len(targets), device=dev), torch.arange(len(sources), device=dev), indexing="ij"
    )
    direct, via = head_loadings(anatomy, trace, layer, targets, g, sources, (ti.flatten(), si.flatten()))
    shape = (-1, len(targets), len(sources))
    return EdgeParts(
        residual=same * (targets.vec @ sources.vec.T),
        mlp=same * (g @ sources.vec.T),
        direct=direct.T.reshape(shape),
        via_mlp=via.T.reshape(shape),
    )
