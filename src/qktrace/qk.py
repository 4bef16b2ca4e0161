"""QK attributions: a head's pre-softmax score as a sum of (query component x key component) terms.

Algorithm, for head h of layer l, query position q and key positions K (the paper's "QK attributions",
cut at penzai's seams input->query, input->key, (query, key)->scores):

1. Split the residual stream at checkpoint l (the layer's input) at q and at each k in K into
   components: every active SAE feature a_i v_i, the SAE decoder bias, the reconstruction error; they
   sum to the residual exactly.
2. input->query: push each query component through the attention-input norm *linearised at the
   frozen scale of its position* (LayerNorm centering is linear), then W_Q[h] -- into d_head space,
   once per component (factored: no d_model x d_model matrix is ever built) -- then QK-norm at its
   frozen scale and rotary at q. The constant part (norm bias through W_Q, plus b_Q) is one more
   component, "head bias". Same for keys with W_K of h's kv head, rotary at each k.
3. (query, key)->scores: terms = Q_comp @ K_comp^T * scale. For each key, the terms sum to the
   model's own pre-softmax score (before soft-capping; the capped score is reported beside).
4. Beyond the paper: each term's value without rotary (its positional share is the difference),
   its first-order effect on the attention probability of a chosen key, p_k (t_k - sum_j p_j t_j),
   and contrastive attribution of score(A) - score(B).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import pandas as pd
import torch
from torch import Tensor

from .errors import InputError, OutOfRangeError, check_index
from .models import Model, Trace, resolve_positions
from .models.replay import qk_norm_frozen
from .nodes import CODE, Kind, Node, component_label, component_name, of_code, parse_positionless, positionless
from .saes import SAE, FeatureActs

FEATURE, SAE_BIAS, ERROR, HEAD_BIAS = (CODE[k] for k in (Kind.FEATURE, Kind.SAE_BIAS, Kind.ERROR, Kind.HEAD_BIAS))


@dataclass(frozen=True)
class SideComponents:
    """One side's components at some positions, projected into a head's d_head space.

    Components are described by integer columns (kind, pos, feature) rather than strings, so a row of
    thousands of keys costs no Python loop; `ids` spells them as node ids on demand.
    """

    checkpoint: int
    kind: Tensor  # [component] nodes.CODE of FEATURE | SAE_BIAS | ERROR | HEAD_BIAS
    pos: Tensor  # [component] position of each component
    feature: Tensor  # [component] SAE feature index, -1 for the others
    rotated: Tensor  # [component, d_head] after QK-norm and rotary (what the score sees)
    unrotated: Tensor  # [component, d_head] the same without rotary
    layer: Tensor | None = None  # [component] each one's checkpoint or layer, where they differ (writers)

    def id(self, i: int) -> str:
        c = self.checkpoint if self.layer is None else int(self.layer[i])
        return of_code(int(self.kind[i]), c, int(self.pos[i]), int(self.feature[i])).id

    @cached_property
    def ids(self) -> tuple[str, ...]:
        return tuple(self.id(i) for i in range(len(self.kind)))


def head_weights(model: Model, layer: int, head: int, side: str) -> tuple[int, Tensor, Tensor]:
    """(the head whose weights `side` reads -- h, or its kv head for keys --, W [d_model, d_head], b [d_head])."""
    ly = model.anatomy.layers[layer]
    h = head if side == "q" else ly.kv_head[head]
    return h, (ly.W_Q if side == "q" else ly.W_K)[h], (ly.b_Q if side == "q" else ly.b_K)[h]


def head_constant(model: Model, layer: int, W: Tensor, b: Tensor) -> Tensor:
    """The constant part of one side of a head [d_head]: the attention-input norm's bias through W, plus b."""
    ln = model.anatomy.layers[layer].ln_attn
    return b if ln.bias is None else ln.bias @ W + b


def finish_side(
    model: Model, trace: Trace, layer: int, h: int, side: str, checkpoint: int,
    columns: tuple[Tensor, Tensor, Tensor, Tensor | None], proj: Tensor,
) -> SideComponents:  # fmt: skip
    """QK-norm at its frozen scale (per position and head), then rotary at each component's own position.
    `columns`: (kind, pos, feature, layer or None) of the components; `proj` [component, d_head] before both."""
    kind, pos, feature, layer_col = columns
    ly, rotary = model.anatomy.layers[layer], model.anatomy.rotary
    scales = trace.scale_q_norm if side == "q" else trace.scale_k_norm
    unrot = proj if scales is None else qk_norm_frozen(ly, side, proj, scales[layer, h, pos])
    rot = rotary.rotate(unrot, pos) if rotary is not None else unrot
    return SideComponents(checkpoint, kind, pos, feature, rot, unrot, layer_col)


def project_side(
    model: Model, trace: Trace, sae: SAE, acts: FeatureActs, layer: int, head: int, side: str, positions: Sequence[int]
) -> SideComponents:
    """Steps 1-2 for one side ("q" or "k") of head `head`: components in d_head space, no Python loops.

    Features are projected once per distinct feature: ln_linear(a v, s) @ W = a s (ln_linear(v, 1) @ W).
    """
    ly = model.anatomy.layers[layer]
    h, W, b = head_weights(model, layer, head, side)  # W [d_model, d_head], float32 on the layer's device
    dev = W.device
    P = torch.as_tensor(list(positions), dtype=torch.long, device=dev)
    s_ln = trace.scale_ln_attn[layer]  # [pos]
    # active features at those positions (the SAE may live elsewhere: bring its few rows here, in float32)
    cdt = W.dtype
    apos = acts.pos.to(dev)
    sel = torch.isin(apos, P)
    fpos, feat, a = apos[sel], acts.feature.to(dev)[sel], acts.act.to(dev, cdt)[sel]
    uniq, inv = torch.unique(feat, return_inverse=True)
    rows = sae.W_dec[uniq.to(sae.W_dec.device)].to(dev, cdt)
    per_feature = ly.ln_attn.linear(rows, 1.0) @ W  # [distinct feature, d_head]
    feat_proj = per_feature[inv] * (a * s_ln[fpos])[:, None]
    # per position: SAE decoder bias, reconstruction error, and the head bias (norm bias through W, + b)
    b_dec = sae.b_dec.to(dev, cdt)
    rest = torch.stack([b_dec.expand(len(P), -1), acts.error[P.to(acts.error.device)].to(dev, cdt)], 1)
    rest_proj = ly.ln_attn.linear(rest, s_ln[P][:, None]) @ W  # [pos, 2, d_head]
    const = head_constant(model, layer, W, b)
    rest_proj = torch.cat([rest_proj, const.expand(len(P), 1, -1)], 1).reshape(-1, W.shape[1])
    proj = torch.cat([feat_proj, rest_proj])
    pos = torch.cat([fpos, P.repeat_interleave(3)])
    kinds = torch.tensor([SAE_BIAS, ERROR, HEAD_BIAS], device=dev).repeat(len(P))
    kind = torch.cat([torch.full_like(fpos, FEATURE), kinds])
    feature = torch.cat([feat, torch.full_like(kinds, -1)])
    return finish_side(model, trace, layer, h, side, sae.checkpoint, (kind, pos, feature, None), proj)


@dataclass(frozen=True)
class QKAttribution:
    """The decomposition of head (layer, head)'s scores from `query_pos` to each of `key_positions`."""

    layer: int
    head: int
    query_pos: int
    key_positions: tuple[int, ...]
    query: SideComponents
    key: SideComponents
    terms: Tensor  # [q_component, k_component] contributions to the pre-cap score
    unrotated: Tensor  # [q_component, k_component] the same with rotary removed
    score: Tensor  # [key] the model's own pre-softmax score (soft-capped where the family caps)
    sum_of_terms: Tensor  # [key] pre-cap sums of terms
    capped_sum: Tensor  # [key] softcap(sum_of_terms), comparable with `score`
    pattern: Tensor  # [key] attention probabilities
    softcap: float | None
    key_index: Tensor  # [k_component] index into key_positions of each key component
    feature_labels: Mapping[int, str] = field(default_factory=dict)  # the SAE's labels
    writer_labels: Mapping[tuple[int, int], str] = field(default_factory=dict)  # transcoders': (layer, index)
    str_tokens: tuple[str, ...] = ()

    # -- checks ------------------------------------------------------------------------------------
    @property
    def difference(self) -> Tensor:
        """capped_sum - score, per key: float32 rounding only."""
        return self.capped_sum - self.score

    def max_relative_error(self) -> float:
        scale = torch.maximum(self.score.abs().max(), self.terms.abs().max()).clamp_min(1e-12)
        return float(self.difference.abs().max() / scale)

    def _key_index(self, key_pos: int) -> int:
        if key_pos not in self.key_positions:
            raise OutOfRangeError(f"key position {key_pos} is not in this attribution ({list(self.key_positions)})")
        return self.key_positions.index(key_pos)

    # -- tables ------------------------------------------------------------------------------------
    def label(self, component: str) -> str:
        """'feature/c3/p5/f12' -> 'its label @5 "␣tok"' (`nodes.component_label`, as every front end writes it)."""
        node = Node.parse(component)
        tok = self.str_tokens[node.pos] if node.pos < len(self.str_tokens) else "?"
        return component_label(node, tok, self._own_label(node))

    def plain_label(self, component: str) -> str:
        """A component's label without position (`nodes.component_name`): its feature's label, or its kind."""
        kind, layer, index = parse_positionless(component)
        node = Node(kind, layer, 0, index)
        return component_name(node, self._own_label(node))

    def _own_label(self, node: Node) -> str | None:
        """An SAE feature's or a transcoder feature's label, if its SAE or transcoder has one."""
        if node.kind is Kind.FEATURE:
            return self.feature_labels.get(node.index)
        if node.kind is Kind.TRANSCODER:
            return self.writer_labels.get((node.layer, node.index))
        return None

    def terms_frame(self, top: int | None = 50, key_pos: int | None = None) -> pd.DataFrame:
        """Terms sorted by |value|: query, key, key_pos, value, unrotated, positional, labels, prob_effect."""
        t = self.terms
        mask = torch.ones_like(t, dtype=torch.bool)
        if key_pos is not None:
            mask &= (self.key.pos == key_pos)[None, :]
        flat = torch.where(mask, t, torch.zeros_like(t)).abs().flatten()
        n = int(mask.sum()) if top is None else min(top, int(mask.sum()))
        idx = torch.topk(flat, n).indices
        qi, ki = idx // t.shape[1], idx % t.shape[1]
        effect = self.prob_effects()
        rows = {
            "query": [self.query.id(i) for i in qi.tolist()],
            "key": [self.key.id(i) for i in ki.tolist()],
            "key_pos": self.key.pos[ki].tolist(),
            "value": t[qi, ki].tolist(),
            "unrotated": self.unrotated[qi, ki].tolist(),
            "positional": (t[qi, ki] - self.unrotated[qi, ki]).tolist(),
            "prob_effect": effect[qi, ki].tolist(),
        }
        df = pd.DataFrame(rows)
        df.insert(1, "query_label", [self.label(c) for c in df["query"]])
        df.insert(3, "key_label", [self.label(c) for c in df["key"]])
        return df

    def query_marginals(self) -> pd.Series:
        """Each query component's total contribution (summed over key components, per key if several)."""
        return self._marginal(self.terms.sum(1), self.query.ids)

    def key_marginals(self) -> pd.Series:
        return self._marginal(self.terms.sum(0), self.key.ids)

    def _marginal(self, values: Tensor, ids: Sequence[str]) -> pd.Series:
        s = pd.Series(values.tolist(), index=list(ids), name="value")
        return s.reindex(s.abs().sort_values(ascending=False).index)

    def group(self, groups: Mapping[str, Sequence[str]]) -> pd.DataFrame:
        """Supernodes: user-named groups of components (ids, or feature ids without position like
        'feature/c3/f12', matching that feature at any position). Returns the group x group table of
        summed terms; components in no group fall into 'other'."""

        def assign(ids: Sequence[str]) -> list[str]:
            out = []
            for c in ids:
                name = "other"
                for g, members in groups.items():
                    if c in members or positionless(c) in members:
                        name = g
                        break
                out.append(name)
            return out

        qg, kg = assign(self.query.ids), assign(self.key.ids)
        df = pd.DataFrame(self.terms.detach().cpu().numpy(), index=qg, columns=kg)
        return df.T.groupby(level=0).sum().T.groupby(level=0).sum()

    # -- beyond the paper --------------------------------------------------------------------------
    def prob_effects(self, target_key: int | None = None) -> Tensor:
        """First-order effect of each term on the attention probability of `target_key` (default: the
        most attended key): p_k (delta_jk - p_j) c'(s_j) t, where t adds to the pre-cap score of key j
        and c' is the soft-cap's slope (1 without capping). Inhibitory terms at competing keys get
        positive effects when they lower a rival; negative terms at the target key get negative ones."""
        k = int(self.pattern.argmax()) if target_key is None else self._key_index(target_key)
        p = self.pattern
        slope = torch.ones_like(self.sum_of_terms)
        if self.softcap is not None:
            slope = 1 - torch.tanh(self.sum_of_terms / self.softcap) ** 2
        key_index = self.key_index
        delta = (key_index == k).to(p.dtype)
        coef = p[k] * (delta - p[key_index]) * slope[key_index]  # [k_component]
        return self.terms * coef[None, :]

    def effects_frame(self, target_key: int | None = None, top: int = 10, inhibitory: bool = True) -> pd.DataFrame:
        """The terms that most lower (inhibitory=True) or raise the attention probability of `target_key`
        (default: the most attended key), ranked by their first-order effect: inhibition at competing
        keys surfaces here without manual inspection."""
        eff = self.prob_effects(target_key)
        flat = (-eff if inhibitory else eff).flatten()
        idx = torch.topk(flat, min(top, flat.numel())).indices
        qi, ki = idx // eff.shape[1], idx % eff.shape[1]
        return pd.DataFrame(
            {
                "query": [self.query.id(i) for i in qi.tolist()],
                "query_label": [self.label(self.query.id(i)) for i in qi.tolist()],
                "key": [self.key.id(i) for i in ki.tolist()],
                "key_label": [self.label(self.key.id(i)) for i in ki.tolist()],
                "key_pos": self.key.pos[ki].tolist(),
                "value": self.terms[qi, ki].tolist(),
                "prob_effect": eff[qi, ki].tolist(),
            }
        )

    def contrast(self, key_a: int, key_b: int, top: int | None = 30) -> pd.DataFrame:
        """Why key A rather than key B: terms of score(A) - score(B), with the same feature at both
        positions netted out (keys are matched by feature id without position)."""
        ia, ib = self._key_index(key_a), self._key_index(key_b)
        sel_a, sel_b = self.key.pos == key_a, self.key.pos == key_b
        rows: dict[tuple[str, str], list[float]] = {}
        for sel, col in ((sel_a, 0), (sel_b, 1)):
            idx = sel.nonzero().flatten().tolist()
            block = self.terms[:, idx].tolist()
            key_ids = [positionless(self.key.id(ki)) for ki in idx]
            for qi, q_id in enumerate(self.query.ids):
                for j, k_id in enumerate(key_ids):
                    rows.setdefault((q_id, k_id), [0.0, 0.0])[col] += block[qi][j]
        df = pd.DataFrame(
            [(q, k, a, b, a - b) for (q, k), (a, b) in rows.items()],
            columns=["query", "key", "value_a", "value_b", "diff"],
        )
        df = df.reindex(df["diff"].abs().sort_values(ascending=False).index).reset_index(drop=True)
        df.insert(1, "query_label", [self.label(c) for c in df["query"]])
        df.attrs["score_diff"] = float(self.sum_of_terms[ia] - self.sum_of_terms[ib])
        return df if top is None else df.head(top)

    def heatmap(self, top: int = 12, key_pos: int | None = None, features_only: bool = False) -> dict[str, object]:
        """The query x key table of terms (of `key_pos`'s score, default every key's): the `top` components of
        each side by |marginal| (with `features_only`, the top SAE features), every other component summed
        into a last row or column "other" (only when one falls there), so the cells sum to the score exactly
        as the terms do. JSON-ready: query and key ids and labels, `values` [query row][key column]."""
        keys = torch.ones_like(self.key.pos, dtype=torch.bool) if key_pos is None else self.key.pos == key_pos
        if key_pos is not None:
            self._key_index(key_pos)
        t = self.terms[:, keys]  # [q_component, k_component at key_pos]
        q_ids, k_ids = list(self.query.ids), [c for c, keep in zip(self.key.ids, keys.tolist(), strict=True) if keep]
        rows, q_group = _top_groups(t.sum(1), self.query.kind, top, features_only)
        cols, k_group = _top_groups(t.sum(0), self.key.kind[keys], top, features_only)
        grid = t.new_zeros(len(rows) + 1, t.shape[1]).index_add_(0, q_group, t)
        grid = t.new_zeros(len(rows) + 1, len(cols) + 1).index_add_(1, k_group, grid)
        has_q, has_k = len(rows) < t.shape[0], len(cols) < t.shape[1]  # some component fell into "other"
        grid = grid[: len(rows) + has_q, : len(cols) + has_k]
        q = [q_ids[i] for i in rows] + ["other"] * has_q
        k = [k_ids[i] for i in cols] + ["other"] * has_k
        name = lambda c: c if c == "other" else self.label(c)  # noqa: E731
        return {
            "query": q, "query_labels": [name(c) for c in q], "key": k, "key_labels": [name(c) for c in k],
            "values": grid.tolist(), "features_only": features_only,
        }  # fmt: skip

    def summary(self) -> dict[str, object]:
        return {
            "layer": self.layer,
            "head": self.head,
            "query_pos": self.query_pos,
            "key_positions": list(self.key_positions),
            "score": self.score.tolist(),
            "sum_of_terms": self.sum_of_terms.tolist(),
            "capped_sum": self.capped_sum.tolist(),
            "max_relative_error": self.max_relative_error(),
            "pattern": self.pattern.tolist(),
        }

    def to_json(self, top: int = 50) -> dict[str, object]:
        """One JSON-ready object: score check, top terms, marginals (the CLI's --json and the server)."""
        df = self.terms_frame(top=top)
        qm, km = self.query_marginals().head(top), self.key_marginals().head(top)
        return {
            **self.summary(),
            "terms": df.to_dict(orient="records"),
            "query_marginals": [{"component": c, "label": self.label(c), "value": v} for c, v in qm.items()],
            "key_marginals": [{"component": c, "label": self.label(c), "value": v} for c, v in km.items()],
        }


def _top_groups(marginal: Tensor, kind: Tensor, top: int, features_only: bool) -> tuple[list[int], Tensor]:
    """The `top` components by |marginal| (SAE features only, if asked), and each component's group: its
    rank among them, or `len(top)` ("other")."""
    score = marginal.abs()
    if features_only:
        score = torch.where(kind == FEATURE, score, torch.full_like(score, -1.0))
    order = score.argsort(descending=True)[:top]
    chosen = order[score[order] >= 0].tolist()
    group = torch.full_like(kind, len(chosen), dtype=torch.long)
    group[chosen] = torch.arange(len(chosen), device=kind.device)
    return chosen, group


def check_row(
    model: Model, trace: Trace, layer: int, head: int, query_pos: int, key_pos: int | Sequence[int] | None
) -> tuple[int, int, int, list[int]]:
    """(layer, head, query position, key positions) checked: keys default to every key the query may see."""
    n = trace.n_pos
    layer = check_index(layer, model.n_layers, "layer")
    ly = model.anatomy.layers[layer]
    head = check_index(head, ly.n_heads, f"head (layer {layer} has {ly.n_heads})")
    q = check_index(query_pos, n, "query position", allow_negative=True)
    visible = trace.keys(layer, q)
    if key_pos is None:
        return layer, head, q, list(visible)
    keys = resolve_positions(key_pos, n, repeats="refuse", what="key position")
    for k in keys:
        if k not in visible:
            raise OutOfRangeError(
                f"query position {q} cannot attend to key position {k} in layer {layer} "
                f"(causal mask or sliding window): choose a key in {visible[0]}..{visible[-1]}"
            )
    return layer, head, q, list(keys)


def qk_attribution(
    model: Model,
    trace: Trace,
    sae: SAE,
    acts: FeatureActs,
    layer: int,
    head: int,
    query_pos: int,
    key_pos: int | Sequence[int] | None = None,
) -> QKAttribution:
    """Decompose head (layer, head)'s scores from `query_pos` to `key_pos` (None: every key it may see)."""
    layer, head, q, keys = check_row(model, trace, layer, head, query_pos, key_pos)
    if sae.checkpoint != layer:
        raise InputError(f"the SAE given is at checkpoint {sae.checkpoint}, but layer {layer} reads checkpoint {layer}")
    Q = project_side(model, trace, sae, acts, layer, head, "q", [q])
    K = project_side(model, trace, sae, acts, layer, head, "k", keys)
    return attribution(model, trace, (layer, head, q, keys), Q, K, sae.labels)


def attribution(
    model: Model, trace: Trace, row: tuple[int, int, int, list[int]], Q: SideComponents, K: SideComponents,
    labels: Mapping[int, str] | None = None,
) -> QKAttribution:  # fmt: skip
    """Step 3: the (query component x key component) terms of a checked `row` and their sums per key."""
    layer, head, q, keys = row
    ly = model.anatomy.layers[layer]
    terms = (Q.rotated @ K.rotated.T) * ly.scale  # [q_component, k_component]
    unrot = (Q.unrotated @ K.unrotated.T) * ly.scale
    dev = terms.device
    key_t = torch.tensor(keys, dtype=torch.long, device=dev)
    lookup = torch.full((trace.n_pos,), -1, dtype=torch.long, device=dev)
    lookup[key_t] = torch.arange(len(keys), device=dev)
    key_index = lookup[K.pos]
    sums = torch.zeros(len(keys), dtype=terms.dtype, device=dev).index_add_(0, key_index, terms.sum(0))
    capped = sums if ly.softcap is None else ly.softcap * torch.tanh(sums / ly.softcap)
    return QKAttribution(
        layer=layer,
        head=head,
        query_pos=q,
        key_positions=tuple(keys),
        query=Q,
        key=K,
        terms=terms,
        unrotated=unrot,
        score=trace.scores(layer, q, [head])[0, 0, key_t],
        sum_of_terms=sums,
        capped_sum=capped,
        pattern=trace.pattern(layer, q, [head])[0, 0, key_t],
        softcap=ly.softcap,
        key_index=key_index,
        feature_labels=labels or {},
        str_tokens=trace.str_tokens,
    )
