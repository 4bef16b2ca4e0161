"""`explain` on a tracer of transcoders: candidates are transcoder features ranked by the transcoder QK terms,
confirmed by steering them inside their heads' QK circuits, controlled by other active transcoder features.
Every number is checked against a second code path (direct `run_with` passes from a fresh clean run)."""

from __future__ import annotations

import pytest
import torch

from qktrace import ExplainSettings, FreezeAttention, ScaleHead, Tracer, explain, run_with
from qktrace.analyses.control import carrier_heads, draw_controls
from qktrace.analyses.explain import attended_key, scaled_row
from qktrace.nodes import CODE, Kind
from qktrace.saes import CrossLayerTranscoder, TranscoderSet, load_transcoders
from qktrace.steering.interventions import SteerQK
from qktrace.testing import random_prompt, write_transcoder_set

PROMPT = "Aunt Sally is the opposite of Uncle Bob . Aunt"
SMALL = ExplainSettings(sites=2, ablate=3, candidates=2, top_k=(2,), scales=(1.0, 0.0, -2.0), null_draws=4)


def _tracer(model, tmp_path, clt: bool = False) -> Tracer:
    if not clt:
        return Tracer(model, transcoders=load_transcoders(write_transcoder_set(tmp_path / "ct", 32, 2), model))
    n, d, d_sae = model.n_layers, model.d_model, 24
    g = torch.Generator().manual_seed(1)
    c = CrossLayerTranscoder(
        "standard",
        W_enc=torch.randn(n, d, d_sae, generator=g) / d**0.5,
        b_enc=torch.randn(n, d_sae, generator=g) * 0.2 - 0.3,
        W_dec=tuple(torch.randn(d_sae, n - i, d, generator=g) * 0.3 for i in range(n)),
        b_dec=torch.randn(n, d, generator=g) * 0.2,
        input_site="mlp_in",
    )
    return Tracer(model, transcoders=TranscoderSet(clt=c))


def _fresh(tracer: Tracer, ivs, record=()):
    res = run_with(
        tracer.model, tracer.saes, tracer.tokenize(PROMPT), ivs, record_attention=list(record),
        transcoders=tracer.transcoders,
    )  # fmt: skip
    return res.logits[-1].float(), res.patterns


@pytest.mark.parametrize("fam,clt", [("gpt2", False), ("llama", False), ("llama", True)])
def test_explain_on_transcoders_equals_direct_interventions(tiny_models, tmp_path, fam, clt):
    model = tiny_models[fam]
    if clt:  # three layers: layer 2's heads read features of layers 0 and 1, each writing later layers too
        from qktrace.models import load_model
        from qktrace.testing import make_tiny_model

        model = load_model(make_tiny_model(fam, tmp_path / "m", seed=3, num_hidden_layers=3))
    tracer = _tracer(model, tmp_path, clt)
    m = explain(tracer, PROMPT, "Sally", settings=SMALL)
    assert m.heads and m.sites and m.candidates
    assert all(s.layer > 0 for s in m.sites)  # layer 0's heads read no transcoder feature
    for h in m.heads:
        logits, _ = _fresh(tracer, [ScaleHead(h.layer, h.head, 0.0), FreezeAttention()])
        assert h.ablation == pytest.approx(float(logits[m.answer_id] - logits[m.rival_id]) - m.metric, abs=2e-3)
    q = len(m.str_tokens) - 1
    traced = tracer.run(PROMPT)
    active = {(int(ly), int(p), int(f)) for ly, p, f in zip(*(getattr(traced.writers().enc, k)
              for k in ("layer", "pos", "index")))}  # fmt: skip
    for c in m.candidates:
        for p in c.parts:
            assert p.kind == "transcoder" and len(p.feature_layers) == len(p.features)
            assert all(ly < p.layer and (ly, p.position, f) in active for ly, f in p.keys)
        where = [(p.layer, h, p.key_pos) for p in c.parts for h in p.heads]
        for point in c.curve:
            logits, patterns = _fresh(tracer, c.interventions(point.scale), {ly for ly, _, _ in where})
            assert point.metric == pytest.approx(float(logits[m.answer_id] - logits[m.rival_id]), abs=2e-3)
            assert point.attention == pytest.approx([float(patterns[ly][h, q, k]) for ly, h, k in where], abs=1e-4)
        if len(c.parts) == 1:  # the ranking's prediction equals brute-force steering at the lowest scale
            assert c.predicted_attention == pytest.approx(list(c.lowest("scale").attention), abs=1e-4)
    assert m.nulls and isinstance(m.verdict(), str) and m.to_json()["verdict"] == m.verdict()
    for draw in m.nulls[0].draws:
        assert draw and all((ly, f) not in m.candidates[m.nulls[0].candidate].features for ly, f in draw)
    assert "t0/f" in m.markdown()


def test_controls_draw_other_active_transcoder_features(tiny_models, tmp_path):
    tracer = _tracer(tiny_models["llama"], tmp_path)
    m = explain(tracer, PROMPT, "Sally", settings=SMALL)
    c = m.candidates[0]
    traced = tracer.run(PROMPT)
    enc = traced.writers().enc
    p = c.parts[0]
    pool = {(int(ly), int(f)) for ly, ps, f in zip(enc.layer, enc.pos, enc.index) if ps == p.position and ly < p.layer}
    draws = draw_controls(traced, c, 6, seed=0)
    assert draws
    for d in draws:
        keys = set(d.parts[0].keys)
        assert keys <= pool - set(p.keys) and len(keys) == min(len(p.features), len(pool) - len(p.keys))
        assert d.parts[0].labels == tuple(f"t{ly}/f{f}" for ly, f in sorted(keys))


@pytest.mark.parametrize("fam", ["gpt2", "llama", "gemma2"])
@pytest.mark.parametrize("side", ["query", "key"])
def test_scaled_row_of_transcoder_features_is_the_steered_pattern(tiny_models, tmp_path, fam, side):
    model = tiny_models[fam]
    tracer = _tracer(model, tmp_path)
    traced = tracer.run(random_prompt(10, seed=2))
    layer, head, q = 1, 2, traced.trace.n_pos - 1
    att = traced.qk(layer, head, q)
    key = attended_key(traced, layer, head, q)
    position = q if side == "query" else key
    comp = att.query if side == "query" else att.key
    sel = ((comp.kind == CODE[Kind.TRANSCODER]) & (comp.pos == position)).nonzero().flatten()[:3]
    feats, layers = comp.feature[sel].tolist(), comp.layer[sel].tolist()
    assert feats
    assert torch.allclose(scaled_row(att, side, position, feats, 1.0, layers), att.pattern, atol=1e-5)
    for factor in (0.0, -2.0):
        ivs = [SteerQK(layer, head, side, f, position, scale=factor, kind=Kind.TRANSCODER, feature_layer=ly)
               for ly, f in zip(layers, feats)]  # fmt: skip
        res = run_with(model, {}, traced.trace.tokens, ivs + [FreezeAttention()], record_attention=[layer],
                       transcoders=tracer.transcoders)  # fmt: skip
        got = res.patterns[layer][head, q, list(att.key_positions)]
        want = scaled_row(att, side, position, feats, factor, layers)
        assert torch.allclose(want, got, atol=1e-5)
        assert not torch.allclose(want, att.pattern, atol=1e-4)


def test_heads_of_a_transcoder_graph_are_the_ones_that_carry_it(tmp_path):
    """With every attention head's W_O zeroed but one, that head carries all the cross-position influence."""
    import transformers

    from qktrace.testing import make_tiny_model

    path = make_tiny_model("llama", tmp_path / "m", seed=11)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path)
    d_head = hf.config.hidden_size // hf.config.num_attention_heads
    with torch.no_grad():
        for layer, block in enumerate(hf.model.layers):
            keep = torch.zeros_like(block.self_attn.o_proj.weight)
            if layer == 1:
                keep[:, 1 * d_head : 2 * d_head] = 1
            block.self_attn.o_proj.weight.mul_(keep)
    hf.save_pretrained(path)
    tracer = Tracer.load(path, transcoders=write_transcoder_set(tmp_path / "ct", 32, 2))
    traced = tracer.run(random_prompt(10, seed=8))
    graph = traced.graph(progress=False, qk_terms=False)
    heads = carrier_heads(traced, graph, 5)
    assert [(h["layer"], h["head"]) for h in heads] == [(1, 1)]
    assert heads[0]["influence"] == pytest.approx(1.0)


def _planted(path, answer: str = "Sally"):
    """A tiny GPT-2 whose layer-1 head 0 answers `answer` because of one layer-0 transcoder feature (f0): as
    `qktrace.testing.make_qk_circuit`, but f0 reads layer 0's MLP input at the last position (activation 1)
    and writes exactly that MLP's output there, and the head's query reads only the part of f0's write that no
    other writer of that residual shares; the key reads the residual at key 3, W_O writes the answer."""
    import dataclasses

    from transformers import AutoModelForCausalLM

    from qktrace.models import load_model
    from qktrace.saes import Transcoder
    from qktrace.testing import make_tiny_model, random_sae, word_tokenizer

    make_tiny_model("gpt2", path)
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    tok = word_tokenizer(path)
    prompt, key_pos, d_head = "w5 w6 Bob w7 w8 w9 Uncle w10 is", 3, 8
    mlp, block = hf.transformer.h[0].mlp, hf.transformer.h[1]
    seen = {}
    hooks = [mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0][0, -1].detach())),
             mlp.register_forward_hook(lambda m, a, o: seen.__setitem__("y", o[0, -1].detach()))]  # fmt: skip
    with torch.no_grad():
        block.ln_1.bias.zero_()
        r = hf(tok(prompt, return_tensors="pt")["input_ids"], output_hidden_states=True).hidden_states[1][0]
    for h in hooks:
        h.remove()
    x_in, d0, gain = seen["x"], seen["y"], block.ln_1.weight.detach()
    rest, mine = ((v - v.mean()) * gain for v in (r[-1] - d0, d0))  # through ln_1 at unit scale
    u = mine - (mine @ rest) / (rest @ rest) * rest  # f0's own part of the query residual
    d = hf.config.n_embd
    with torch.no_grad():
        xk = block.ln_1(r)[key_pos]
        W, b = block.attn.c_attn.weight, block.attn.c_attn.bias  # [d_model, 3 d_model]: q | k | v
        for part, direction in ((0, 6.0 * u / u.norm()), (1, 1.5 * xk / xk.norm()), (2, xk / xk.norm())):
            cols = slice(part * d, part * d + d_head)  # head 0
            W[:, cols], b[cols] = 0.0, 0.0
            W[:, cols.start] = direction
        e = hf.transformer.wte.weight[tok.convert_tokens_to_ids(answer)]
        block.attn.c_proj.weight[:d_head] = 0.0
        block.attn.c_proj.weight[0] = 40.0 * (e - e.mean()) / e.norm()
    hf.save_pretrained(path)
    coders = {}
    for layer in range(2):
        c = random_sae("standard", d, 48, seed=5 + layer, checkpoint=layer, std=(d**-0.5, 0.2, 0.3, 0.2))
        W_enc, b_enc, W_dec = c.W_enc.clone(), c.b_enc - 0.2, c.W_dec.clone()
        if layer == 0:
            W_enc[:, 0], b_enc[0], W_dec[0] = x_in / x_in.dot(x_in), 0.0, d0
        coders[layer] = Transcoder(layer, dataclasses.replace(c, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec), "mlp_in")
    return Tracer(load_model(path), transcoders=TranscoderSet(coders)), prompt


def test_explain_finds_the_planted_transcoder_feature_and_calls_it_specific(tmp_path):
    tracer, prompt = _planted(tmp_path / "m")
    traced = tracer.run(prompt)
    assert float(traced.pattern(1, 0, -1)[3]) > 0.9  # the head finds key 3 ...
    att = traced.qk(1, 0, traced.trace.n_pos - 1, 3)
    f0 = att.query.ids.index(f"transcoder/l0/p{traced.trace.n_pos - 1}/f0")
    assert float(att.terms[f0].sum()) == pytest.approx(float(att.sum_of_terms[0]), rel=0.05)  # ... through f0
    m = explain(tracer, prompt, "Sally", settings=SMALL)
    assert m.best is not None and (0, 0) in m.best.features and m.best.side == "query"
    assert all(p.kind == "transcoder" and p.layer == 1 and 0 in p.heads for p in m.best.parts)
    assert m.confirmed and m.specific and m.null is not None and m.null.candidate == m.candidates.index(m.best)
    assert "specific" in m.verdict()
