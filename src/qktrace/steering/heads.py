"""What kind of head is this? QK spectra, their sign skew, and the standard behavioural head scores.

1. The bilinear form a head applies to two residual vectors is
       score(x_q, x_k) = scale * (N x_q) W_Q[h] g_q . R(k_pos - q_pos) g_k W_K[kv]^T (N x_k)
   with N the attention-input norm at unit frozen scale (gain diag(w), and LayerNorm's centering
   projector P = I - 11^T/d_model), g_q/g_k the QK-norm gains (frozen scale 1) and R rotary. Frozen
   norm scales are positive per-position factors: they rescale scores but never flip their sign.
2. Kept factored: W_QK = A B^T with A = N^T W_Q[h] g_q, B = N^T W_K[kv] g_k R^T, both [d_model, d_head].
   The nonzero eigenvalues of A B^T (d_model x d_model) are those of B^T A (d_head x d_head), so we
   never build the d_model^2 matrix.
3. Sign skew of eigenvalues or of a feature-pair interaction matrix M:
       skew = (sum of positive parts - |sum of negative parts|) / sum of absolute values
   For eigenvalues "parts" are real parts and "absolute values" are complex moduli, so
   skew = Re(trace W_QK) / sum |lambda|, in [-1, 1]. Positive skew = the head attends where query and
   key carry the same directions ("concordance"); negative = where they differ ("discordance").
4. Head scores on random repeated token sequences [BOS] t_1..t_n t_1..t_n (TransformerLens
   definitions): previous-token = mean attention to position q-1 over all queries; induction = mean
   attention, over the second half, to the token after the previous occurrence of the current token;
   duplicate-token = mean attention, over the second half, to that previous occurrence itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from ..errors import InputError, check_index
from ..models.anatomy import Layer, Rotary
from ..models.model import Model


def _read_in(layer: Layer, W: Tensor) -> Tensor:
    """N^T W for W [d_model, d_head]: the attention-input norm's gain and centering, at unit scale."""
    W = W.double() * layer.ln_attn.weight.double()[:, None]
    if layer.ln_attn.kind == "layernorm":
        W = W - W.mean(0, keepdim=True)  # P = P^T
    return W


def qk_factors(layer: Layer, head: int, rotary: Rotary | None = None, offset: int = 0) -> tuple[Tensor, Tensor]:
    """A, B [d_model, d_head] (float64) with score(x_q, x_k) = x_q^T A B^T x_k at frozen unit scales.

    `offset` = k_pos - q_pos applies rotary's relative rotation (ignored without `rotary`).
    """
    h = check_index(head, layer.n_heads, "head")
    A = _read_in(layer, layer.W_Q[h]) * layer.scale
    B = _read_in(layer, layer.W_K[layer.kv_head[h]])
    if layer.q_norm is not None and layer.k_norm is not None:
        A = A * layer.q_norm.weight.double()
        B = B * layer.k_norm.weight.double()
    if rotary is not None and offset != 0:
        # q at position 0 is unrotated; the key at `offset` is rotated by R(offset)
        positions = torch.full((B.shape[0],), offset, dtype=torch.long, device=B.device)
        B = rotary.rotate(B, positions)
    return A, B


@dataclass(frozen=True, eq=False)
class QKSpectrum:
    """Eigenvalues of one head's W_QK, from the factored form (B^T A)."""

    layer: int
    head: int
    eigenvalues: Tensor  # [d_head] complex128, sorted by descending |lambda|
    rotary_offset: int  # k_pos - q_pos at which rotary was evaluated (0: rotary is the identity)
    note: str

    @property
    def skew(self) -> float:
        return sign_skew(self.eigenvalues)


def qk_spectrum(layer: Layer, head: int, rotary: Rotary | None = None, offset: int = 0) -> QKSpectrum:
    """The d_head eigenvalues of W_QK that can be nonzero (all nonzero eigenvalues of the dense form).

    With rotary the form depends on the relative offset; by default it is reported at offset 0
    (query and key at the same position), where rotary is the identity.
    """
    if offset != 0 and rotary is None:
        raise InputError(f"offset={offset} needs the model's rotary: pass rotary=model.anatomy.rotary")
    A, B = qk_factors(layer, head, rotary, offset)
    eig = torch.linalg.eigvals(B.T @ A)  # [d_head]
    eig = eig[eig.abs().argsort(descending=True)]
    note = (
        f"W_QK of L{layer.index}H{head} with the norm's gain (and centering) and QK-norm gains at unit "
        f"frozen scale; rotary, if any, at relative offset k_pos - q_pos = {offset}"
    )
    return QKSpectrum(layer.index, head, eig, offset, note)


def sign_skew(values: Tensor) -> float:
    """(sum of positive - |sum of negative|) / sum of |values|: real parts over moduli for complex input."""
    v = values.to(torch.complex128) if values.is_complex() else values.double()
    total = float(v.abs().sum())
    if total == 0.0:
        return 0.0
    re = v.real if v.is_complex() else v
    return float(re[re > 0].sum() - re[re < 0].sum().abs()) / total


@dataclass(frozen=True, eq=False)
class PairSkew:
    """Interactions of query-side and key-side feature vectors through one head's W_QK."""

    matrix: Tensor  # [q_feature, k_feature] score contribution of each pair at unit frozen scales
    skew: float


def feature_pair_skew(
    model: Model, layer: int, head: int, q_vectors: Tensor, k_vectors: Tensor, offset: int = 0
) -> PairSkew:
    """Sign skew of the feature-pair interaction matrix q_vectors W_QK k_vectors^T.

    q_vectors [q_feature, d_model], k_vectors [k_feature, d_model]: e.g. decoder rows of the active
    features (scaled by their activations for an activation-weighted skew).
    """
    ly = model.anatomy.layers[check_index(layer, model.n_layers, "layer")]
    for name, vec in (("q_vectors", q_vectors), ("k_vectors", k_vectors)):
        if vec.dim() != 2 or vec.shape[1] != model.d_model:
            raise InputError(f"{name} has shape {list(vec.shape)}: expected [n, d_model={model.d_model}]")
    A, B = qk_factors(ly, head, model.anatomy.rotary, offset)
    M = (q_vectors.to(A) @ A) @ (k_vectors.to(B) @ B).T  # [q_feature, k_feature]
    return PairSkew(matrix=M, skew=sign_skew(M.flatten()))


# -- behavioural head scores -----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class HeadScores:
    prev_token: Tensor  # [layer, head]
    induction: Tensor  # [layer, head]
    duplicate: Tensor  # [layer, head]
    n_tokens: int
    n_seqs: int
    seed: int


def repeated_sequence(model: Model, n_tokens: int, generator: torch.Generator) -> Tensor:
    """[BOS] t_1..t_n t_1..t_n with n distinct non-special tokens (BOS only if the tokenizer has one)."""
    vocab = int(model.anatomy.W_E.shape[0])
    tok = model.tokenizer
    special = set(getattr(tok, "all_special_ids", []) or []) if tok is not None else set()
    candidates = torch.tensor([i for i in range(vocab) if i not in special], device=model.device)
    if n_tokens < 2 or n_tokens > len(candidates):
        raise InputError(f"n_tokens={n_tokens} must be in 2..{len(candidates)} (distinct ordinary tokens)")
    order = torch.randperm(len(candidates), generator=generator, device="cpu")  # the generator is a CPU one
    half = candidates[order.to(candidates.device)[:n_tokens]]
    seq = torch.cat([half, half])
    bos = getattr(tok, "bos_token_id", None) if tok is not None else None
    if bos is not None:
        seq = torch.cat([torch.tensor([int(bos)], device=seq.device), seq])
    return seq


def head_scores(model: Model, n_tokens: int = 20, seed: int = 0, n_seqs: int = 4) -> HeadScores:
    """Previous-token, induction and duplicate-token scores per (layer, head), averaged over sequences."""
    g = torch.Generator().manual_seed(seed)
    n = n_tokens
    totals = torch.zeros(3, model.n_layers, model.n_heads, dtype=torch.float64, device="cpu")
    for _ in range(n_seqs):
        trace = model.run(repeated_sequence(model, n, g))
        for layer in range(model.n_layers):  # one layer's [head, q_pos, k_pos] at a time
            p = trace.pattern(layer).double().cpu()
            totals[0, layer] += p.diagonal(-1, dim1=-2, dim2=-1).mean(-1)
            totals[1, layer] += p.diagonal(-(n - 1), dim1=-2, dim2=-1)[..., -n:].mean(-1)
            totals[2, layer] += p.diagonal(-n, dim1=-2, dim2=-1)[..., -n:].mean(-1)
    totals /= n_seqs
    return HeadScores(totals[0], totals[1], totals[2], n_tokens=n, n_seqs=n_seqs, seed=seed)


def heads_table(
    model: Model, n_tokens: int = 20, seed: int = 0, n_seqs: int = 4, sort_by: str = "induction"
) -> pd.DataFrame:
    """One row per (layer, head): prev_token, induction, duplicate, qk_skew; sorted by `sort_by`."""
    s = head_scores(model, n_tokens, seed, n_seqs)
    rows = []
    for ly in model.anatomy.layers:
        for h in range(ly.n_heads):
            rows.append(
                {
                    "layer": ly.index,
                    "head": h,
                    "prev_token": float(s.prev_token[ly.index, h]),
                    "induction": float(s.induction[ly.index, h]),
                    "duplicate": float(s.duplicate[ly.index, h]),
                    "qk_skew": qk_spectrum(ly, h).skew,
                }
            )
    df = pd.DataFrame(rows)
    if sort_by not in df.columns:
        raise InputError(f"sort_by='{sort_by}' is not a column: use one of {', '.join(df.columns)}")
    return df.sort_values(sort_by, ascending=False, kind="stable").reset_index(drop=True)
