"""`compare` / `Traced.compare`: two aligned prompts, head by head, checked against HF's own numbers.

- the attention differences are HF's patterns of the two prompts subtracted (captured independently);
- per compared head, the term differences plus the rest sum to the difference of HF's scores, and
  each listed term equals the one recomputed from that prompt's own QK attribution (0 where absent);
- the skew is `qk_spectrum`'s, the logit differences are HF's logits;
- on the demo's yellow/red pair, the model says Yes then No, and some head's attention moves a lot;
- prompts of different lengths, or traced by different models, are refused in one line.
"""

from __future__ import annotations

import json

import pytest
import torch

from qktrace import Comparison, Tracer, compare
from qktrace.errors import InputError
from qktrace.steering.heads import qk_spectrum
from qktrace.testing import TINY_FAMILIES, hf_attention, random_saes

A = "Aunt Sally is the opposite of Uncle Bob . Aunt"
B = "Aunt Sally is the opposite of Uncle Sally . Aunt"


@pytest.mark.parametrize("fam", TINY_FAMILIES)
def test_differences_equal_hf(tiny_models, fam):
    model = tiny_models[fam]
    tracer = Tracer(model, random_saes(model, "topk", seed=2))
    a, b = tracer.run(A), tracer.run(B)
    c = a.compare(b, answer="Sally", rival="Bob", top=3, top_terms=5)
    assert isinstance(c, Comparison)
    assert c.differing == (8,)  # BOS, then "Bob" -> "Sally" at word 8
    hf_a, hf_b = hf_attention(model, a.trace.tokens), hf_attention(model, b.trace.tokens)
    q = a.trace.n_pos - 1
    for ly in range(model.n_layers):
        want = hf_b.patterns[ly][:, q] - hf_a.patterns[ly][:, q]  # [head, k_pos]
        assert torch.allclose(c.attention_diff[ly], want.float(), atol=1e-5)
    # heads ranked by their largest |difference|, each at the key where it is largest
    assert [abs(h.diff) for h in c.heads] == sorted((abs(h.diff) for h in c.heads), reverse=True)
    for h in c.heads:
        row = (hf_b.patterns[h.layer][h.head, q] - hf_a.patterns[h.layer][h.head, q]).abs()
        assert float(row[h.key_pos]) == pytest.approx(float(row.max()), abs=1e-5)
        assert h.skew == pytest.approx(qk_spectrum(model.anatomy.layers[h.layer], h.head).skew)
    assert len(c.terms) == 3
    for t in c.terms:
        score_a = float(hf_a.scores[t.layer][t.head, q, t.key_pos])
        score_b = float(hf_b.scores[t.layer][t.head, q, t.key_pos])
        cap = model.anatomy.layers[t.layer].softcap

        def capped(s: float, cap: float | None = cap) -> float:
            return s if cap is None else cap * float(torch.tanh(torch.tensor(s / cap)))

        assert capped(t.score_a) == pytest.approx(score_a, abs=1e-4 * max(1.0, abs(score_a)))
        assert capped(t.score_b) == pytest.approx(score_b, abs=1e-4 * max(1.0, abs(score_b)))
        total = sum(x.diff for x in t.terms) + t.rest
        assert total == pytest.approx(t.score_b - t.score_a, abs=1e-4 * max(1.0, abs(t.score_a), abs(t.score_b)))
        # every listed term, recomputed from each prompt's own attribution by component id
        for traced, col in ((a, "value_a"), (b, "value_b")):
            att = traced.qk(t.layer, t.head, q, t.key_pos)
            for x in t.terms:
                qi = att.query.ids.index(x.query) if x.query in att.query.ids else None
                ki = att.key.ids.index(x.key) if x.key in att.key.ids else None
                want = 0.0 if qi is None or ki is None else float(att.terms[qi, ki])
                assert getattr(x, col) == pytest.approx(want, abs=1e-6)
    sally, bob = model.token_id("Sally"), model.token_id("Bob")
    assert c.metric_a == pytest.approx(float(hf_a.logits[-1, sally] - hf_a.logits[-1, bob]), abs=1e-4)
    assert c.metric_b == pytest.approx(float(hf_b.logits[-1, sally] - hf_b.logits[-1, bob]), abs=1e-4)
    assert c.answer == "Sally" and c.rival == "Bob"


def test_answer_metric_and_views(tiny_models):
    model = tiny_models["llama"]
    tracer = Tracer(model, random_saes(model, "topk", seed=2))
    a, b = tracer.run(A), tracer.run(B)
    c = compare(a, b, answer="Sally", top=2)
    la, lb = hf_attention(model, a.trace.tokens).logits[-1], hf_attention(model, b.trace.tokens).logits[-1]
    sally = model.token_id("Sally")
    others = la.clone()
    others[sally] = -float("inf")
    rival = int(others.argmax())  # the default rival: prompt A's runner-up
    assert c.rival == model.str_tokens(torch.tensor([rival]))[0]
    assert c.metric_a == pytest.approx(float(la[sally] - la[rival]), abs=1e-4)
    assert c.metric_b == pytest.approx(float(lb[sally] - lb[rival]), abs=1e-4)
    df = c.frame()
    assert len(df) == model.n_layers * model.n_heads and list(df["diff"].abs()) == sorted(df["diff"].abs())[::-1]
    at = c.at_key(2)
    assert list(at["diff"]) == sorted(at["diff"])
    row = at.iloc[0]
    assert row["diff"] == pytest.approx(float(c.attention_diff[int(row["layer"]), int(row["head"]), 2]))
    data = json.loads(json.dumps(c.to_json(), allow_nan=False))
    assert data["differing"] == [8] and len(data["terms"]) == 2 and data["metric_a"] == c.metric_a
    md = c.markdown()
    assert "differ at position 8" in md and c.heads[0].name in md
    t = c.terms[0]
    assert c.terms_for(t.layer, t.head) is t
    compared = {(x.layer, x.head) for x in c.terms}
    with pytest.raises(InputError, match="raise `top`"):
        c.terms_for(*next((h.layer, h.head) for h in c.heads if (h.layer, h.head) not in compared))


def test_refuses_unaligned_prompts(tiny_models):
    tracer = Tracer(tiny_models["llama"], random_saes(tiny_models["llama"], "topk"))
    a, b = tracer.run(A), tracer.run(A + " Sally")
    with pytest.raises(InputError) as e:
        a.compare(b)
    assert "11 tokens" in str(e.value) and "12" in str(e.value) and "\n" not in str(e.value)
    other = Tracer(tiny_models["gpt2"], random_saes(tiny_models["gpt2"], "topk")).run(A)
    with pytest.raises(InputError, match="different models"):
        a.compare(other)
    with pytest.raises(InputError, match="without an answer"):
        a.compare(tracer.run(B), rival="Bob")
    with pytest.raises(InputError, match="tokens"):
        a.compare(tracer.run(B), answer="Sally Bob")


def test_demo_yellow_red():
    tracer = Tracer.load("demo")
    yes = tracer.run("Answer with yes or no. The color of a banana is yellow?")
    no = tracer.run("Answer with yes or no. The color of a banana is red?")
    c = yes.compare(no, answer=" Yes", rival=" No")
    assert c.metric_a > 2 and c.metric_b < -2  # the model says Yes, then No
    assert [c.str_tokens_a[p] for p in c.differing] == [" yellow"]
    assert abs(c.heads[0].diff) > 0.5  # some head's attention from '?' moves by more than half
    banana = c.str_tokens_a.index(" banana")
    at = c.at_key(banana)
    assert at.iloc[0]["diff"] < -0.2 and at.iloc[-1]["diff"] > 0.2  # both kinds of heads exist here


def test_compare_endpoint(tiny_models, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from qktrace.server import create_app

    model = tiny_models["llama"]
    tracer = Tracer(model, random_saes(model, "topk", seed=2))
    client = TestClient(create_app(tmp_path, tracer))
    a, b = tracer.run(A), tracer.run(B)
    r = client.post(
        "/api/compare", json={"tokens_a": a.trace.tokens.tolist(), "prompt_b": B, "answer": "Sally", "top": 2}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    want = compare(a, b, answer="Sally", top=2, top_terms=8)
    assert body["version"] == 1 and body["differing"] == [8] and body["metric_b"] == want.metric_b
    got = [(h["layer"], h["head"], h["diff"]) for h in body["heads"]]
    assert got == [(h.layer, h.head, h.diff) for h in want.heads]
    assert body["terms"][0]["terms"][0]["diff"] == want.terms[0].terms[0].diff
    assert torch.allclose(torch.tensor(body["attention_a"]), want.attention_a)
    short = client.post("/api/compare", json={"prompt_a": A, "prompt_b": A + " Sally"})
    assert short.status_code == 400 and "11 tokens" in short.json()["error"]
    both = client.post("/api/compare", json={"prompt_a": A, "tokens_a": [1, 2], "prompt_b": B})
    assert both.status_code == 422 and "exactly one" in both.json()["error"]
    view_only = TestClient(create_app(tmp_path)).post("/api/compare", json={"prompt_a": A, "prompt_b": B})
    assert view_only.status_code == 409


def test_cli_compare(capsys, tiny_paths, tmp_path):
    from qktrace.cli import main
    from qktrace.saes import save_sae_lens

    model = Tracer.load(tiny_paths["llama"]).model
    saes = random_saes(model, "topk", seed=2)
    for c, sae in saes.items():
        save_sae_lens(sae, tmp_path / "saes" / f"blocks.{c}.hook_resid_pre")
    base = ["compare", str(tiny_paths["llama"]), "--saes", str(tmp_path / "saes"), "--device", "cpu"]
    code = main([*base, "--prompt-a", A, "--prompt-b", B, "--answer", "Sally", "--rival", "Bob", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    got = json.loads(out)
    tracer = Tracer.load(tiny_paths["llama"], tmp_path / "saes")
    want = compare(tracer.run(A), tracer.run(B), answer="Sally", rival="Bob")
    assert got["metric_b"] == pytest.approx(want.metric_b) and got["differing"] == [8]
    assert [(h["layer"], h["head"]) for h in got["heads"]] == [(h.layer, h.head) for h in want.heads]
    assert main([*base, "--prompt-a", A, "--prompt-b", B]) == 0 and "differ at position 8" in capsys.readouterr().out
    assert main([*base, "--prompt-a", A, "--prompt-b", A + " Sally"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "11 tokens" in err


# -- compare's heads shown causally: their patterns patched from B into A --------------------------


def test_patching_numbers_equal_direct_runs(tiny_models):
    from qktrace import FreezeAttention, run_with
    from qktrace.steering.interventions import PatchAttention

    model = tiny_models["llama"]
    tracer = Tracer(model, random_saes(model, "topk", seed=2))
    a, b = tracer.run(A), tracer.run(B)
    c = compare(a, b, answer="Sally", top=3)
    p = c.patching
    assert p is not None and p.heads == tuple((h.layer, h.head) for h in c.heads[:3])
    assert p.total == pytest.approx(c.metric_b - c.metric_a, abs=1e-5)
    sally, rival = model.token_id("Sally"), model.token_id(c.rival)
    hf_b = hf_attention(model, b.trace.tokens)
    for head, alone in zip(p.heads, p.alone):
        # a second code path: B's pattern as HF computes it, put in by hand over A's, others frozen
        ivs = [PatchAttention(frozenset([head]), b.trace), FreezeAttention()]
        res = run_with(model, tracer.saes, a.trace.tokens, ivs, record_attention=[head[0]])
        assert torch.allclose(res.patterns[head[0]][head[1]], hf_b.patterns[head[0]][head[1]].float(), atol=1e-5)
        assert alone == pytest.approx(float(res.logits[-1, sally] - res.logits[-1, rival]) - c.metric_a, abs=1e-4)
    assert p.share == pytest.approx(p.together / p.total)
    data = json.loads(json.dumps(c.to_json(), allow_nan=False))
    assert data["patching"]["together"] == p.together and "patched from B into A" in c.markdown()
    assert compare(a, b, answer="Sally", top=3, query_pos=3).patching is None  # m is read at the last position
    assert compare(a, b, top=3).patching is None  # no answer, no m


def test_patching_a_prompt_into_itself_changes_nothing(tiny_models):
    from qktrace.analyses.patching import patch_heads
    from qktrace.models.tokens import Contrast

    for fam in ("gpt2", "llama", "gemma2"):
        model = tiny_models[fam]
        tracer = Tracer(model, random_saes(model, "topk", seed=2))
        a = tracer.run(A)
        pair = Contrast.resolve(model, "Sally", None, a.trace.last_logits.float())
        every = [(ly, h) for ly in range(model.n_layers) for h in range(model.n_heads)]
        p = patch_heads(a, tracer.run(A), every[:3] + every[-2:], pair)
        assert p.alone == (0.0,) * 5 and p.together == 0.0 and p.total == 0.0 and p.share is None  # exactly


def test_demo_yellow_red_top_heads_carry_more_than_the_last():
    from qktrace.analyses.patching import patch_heads
    from qktrace.models.tokens import Contrast

    tracer = Tracer.load("demo")
    yes = tracer.run("Answer with yes or no. The color of a banana is yellow?")
    no = tracer.run("Answer with yes or no. The color of a banana is red?")
    c = yes.compare(no, answer=" Yes", rival=" No")
    p = c.patching
    assert p is not None and len(p.heads) == 5
    pair = Contrast.resolve(tracer.model, " Yes", " No", yes.trace.last_logits.float())
    last = patch_heads(yes, no, [(h.layer, h.head) for h in c.heads[-len(p.heads) :]], pair)
    assert abs(p.together) > 10 * abs(last.together)
    assert p.total < -15 and p.together < 0  # towards B's answer
