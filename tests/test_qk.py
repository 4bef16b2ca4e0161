"""QK attributions sum to the model's own pre-softmax scores, for every family and SAE architecture."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qktrace import Tracer
from qktrace.errors import InputError, OutOfRangeError
from qktrace.nodes import Kind, Node
from qktrace.saes import SAESet
from qktrace.testing import hf_attention, random_prompt, random_saes


@pytest.fixture(scope="module")
def tracers(tiny_models):
    archs = ["standard", "jumprelu", "topk"]
    return {(f, a): Tracer(m, random_saes(m, a, seed=i)) for i, (f, m) in enumerate(tiny_models.items()) for a in archs}


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_terms_sum_to_hf_score_whole_row(tracers, family, arch):
    tracer = tracers[(family, arch)]
    traced = tracer.run(random_prompt(12, 7))
    hf = hf_attention(tracer.model, traced.trace.tokens)  # HF's softmax input, captured by its own spy
    for layer in range(tracer.model.n_layers):
        for head in range(tracer.model.n_heads):
            att = traced.qk(layer, head, -1)
            assert att.max_relative_error() < 1e-4
            model_score = hf.scores[layer][head, -1, list(att.key_positions)]
            assert torch.isfinite(model_score).all()
            scale = float(att.terms.abs().max())
            assert float((att.capped_sum - model_score).abs().max()) < 1e-4 * scale
            assert float((att.score - model_score).abs().max()) < 1e-5 * scale
            assert att.terms.shape[0] == len(att.query.ids)
            assert att.terms.abs().max() > 1e-3
    # at least one SAE feature is active at the query, so feature terms are real
    assert any(Node.parse(c).kind is Kind.FEATURE for c in att.query.ids)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fam=st.sampled_from(["gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma2"]),
    seed=st.integers(0, 10_000),
    n=st.integers(2, 16),
    head=st.integers(0, 3),
    layer=st.integers(0, 1),
    data=st.data(),
)
def test_hypothesis_single_key(tracers, fam, seed, n, head, layer, data):
    traced = tracers[(fam, "topk")].run(random_prompt(n, seed))
    n_pos = traced.trace.n_pos
    q = data.draw(st.integers(0, n_pos - 1))
    allowed = torch.isfinite(traced.trace.scores(layer, q, [head])[0, 0]).nonzero().flatten().tolist()
    k = data.draw(st.sampled_from(allowed))
    att = traced.qk(layer, head, q, k)
    assert att.max_relative_error() < 1e-4
    whole = traced.qk(layer, head, q)
    i = whole.key_positions.index(k)
    assert torch.allclose(whole.sum_of_terms[i], att.sum_of_terms[0], rtol=1e-5, atol=1e-5)


def test_unrotated_equals_rotated_without_rotary(tracers):
    att = tracers[("gpt2", "topk")].run(random_prompt(8, 1)).qk(1, 2, -1)
    assert torch.equal(att.terms, att.unrotated)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "qwen3"])
def test_positional_share_is_what_rotary_adds(tracers, family):
    """The unrotated terms are recomputed independently: each component's d_head vector un-rotated by
    its own position's rotation (rotary is orthogonal), so positional = terms - unrotated is rotary's share."""
    tracer = tracers[(family, "topk")]
    att = tracer.run(random_prompt(9, 1)).qk(1, 2, -1)
    rotary = tracer.model.anatomy.rotary
    assert rotary is not None

    def unrotate(x, pos):  # R(p)^T x: rotate by -p, i.e. the inverse rotation
        cos, sin = rotary.cos_sin(pos)
        r, half = rotary.rotary_dim, rotary.rotary_dim // 2
        xr, xp = x[..., :r], x[..., r:]
        back = torch.cat((xr[..., half:], -xr[..., :half]), -1)  # rotate_half transposed
        return torch.cat((xr * cos + back * sin, xp), -1)

    q = unrotate(att.query.rotated, att.query.pos)
    k = unrotate(att.key.rotated, att.key.pos)
    ly = tracer.model.anatomy.layers[1]
    assert torch.allclose(q, att.query.unrotated, atol=1e-4)
    expected = (q @ k.T) * ly.scale
    assert torch.allclose(att.unrotated, expected, atol=1e-4 * float(att.terms.abs().max()))
    # rotary changes cross-position terms; at the query's own position the rotation cancels
    same = att.key.pos == att.query_pos
    assert torch.allclose(att.terms[:, same], att.unrotated[:, same], atol=1e-5)
    positional = att.terms - att.unrotated
    assert float(positional[:, ~same].abs().max()) > 1e-3 * float(att.terms.abs().max())


def test_gemma_softcap_reports_precap_and_capped(tracers):
    att = tracers[("gemma2", "standard")].run(random_prompt(10, 3)).qk(0, 1, -1)
    assert att.softcap == 3.0
    assert torch.allclose(att.capped_sum, 3.0 * torch.tanh(att.sum_of_terms / 3.0))
    assert torch.allclose(att.capped_sum, att.score, atol=1e-4)


def test_marginals_and_groups_sum_to_score(tracers):
    att = tracers[("qwen3", "jumprelu")].run(random_prompt(10, 4)).qk(1, 3, -1, -3)
    total = float(att.sum_of_terms[0])
    assert abs(att.query_marginals().sum() - total) < 1e-4 * max(1, abs(total))
    assert abs(att.key_marginals().sum() - total) < 1e-4 * max(1, abs(total))
    feats = [c for c in att.query.ids if Node.parse(c).kind is Kind.FEATURE]
    table = att.group({"q-features": feats})
    assert abs(table.to_numpy().sum() - total) < 1e-4 * max(1, abs(total))
    df = att.terms_frame(top=5)
    assert list(df["value"].abs()) == sorted(df["value"].abs(), reverse=True)


def test_prob_effects_match_finite_difference(tracers):
    """p_k(delta - p_j) t predicts the change of the attention probability when a term is removed."""
    att = tracers[("llama", "topk")].run(random_prompt(9, 5)).qk(0, 0, -1)
    k = int(att.pattern.argmax())
    eff = att.prob_effects()
    qi, ki = divmod(int(att.terms.abs().argmax()), att.terms.shape[1])
    eps = 1e-6
    s = att.sum_of_terms.double()
    j = att.key_positions.index(int(att.key.pos[ki]))
    bumped = s.clone()
    bumped[j] += eps * float(att.terms[qi, ki])
    fd = (torch.softmax(bumped, 0)[k] - torch.softmax(s, 0)[k]) / eps
    assert abs(float(fd)) > 1e-6
    assert abs(float(fd) - float(eff[qi, ki])) < 2e-3 * abs(float(fd))


def test_contrast_sums_to_score_difference(tracers):
    att = tracers[("mistral", "topk")].run(random_prompt(9, 6)).qk(1, 1, -1)
    a, b = att.key_positions[-1], att.key_positions[-2]
    df = att.contrast(a, b, top=None)
    want = float(att.sum_of_terms[att.key_positions.index(a)] - att.sum_of_terms[att.key_positions.index(b)])
    assert abs(df["diff"].sum() - want) < 1e-4 * max(1.0, abs(want))


def test_errors_are_clear(tracers, tiny_models):
    traced = tracers[("llama", "topk")].run(random_prompt(6, 0))
    with pytest.raises(OutOfRangeError, match="layer 9"):
        traced.qk(9, 0, -1)
    with pytest.raises(OutOfRangeError, match="head"):
        traced.qk(0, 4, -1)
    with pytest.raises(OutOfRangeError, match="query position 40"):
        traced.qk(0, 0, 40)
    with pytest.raises(OutOfRangeError, match="cannot attend"):
        traced.qk(0, 0, 2, 5)
    no_sae = Tracer(tiny_models["llama"], SAESet({})).run(random_prompt(6, 0))
    with pytest.raises(InputError, match=r"no SAE at checkpoint 0 \(loaded: none\): load an SAE"):
        no_sae.qk(0, 0, -1)


def test_effects_frame_ranks_inhibition(tracers):
    att = tracers[("qwen2", "topk")].run(random_prompt(10, 8)).qk(1, 0, -1)
    inh = att.effects_frame(top=5)
    assert list(inh["prob_effect"]) == sorted(inh["prob_effect"])
    assert inh["prob_effect"].iloc[0] == float(att.prob_effects().min())
    exc = att.effects_frame(top=5, inhibitory=False)
    assert exc["prob_effect"].iloc[0] == float(att.prob_effects().max())


@pytest.mark.parametrize("features_only", [False, True])
def test_heatmap_cells_sum_to_the_score(tracers, features_only):
    """The query x key heatmap: the top components of each side by |marginal| and "other"; its cells sum to
    the model's own score of that key, and each cell is the sum of the terms of its row's and column's parts."""
    traced = tracers[("llama", "jumprelu")].run(random_prompt(9, 11))
    att = traced.qk(1, 2, -1)
    key = att.key_positions[-2]
    hm = att.heatmap(top=3, key_pos=key, features_only=features_only)
    values = torch.tensor(hm["values"], dtype=torch.float64)
    assert values.shape == (len(hm["query"]), len(hm["key"])) and values.shape[0] <= 4 and values.shape[1] <= 4
    score = float(att.score[att.key_positions.index(key)])
    assert abs(float(values.sum()) - score) < 1e-4 * max(1.0, abs(score))
    named = [c for c in hm["query"] + hm["key"] if c != "other"]
    assert named and all((Node.parse(c).kind is Kind.FEATURE) or not features_only for c in named)
    assert all(Node.parse(c).pos == key for c in hm["key"] if c != "other")
    q0, k0 = att.query.ids.index(hm["query"][0]), att.key.ids.index(hm["key"][0])
    assert values[0, 0] == pytest.approx(float(att.terms[q0, k0]), rel=1e-6)
    at_key = att.terms[:, att.key.pos == key].sum(1)  # each query component's share of this key's score
    top_q = att.query.ids[int(at_key.abs().argmax())]  # the strongest comes first without the filter
    assert features_only or hm["query"][0] == top_q
    assert hm["query_labels"][0] == att.label(hm["query"][0])
