"""Interventions do exactly what they say: identity at scale 1, the predicted score change, nothing else."""

from __future__ import annotations

import matplotlib.image
import pytest
import torch

from qktrace.analyses.plots import plot_sweep
from qktrace.config import parse_scales
from qktrace.errors import InputError, OutOfRangeError
from qktrace.models.capture import forward_hooks
from qktrace.models.tokens import resolve_positions
from qktrace.saes import SAE
from qktrace.steering.interventions import (
    SCALE,
    FreezeAttention,
    ScaleHead,
    SteerFeature,
    SteerQK,
    generate_with,
    run_with,
)
from qktrace.steering.sweep import sweep
from qktrace.testing import hf_attention, random_prompt, random_saes

PROMPT = random_prompt(9, seed=4) + " Aunt Sally . the Aunt"


def stacked(per_layer) -> torch.Tensor:
    """A result's recorded patterns/scores (layer -> [head, q, k]) as one [layer, head, q, k] tensor."""
    return torch.stack([per_layer[i] for i in sorted(per_layer)])


def clean_patterns(clean) -> torch.Tensor:
    return torch.stack([clean.pattern(i) for i in range(clean.n_layers)])


def clean_scores(clean) -> torch.Tensor:
    return torch.stack([clean.scores(i) for i in range(clean.n_layers)])


def same_resid(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def active(sae: SAE, resid: torch.Tensor, pos: int) -> tuple[int, float]:
    acts = sae.encode(resid)[pos]
    f = int(acts.argmax())
    assert acts[f] > 0
    return f, float(acts[f])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def query_delta(model, clean, layer: int, head: int, p: int, dx: torch.Tensor) -> torch.Tensor:
    """A residual change dx [d_model] at position p, pushed to head's query at frozen scales [d_head]."""
    an, ly = model.anatomy, model.anatomy.layers[layer]
    dq = ly.ln_attn.linear(dx, clean.scale_ln_attn[layer, p]) @ ly.W_Q[head]
    if ly.q_norm is not None:
        dq = dq * clean.scale_q_norm[layer, head, p] * ly.q_norm.weight
    return dq if an.rotary is None else an.rotary.rotate(dq[None], torch.tensor([p]))[0]


def key_delta(model, clean, layer: int, kv: int, p: int, dx: torch.Tensor) -> torch.Tensor:
    an, ly = model.anatomy, model.anatomy.layers[layer]
    dk = ly.ln_attn.linear(dx, clean.scale_ln_attn[layer, p]) @ ly.W_K[kv]
    if ly.k_norm is not None:
        dk = dk * clean.scale_k_norm[layer, kv, p] * ly.k_norm.weight
    return dk if an.rotary is None else an.rotary.rotate(dk[None], torch.tensor([p]))[0]


def capped(ly, raw: torch.Tensor) -> torch.Tensor:
    return raw if ly.softcap is None else ly.softcap * torch.tanh(raw / ly.softcap)


def test_empty_and_scale_one_reproduce_clean_exactly(tiny_models, family):
    model = tiny_models[family]
    saes = random_saes(model, "standard", d_sae=24, b_enc=torch.ones(24))
    clean = model.run(PROMPT)
    plain = model.forward(clean.tokens)  # HF's own logits, no hooks
    f, _ = active(saes[1], clean.resid[1], -1)
    assert torch.equal(run_with(model, saes, PROMPT, []).logits, plain)
    ivs = [
        SteerFeature(1, f, -1, scale=1.0),
        SteerQK(1, (0, 2), "key", f, slice(2, 6), scale=1.0),
        SteerQK(1, 1, "query", f, [-1], scale=1.0),
        FreezeAttention(),
        ScaleHead(0, 3, 1.0),
    ]
    res = run_with(model, saes, PROMPT, ivs, record_attention=True)
    assert torch.equal(res.logits, plain)
    hf = hf_attention(model, clean.tokens)
    assert torch.equal(stacked(res.patterns), torch.stack(hf.patterns))
    assert torch.equal(stacked(res.scores), torch.stack(hf.scores))
    assert same_resid(res.resid, clean.resid)


def test_query_side_steering_changes_only_the_predicted_scores(tiny_models, family):
    model = tiny_models[family]
    saes = random_saes(model, "standard", d_sae=24, seed=1, b_enc=torch.ones(24))
    clean = model.run(PROMPT)
    L, h, p, s = 1, 1, clean.n_pos - 1, -2.0
    ly = model.anatomy.layers[L]
    f, a = active(saes[L], clean.resid[L], p)
    res = run_with(model, saes, PROMPT, [SteerQK(L, h, "query", f, p, scale=s)], clean=clean, record_attention=True)
    res_scores, res_patterns = stacked(res.scores), stacked(res.patterns)
    hf = hf_attention(model, clean.tokens)
    ref_scores, ref_patterns = torch.stack(hf.scores), torch.stack(hf.patterns)

    kv = ly.kv_head[h]
    dq = query_delta(model, clean, L, h, p, (s - 1) * a * saes[L].W_dec[f])
    raw = clean.q[L, h] @ clean.k[L, kv].T * ly.scale  # [q_pos, k_pos] clean, before any soft-cap
    raw[p] += (dq @ clean.k[L, kv].T) * ly.scale
    ok = torch.isfinite(ref_scores[L, h])
    assert rel_err(res_scores[L, h][ok], capped(ly, raw)[ok]) < 1e-4
    assert (res_scores[L, h] - ref_scores[L, h])[ok].abs().max() > 1e-2  # the steer did something
    assert torch.equal(res_scores[L, h, :p], ref_scores[L, h, :p])  # other query rows untouched
    for other in range(model.n_heads):
        if other != h:
            assert torch.equal(res_scores[L, other], ref_scores[L, other])
            assert torch.equal(res_patterns[L, other], ref_patterns[L, other])
    assert torch.equal(res_scores[:L], ref_scores[:L])
    assert torch.equal(res_patterns[:L], ref_patterns[:L])


def test_key_side_steering_of_one_head_in_a_kv_group(tiny_models, family):
    model = tiny_models[family]
    saes = random_saes(model, "standard", d_sae=24, seed=2, b_enc=torch.ones(24))
    clean = model.run(PROMPT)
    L, h, p, s = 1, 0, clean.n_pos - 3, 3.0
    ly = model.anatomy.layers[L]
    kv = ly.kv_head[h]
    f, a = active(saes[L], clean.resid[L], p)
    res = run_with(model, saes, PROMPT, [SteerQK(L, [h], "key", f, [p], scale=s)], clean=clean, record_attention=True)
    res_scores, res_patterns = stacked(res.scores), stacked(res.patterns)
    hf = hf_attention(model, clean.tokens)
    ref_scores, ref_patterns = torch.stack(hf.scores), torch.stack(hf.patterns)

    dk = key_delta(model, clean, L, kv, p, (s - 1) * a * saes[L].W_dec[f])
    raw = clean.q[L, h] @ clean.k[L, kv].T * ly.scale
    raw[:, p] += (clean.q[L, h] @ dk) * ly.scale
    ok = torch.isfinite(ref_scores[L, h])
    assert rel_err(res_scores[L, h][ok], capped(ly, raw)[ok]) < 1e-4
    assert (res_scores[L, h, :, p] - ref_scores[L, h, :, p])[ok[:, p]].abs().max() > 1e-2
    sharing = [o for o in range(model.n_heads) if o != h and ly.kv_head[o] == kv]
    if ly.n_kv_heads < ly.n_heads:
        assert sharing  # GQA: the head beside it reads the same key tensor and must not move
    for other in range(model.n_heads):
        if other != h:
            assert torch.equal(res_scores[L, other], ref_scores[L, other])
            assert torch.equal(res_patterns[L, other], ref_patterns[L, other])
    assert torch.equal(res_patterns[:L], ref_patterns[:L])


def test_freeze_attention_keeps_every_other_pattern_clean(tiny_models, family):
    model = tiny_models[family]
    saes = random_saes(model, "standard", d_sae=24, seed=3, b_enc=torch.ones(24))
    clean = model.run(PROMPT)
    f, _ = active(saes[0], clean.resid[0], 4)
    steer = SteerQK(0, 0, "key", f, 4, scale=-3.0)
    free = stacked(run_with(model, saes, PROMPT, [steer], clean=clean, record_attention=True).patterns)
    frozen = stacked(
        run_with(model, saes, PROMPT, [steer, FreezeAttention()], clean=clean, record_attention=True).patterns
    )
    ref = torch.stack(hf_attention(model, clean.tokens).patterns)  # HF's clean patterns
    assert torch.equal(frozen[0, 0], free[0, 0])
    assert not torch.equal(frozen[0, 0], ref[0, 0])
    assert not torch.equal(free[1], ref[1])  # downstream heads move without freezing
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            if (layer, head) != (0, 0):
                assert torch.allclose(frozen[layer, head], ref[layer, head], atol=1e-6)
    ivs = [steer, FreezeAttention(frozenset({(1, 2)}))]
    only = stacked(run_with(model, saes, PROMPT, ivs, clean=clean, record_attention=[1]).patterns)
    assert torch.allclose(only[0, 2], ref[1, 2], atol=1e-6)
    with pytest.raises(InputError, match="both steered and frozen"):
        run_with(model, saes, PROMPT, [steer, FreezeAttention(frozenset({(0, 0)}))], clean=clean)


@pytest.mark.parametrize("family_name", ["gpt2", "gemma2"])
def test_residual_steering_removes_exactly_a_v(tiny_models, family_name):
    model = tiny_models[family_name]
    saes = random_saes(model, "standard", d_sae=24, seed=4, b_enc=torch.ones(24))
    clean = model.run(PROMPT)
    p = 5
    for c in (1, model.n_layers):
        f, a = active(saes[c], clean.resid[c], p)
        v = saes[c].W_dec[f]
        res = run_with(model, saes, PROMPT, [SteerFeature(c, f, p, scale=0.0)], clean=clean)
        assert torch.equal(res.resid[c, p], clean.resid[c, p] - a * v)
        assert torch.equal(res.resid[c, :p], clean.resid[c, :p])
        assert same_resid(res.resid[:c], clean.resid[:c])
        assert not torch.equal(res.logits[p], model.forward(clean.tokens)[p])
    # inject a feature that is inactive somewhere: the residual moves by value * v
    acts = saes[1].encode(clean.resid[1])
    pos, f = (acts == 0).nonzero()[0].tolist()
    res = run_with(model, saes, PROMPT, [SteerFeature(1, f, pos, value=2.0)], clean=clean)
    assert torch.allclose(res.resid[1, pos], clean.resid[1, pos] + 2.0 * saes[1].W_dec[f], atol=1e-6)


def test_scale_head_zero_ablates_its_output(tiny_models):
    model = tiny_models["llama"]
    seen = {}
    grab = lambda mod, args, kwargs, out: seen.__setitem__("attn", out[0][0].detach())
    with forward_hooks([(model.attn_modules[1], grab)]):
        res = run_with(model, {}, PROMPT, [ScaleHead(1, 2, 0.0)], record_attention=True)
    clean = model.run(PROMPT)
    hf = hf_attention(model, clean.tokens)
    assert float(res.patterns[1][2].abs().max()) == 0.0
    assert torch.equal(res.patterns[1][:2], hf.patterns[1][:2])
    # the attention output loses exactly the head's z @ W_O
    ly = model.anatomy.layers[1]
    z = hf.patterns[1][2] @ clean.v[1, ly.kv_head[2]]  # [pos, d_head]
    assert rel_err(seen["attn"], hf.attn_out[1] - z @ ly.W_O[2]) < 1e-5
    half = run_with(model, {}, PROMPT, [ScaleHead(1, 2, 0.5)], record_attention=[1])
    assert torch.allclose(half.patterns[1][2], 0.5 * hf.patterns[1][2])


def test_generate_with_is_greedy_and_applies_interventions(tiny_models):
    model = tiny_models["qwen2"]
    saes = random_saes(model, "standard", d_sae=24, b_enc=torch.ones(24))
    ids = model.tokenize(PROMPT)
    plain = ids
    for _ in range(3):
        plain = torch.cat([plain, model.forward(plain)[-1].argmax().reshape(1)])
    assert generate_with(model, saes, PROMPT, [], max_new_tokens=3) == model.tokenizer.decode(plain[-3:].tolist())
    clean = model.run(ids)
    f, _ = active(saes[1], clean.resid[1], -1)
    out = generate_with(model, saes, PROMPT, [SteerFeature(1, f, -1, scale=-8.0), FreezeAttention()], 3)
    assert isinstance(out, str) and len(out.split()) == 3


def test_errors_are_one_line_and_name_the_fix(tiny_models):
    model = tiny_models["gpt2"]
    saes = random_saes(model, "standard", d_sae=24, b_enc=torch.ones(24))
    with pytest.raises(InputError, match="exactly one of scale= or value="):
        SteerFeature(1, 0, 0)
    with pytest.raises(OutOfRangeError, match="checkpoint 9"):
        run_with(model, saes, PROMPT, [SteerFeature(9, 0, 0, scale=2.0)])
    with pytest.raises(OutOfRangeError, match="no SAE at checkpoint 1"):
        run_with(model, {0: saes[0]}, PROMPT, [SteerQK(1, 0, "key", 0, 0, scale=2.0)])
    with pytest.raises(OutOfRangeError, match="position 99"):
        run_with(model, saes, PROMPT, [SteerFeature(1, 0, 99, scale=2.0)])
    with pytest.raises(InputError, match="SCALE placeholder"):
        run_with(model, saes, PROMPT, [ScaleHead(0, 0, SCALE)])
    assert resolve_positions(slice(-3, None), 10) == [7, 8, 9]
    assert resolve_positions([5, -1, 5], 10) == [5, 9]


def test_parse_scales():
    assert parse_scales("-4:4:9") == [-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0]
    assert parse_scales("0, 1.5") == [0.0, 1.5]
    assert parse_scales([2, 3]) == [2.0, 3.0]
    with pytest.raises(InputError, match="start:stop:count"):
        parse_scales("1:2")


def test_sweep_rows_columns_and_plot(tiny_models, tmp_path):
    model = tiny_models["gemma2"]
    saes = random_saes(model, "standard", d_sae=24, b_enc=torch.ones(24))
    clean = model.run(PROMPT)
    f, _ = active(saes[1], clean.resid[1], 11)
    ivs = [SteerQK(1, (0, 1), "key", f, 11, scale=SCALE)]
    df = sweep(model, saes, PROMPT, ivs, "-2:1:4", watch_tokens=["Sally", "Aunt"], watch_attention=[(1, 0, -1, 11)])
    assert len(df) == 4 and list(df["scale"]) == [-2.0, -1.0, 0.0, 1.0]
    attn = f"attn:L1.H0:{clean.n_pos - 1}->11"
    for col in ("top_1", "p_top_1", "top_5", "p_top_5", "p:Sally", "p:Aunt", "logit_diff", attn):
        assert col in df.columns
    last = df.iloc[-1]  # scale 1 = clean
    probs = torch.softmax(clean.last_logits, -1)
    assert last["p:Sally"] == pytest.approx(float(probs[model.token_id("Sally")]), abs=1e-6)
    assert last[attn] == pytest.approx(float(hf_attention(model, clean.tokens).patterns[1][0, -1, 11]), abs=1e-6)
    assert df[attn].nunique() > 1
    same = sweep(model, saes, PROMPT, lambda s: [SteerQK(1, (0, 1), "key", f, 11, scale=s)], [-2.0])
    assert same["p_top_1"].iloc[0] == pytest.approx(df["p_top_1"].iloc[0])
    path = plot_sweep(df, tmp_path / "sweep.png")
    img = matplotlib.image.imread(path)
    assert path.stat().st_size > 1000 and img.std() > 0.01
