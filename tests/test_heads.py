"""Head analysis: factored QK spectra equal the dense ones, and head scores find planted heads."""

from __future__ import annotations

import math

import matplotlib.image
import pytest
import torch

from qktrace.analyses.plots import plot_heads
from qktrace.errors import InputError
from qktrace.models import Model
from qktrace.steering.heads import feature_pair_skew, head_scores, heads_table, qk_factors, qk_spectrum, sign_skew
from qktrace.testing import hf_attention, random_prompt


def dense_qk(layer, head: int) -> torch.Tensor:
    """W_QK [d_model, d_model] built the slow way, only for the test."""
    w = layer.ln_attn.weight.double()
    d = w.shape[0]
    N = torch.diag(w)
    if layer.ln_attn.kind == "layernorm":
        N = N @ (torch.eye(d, dtype=torch.float64) - 1.0 / d)
    Wq = layer.W_Q[head].double()
    Wk = layer.W_K[layer.kv_head[head]].double()
    if layer.q_norm is not None:
        Wq = Wq * layer.q_norm.weight.double()
        Wk = Wk * layer.k_norm.weight.double()
    return N.T @ Wq @ Wk.T @ N * layer.scale


@pytest.mark.parametrize("family_name", ["gpt2", "llama", "qwen3", "gemma2"])
def test_factored_spectrum_equals_dense(tiny_models, family_name):
    model = tiny_models[family_name]
    for layer in model.anatomy.layers:
        for head in (0, layer.n_heads - 1):
            spec = qk_spectrum(layer, head)
            dense = torch.linalg.eigvals(dense_qk(layer, head))
            dense = dense[dense.abs().argsort(descending=True)][: layer.d_head]
            tol = 1e-4 * float(dense.abs().max())
            remaining = list(dense)
            for lam in spec.eigenvalues:  # match as multisets: conjugate pairs may come in either order
                i = min(range(len(remaining)), key=lambda j: abs(remaining[j] - lam))
                assert abs(remaining.pop(i) - lam) < tol
            assert spec.rotary_offset == 0 and "offset" in spec.note
            assert spec.skew == pytest.approx(float(dense.real.sum() / dense.abs().sum()), abs=1e-6)


def test_factors_with_rotary_offset_give_hf_scores(tiny_models):
    """For a model without biases or QK-norm, frozen-scale factors at offset k_pos - q_pos are the score."""
    model = tiny_models["mistral"]
    trace = model.run(random_prompt(10, 7))
    ly = model.anatomy.layers[1]
    q_pos, k_pos, h = 8, 6, 3
    A, B = qk_factors(ly, h, model.anatomy.rotary, offset=k_pos - q_pos)
    x = trace.resid[1].double()
    s = trace.scale_ln_attn[1].double()
    mine = (s[q_pos] * x[q_pos] @ A) @ (s[k_pos] * x[k_pos] @ B)
    assert float(mine) == pytest.approx(float(hf_attention(model, trace.tokens).scores[1][h, q_pos, k_pos]), rel=1e-4)
    with pytest.raises(InputError, match="rotary"):
        qk_spectrum(ly, h, offset=-2)


def test_sign_skew_definition():
    assert sign_skew(torch.tensor([3.0, -1.0])) == pytest.approx(0.5)
    assert sign_skew(torch.tensor([-2.0, -2.0])) == pytest.approx(-1.0)
    pair = torch.tensor([1 + 1j, 1 - 1j], dtype=torch.complex128)
    assert sign_skew(pair) == pytest.approx(2 / (2 * math.sqrt(2)))
    assert sign_skew(torch.zeros(3)) == 0.0


def test_feature_pair_skew_is_the_bilinear_form(tiny_models):
    model = tiny_models["gpt2"]
    g = torch.Generator().manual_seed(0)
    qv, kv = torch.randn(5, model.d_model, generator=g), torch.randn(7, model.d_model, generator=g)
    res = feature_pair_skew(model, 1, 2, qv, kv)
    expected = qv.double() @ dense_qk(model.anatomy.layers[1], 2) @ kv.double().T
    assert torch.allclose(res.matrix, expected, rtol=1e-6, atol=1e-8)
    assert res.skew == pytest.approx(float(expected.sum() / expected.abs().sum()))
    same = feature_pair_skew(model, 1, 2, qv, qv)
    assert same.matrix.shape == (5, 5)
    with pytest.raises(InputError, match="d_model"):
        feature_pair_skew(model, 1, 2, qv[:, :3], kv)


# -- a hand-built attention-only GPT-2 with a previous-token, a duplicate-token and an induction head --

D, N_HEADS, VOCAB, TOK = 96, 4, 40, 20  # token vectors u_t live in dims 8..27 (and -u_t in 28..47)
FREQS = (1.0, 0.37)  # positions: [cos, sin, -cos, -sin] per frequency in dims 0..7 (zero mean)
COPY = 48  # layer 0's prev-token head writes u_{t-1} to dims 48..67 (and -u_{t-1} to 68..87)


def planted_model() -> Model:
    """Every residual vector has zero mean and near-constant norm, so LayerNorm is a fixed scaling."""
    import transformers as T

    cfg = T.GPT2Config(vocab_size=VOCAB, n_embd=D, n_head=N_HEADS, n_layer=2, n_positions=64, n_inner=8)
    cfg.bos_token_id = cfg.eos_token_id = None  # GPT-2's 50256 is outside this vocabulary
    hf = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    dh = D // N_HEADS
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(VOCAB, TOK, generator=g), dim=-1)
    with torch.no_grad():
        for p in hf.parameters():
            p.zero_()
        for name, p in hf.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.fill_(1.0)
        tr = hf.transformer
        tr.wte.weight[:, 8 : 8 + TOK] = u
        tr.wte.weight[:, 8 + TOK : 8 + 2 * TOK] = -u
        pos = torch.arange(64, dtype=torch.float64)
        for i, f in enumerate(FREQS):
            c, s = torch.cos(f * pos).float(), torch.sin(f * pos).float()
            tr.wpe.weight[:, 4 * i : 4 * i + 4] = torch.stack([c, s, -c, -s], -1)
        # layer 0: LayerNorm multiplies by sqrt(D / |x|^2) = sqrt(96 / 6) = 4
        W0 = tr.h[0].attn.c_attn.weight  # [d_model, 3 * d_model] = x -> (q | k | v)
        C = 10.0
        for i, f in enumerate(FREQS):  # head 0: q = R(-f) (cos, sin) -> peaks one position back
            rot = torch.tensor([[math.cos(f), -math.sin(f)], [math.sin(f), math.cos(f)]])
            W0[4 * i : 4 * i + 2, 2 * i : 2 * i + 2] = C * rot
            W0[4 * i : 4 * i + 2, D + 2 * i : D + 2 * i + 2] = torch.eye(2)
        tok = slice(8, 8 + TOK)
        W0[tok, dh : dh + TOK] = 3.0 * torch.eye(TOK)  # head 1: duplicate token, q = k = u
        W0[tok, D + dh : D + dh + TOK] = torch.eye(TOK)
        W0[tok, 2 * D : 2 * D + TOK] = torch.eye(TOK)  # head 0 value: u of the attended token
        Wo = tr.h[0].attn.c_proj.weight  # [head * d_head, d_model]
        Wo[:TOK, COPY : COPY + TOK] = 0.25 * torch.eye(TOK)  # undo LayerNorm's factor 4
        Wo[:TOK, COPY + TOK : COPY + 2 * TOK] = -0.25 * torch.eye(TOK)
        # layer 1 head 0: query = current token, key = the copied previous token -> induction
        W1 = tr.h[1].attn.c_attn.weight
        W1[tok, :TOK] = 3.0 * torch.eye(TOK)
        W1[COPY : COPY + TOK, D : D + TOK] = torch.eye(TOK)
    return Model(hf)


def test_head_scores_find_planted_heads():
    model = planted_model()
    s = head_scores(model, n_tokens=12, seed=0, n_seqs=2)
    assert s.prev_token.shape == (2, N_HEADS)
    assert s.prev_token[0, 0] > 0.9 and s.prev_token[0, 0] == s.prev_token.max()
    assert s.duplicate[0, 1] > 0.35 and s.duplicate[0, 1] == s.duplicate.max()
    assert s.induction[1, 0] > 0.8 and s.induction[1, 0] == s.induction.max()
    # an untouched head attends uniformly: its scores are small
    assert s.prev_token[1, 3] < 0.3 and s.induction[1, 3] < 0.1


def test_heads_table_and_plot(tiny_models, tmp_path):
    model = planted_model()
    table = heads_table(model, n_tokens=10, n_seqs=1)
    assert list(table.columns) == ["layer", "head", "prev_token", "induction", "duplicate", "qk_skew"]
    assert len(table) == 2 * N_HEADS and tuple(table.iloc[0][["layer", "head"]]) == (1, 0)
    assert table["qk_skew"].between(-1, 1).all()
    dup = table[(table.layer == 0) & (table["head"] == 1)]
    assert float(dup["qk_skew"].iloc[0]) > 0.99  # q = k = u: a purely "concordant" head
    path = plot_heads(table, tmp_path / "heads.png")
    assert matplotlib.image.imread(path).std() > 0.01
    with pytest.raises(InputError, match="sort_by"):
        heads_table(tiny_models["gpt2"], n_tokens=5, n_seqs=1, sort_by="nope")
