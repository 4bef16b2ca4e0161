"""`explain` on a checkpointed tracer (transcoders + attention-output SAEs, strategy 2): heads ranked by the graph's
real head loadings, candidates among the transcoder and attention features below each site, confirmed by steering
them inside their heads' QK circuits, controlled by other active features of the same kind. Every number is checked
against a second code path (the graph's own ranking, direct `run_with` passes from a fresh clean run)."""

from __future__ import annotations

import pytest
import torch

from qktrace import ExplainSettings, FreezeAttention, ScaleHead, Tracer, explain, run_with
from qktrace.analyses.candidates import scaled_row
from qktrace.analyses.control import draw_controls
from qktrace.analyses.explain import attended_key
from qktrace.nodes import CODE, Kind
from qktrace.saes import load_transcoders
from qktrace.steering.interventions import SteerQK
from qktrace.testing import random_attention_saes, random_prompt, write_transcoder_set

PROMPT = "Aunt Sally is the opposite of Uncle Bob . Aunt"
SMALL = ExplainSettings(sites=2, ablate=5, candidates=3, top_k=(2,), scales=(1.0, 0.0, -2.0), null_draws=4)


def _tracer(model, tmp_path, sites=("z", "attn_out")) -> Tracer:
    ts = load_transcoders(write_transcoder_set(tmp_path / "ct", model.d_model, model.n_layers), model)
    return Tracer(model, transcoders=ts, attention_saes=random_attention_saes(model, sites))


def _fresh(tracer: Tracer, ivs, record=()):
    res = run_with(
        tracer.model, {}, tracer.tokenize(PROMPT), ivs, record_attention=list(record),
        transcoders=tracer.transcoders, attention_saes=tracer.attention_saes,
    )  # fmt: skip
    return res.logits[-1].float(), res.patterns


def _active(traced, kind: str) -> set[tuple[int, int, int]]:
    w = traced.writers()
    enc = w.enc if kind == "transcoder" else w.att
    return {(int(ly), int(p), int(f)) for ly, p, f in zip(enc.layer, enc.pos, enc.index)}


@pytest.mark.parametrize(
    "fam,sites", [("gpt2", ("z", "attn_out")), ("llama", ("attn_out", "z")), ("gemma2", ("z", "attn_out"))]
)
def test_explain_on_a_checkpointed_tracer_equals_its_graph_and_direct_interventions(tiny_models, tmp_path, fam, sites):
    model = tiny_models[fam]
    tracer = _tracer(model, tmp_path, sites)
    m = explain(tracer, PROMPT, "Sally", settings=SMALL)
    traced = tracer.run(PROMPT)
    graph = traced.graph(targets=[m.answer_id], progress=False, qk_terms=False)
    assert graph.settings["graph"] == "checkpointed"
    top = graph.top_heads(max(SMALL.ablate, SMALL.sites))
    assert top and [(h.layer, h.head) for h in m.heads] == [(t["layer"], t["head"]) for t in top]
    assert [h.influence for h in m.heads] == pytest.approx([t["influence"] for t in top])
    for h in m.heads:
        logits, _ = _fresh(tracer, [ScaleHead(h.layer, h.head, 0.0), FreezeAttention()])
        assert h.ablation == pytest.approx(float(logits[m.answer_id] - logits[m.rival_id]) - m.metric, abs=2e-3)
    assert m.sites and all(s.layer > 0 for s in m.sites)  # layer 0's heads read no feature
    q = len(m.str_tokens) - 1
    kinds = set()
    for c in m.candidates:
        for p in c.parts:
            kinds.add(p.kind)
            assert p.kind in ("transcoder", "attn") and len(p.feature_layers) == len(p.features)
            assert all(ly < p.layer and (ly, p.position, f) in _active(traced, p.kind) for ly, f in p.keys)
        where = [(p.layer, h, p.key_pos) for p in c.parts for h in p.heads]
        for point in c.curve:
            logits, patterns = _fresh(tracer, c.interventions(point.scale), {ly for ly, _, _ in where})
            assert point.metric == pytest.approx(float(logits[m.answer_id] - logits[m.rival_id]), abs=2e-3)
            assert point.attention == pytest.approx([float(patterns[ly][h, q, k]) for ly, h, k in where], abs=1e-4)
        if len(c.parts) == 1:  # the ranking's prediction equals brute-force steering at the lowest scale
            assert c.predicted_attention == pytest.approx(list(c.lowest("scale").attention), abs=1e-4)
    assert "attn" in kinds  # attention-SAE features compete with transcoder features
    assert m.nulls and isinstance(m.verdict(), str) and m.to_json()["verdict"] == m.verdict()
    tested = m.candidates[m.nulls[0].candidate]
    controls = draw_controls(traced, tested, SMALL.null_draws, SMALL.null_seed)
    assert controls and tuple(x.features for x in controls) == m.nulls[0].draws
    for x in controls:  # each part's draw: other active features of its kind, at its position, below its layer
        for p, d in zip(tested.parts, x.parts, strict=True):
            assert d.kind == p.kind and d.keys and not set(d.keys) & set(p.keys)
            assert all(ly < p.layer and (ly, p.position, f) in _active(traced, p.kind) for ly, f in d.keys)


def test_controls_of_an_attention_candidate_draw_other_active_attention_features(tiny_models, tmp_path):
    tracer = _tracer(tiny_models["llama"], tmp_path)
    m = explain(tracer, PROMPT, "Sally", settings=ExplainSettings(**{**SMALL.__dict__, "null_draws": 0}))
    c = next(c for c in m.candidates if c.parts[0].kind == "attn" and len(c.parts) == 1)
    traced = tracer.run(PROMPT)
    p = c.parts[0]
    pool = {(ly, f) for ly, ps, f in _active(traced, "attn") if ps == p.position and ly < p.layer}
    draws = draw_controls(traced, c, 6, seed=0)
    assert draws
    for d in draws:
        keys = set(d.parts[0].keys)
        assert d.parts[0].kind == "attn"
        assert keys <= pool - set(p.keys) and len(keys) == min(len(p.features), len(pool) - len(p.keys))
        assert d.parts[0].labels == tuple(f"a{ly}/f{f}" for ly, f in sorted(keys))


@pytest.mark.parametrize("fam", ["gpt2", "llama", "gemma2"])
@pytest.mark.parametrize("side", ["query", "key"])
def test_scaled_row_of_attention_features_is_the_steered_pattern(tiny_models, tmp_path, fam, side):
    model = tiny_models[fam]
    tracer = _tracer(model, tmp_path)
    traced = tracer.run(random_prompt(10, seed=2))
    layer, head, q = 1, 2, traced.trace.n_pos - 1
    att = traced.qk(layer, head, q)
    key = attended_key(traced, layer, head, q)
    position = q if side == "query" else key
    comp = att.query if side == "query" else att.key
    sel = ((comp.kind == CODE[Kind.ATTN_FEATURE]) & (comp.pos == position)).nonzero().flatten()[:3]
    feats, layers = comp.feature[sel].tolist(), comp.layer[sel].tolist()
    assert feats
    assert torch.allclose(scaled_row(att, side, position, feats, 1.0, layers, "attn"), att.pattern, atol=1e-5)
    for factor in (0.0, -2.0):
        ivs = [SteerQK(layer, head, side, f, position, scale=factor, kind=Kind.ATTN_FEATURE, feature_layer=ly)
               for ly, f in zip(layers, feats)]  # fmt: skip
        res = run_with(model, {}, traced.trace.tokens, ivs + [FreezeAttention()], record_attention=[layer],
                       attention_saes=tracer.attention_saes)  # fmt: skip
        got = res.patterns[layer][head, q, list(att.key_positions)]
        want = scaled_row(att, side, position, feats, factor, layers, "attn")
        assert torch.allclose(want, got, atol=1e-5)
        assert not torch.allclose(want, att.pattern, atol=1e-4)
        assert not torch.allclose(want, scaled_row(att, side, position, feats, factor, layers), atol=1e-4)
