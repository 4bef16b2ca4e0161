"""`qktrace.analyses.explain`: every number it reports is checked against a second code path.

- each head's and site's ablation effect equals a direct `run_with` of the same interventions;
- a candidate's predicted attention (a softmax recomputed from QK terms, no forward pass) equals the
  attention the intervention produces, on random weights for every family;
- every point of every curve equals a direct `run_with` of `Candidate.interventions(scale)` (a fresh
  clean run, not the one explain used), and scale 1 equals the model's own forward;
- the heads come in the order of an independently built graph's `top_heads`;
- on the demo's induction prompt, the confirmed mechanism hands the answer to the distractor through
  the steered heads' attention;
- bad input is one line, before any work.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import qktrace
from qktrace import ExplainSettings, FreezeAttention, ScaleHead, Tracer, explain, run_with
from qktrace.analyses.explain import attended_key, scaled_row
from qktrace.errors import InputError, OutOfRangeError, QKTraceError
from qktrace.nodes import CODE, Kind
from qktrace.steering.interventions import SteerQK
from qktrace.testing import TINY_FAMILIES, random_saes

INDUCTION = "I always loved visiting Aunt Sally. Then Uncle Peter came home. Whenever I was feeling sad, Aunt"
SMALL = ExplainSettings(sites=2, ablate=3, candidates=2, top_k=(2,), scales=(1.0, 0.0, -2.0))


@pytest.fixture(scope="module")
def demo() -> Tracer:
    return Tracer.load("demo")


@pytest.fixture(scope="module")
def induction(demo: Tracer) -> qktrace.Mechanism:
    return explain(demo, INDUCTION, " Sally")


def fresh(tracer: Tracer, prompt: str, ivs: list, record=()) -> tuple[torch.Tensor, dict]:
    """Last-position logits and recorded patterns of a run_with that makes its own clean run."""
    res = run_with(tracer.model, tracer.saes, tracer.tokenize(prompt), ivs, record_attention=list(record))
    return res.logits[-1].float(), res.patterns


def check_curves(tracer: Tracer, prompt: str, m: qktrace.Mechanism, candidates) -> None:
    q = len(m.str_tokens) - 1
    for c in candidates:
        where = [(p.layer, h, p.key_pos) for p in c.parts for h in p.heads]
        assert len(c.curve) == len(m.scales) and [p.scale for p in c.curve] == list(m.scales)
        for point in c.curve:
            logits, patterns = fresh(tracer, prompt, c.interventions(point.scale), {ly for ly, _, _ in where})
            probs = torch.softmax(logits, -1)
            assert point.metric == pytest.approx(float(logits[m.answer_id] - logits[m.rival_id]), abs=2e-3)
            assert point.p_answer == pytest.approx(float(probs[m.answer_id]), abs=1e-4)
            assert point.p_rival == pytest.approx(float(probs[m.rival_id]), abs=1e-4)
            assert point.top_token == tracer.model.str_tokens(probs.argmax().reshape(1))[0]
            got = [float(patterns[ly][h, q, k]) for ly, h, k in where]
            assert point.attention == pytest.approx(got, abs=1e-4)
            others = logits.clone()
            others[m.answer_id] = -float("inf")
            assert point.margin == pytest.approx(float(logits[m.answer_id] - others.max()), abs=2e-3)
        # the attention at the most negative scale was predicted exactly, without a forward pass (steering
        # one layer's QK circuit leaves that layer's input as it was; several layers change later inputs)
        if len(c.parts) == 1:
            assert c.predicted_attention == pytest.approx(list(c.lowest("scale").attention), abs=1e-4)


# -- on random weights, every family ---------------------------------------------------------------


@pytest.mark.parametrize("fam", TINY_FAMILIES)
def test_explain_numbers_equal_direct_interventions(tiny_models, fam):
    tracer = Tracer(tiny_models[fam], random_saes(tiny_models[fam], "topk", seed=5))
    prompt = "Aunt Sally is the opposite of Uncle Bob . Aunt"
    m = explain(tracer, prompt, "Sally", settings=SMALL)
    assert m.heads and m.sites and m.candidates
    clean = tracer.run(prompt).trace.last_logits.float()
    assert m.metric == pytest.approx(float(clean[m.answer_id] - clean[m.rival_id]), abs=1e-4)
    runner_up = clean.clone()
    runner_up[m.answer_id] = -float("inf")
    assert m.rival_id == int(runner_up.argmax())  # the default rival: the clean runner-up
    for h in m.heads:
        logits, _ = fresh(tracer, prompt, [ScaleHead(h.layer, h.head, 0.0), FreezeAttention()])
        assert h.ablation == pytest.approx(float(logits[m.answer_id] - logits[m.rival_id]) - m.metric, abs=2e-3)
    for s in m.sites:
        logits, _ = fresh(tracer, prompt, [*(ScaleHead(s.layer, h, 0.0) for h in s.heads), FreezeAttention()])
        assert s.ablation == pytest.approx(float(logits[m.answer_id] - logits[m.rival_id]) - m.metric, abs=2e-3)
    check_curves(tracer, prompt, m, m.candidates)


@pytest.mark.parametrize("fam", ["gpt2", "qwen3", "gemma2"])
@pytest.mark.parametrize("side", ["query", "key"])
def test_scaled_row_is_the_steered_pattern(tiny_models, fam, side):
    """The exact prediction of a side's features scaled by a factor (layernorm centring, QK-norm,
    soft-capping) equals the pattern the SteerQK intervention produces."""
    model = tiny_models[fam]
    saes = random_saes(model, "topk", seed=3)
    tracer = Tracer(model, saes)
    traced = tracer.run("w1 w2 Aunt Sally w3 w4 Uncle Bob w5 Aunt")
    layer, head, q = 1, 2, traced.trace.n_pos - 1
    att = traced.qk(layer, head, q)
    key = attended_key(traced, layer, head, q)
    position = q if side == "query" else key
    comp = att.query if side == "query" else att.key
    feats = comp.feature[(comp.kind == CODE[Kind.FEATURE]) & (comp.pos == position)].tolist()[:3]
    assert feats
    assert torch.allclose(scaled_row(att, side, position, feats, 1.0), att.pattern, atol=1e-5)
    for factor in (0.0, -2.0):
        ivs = [SteerQK(layer, head, side, f, position, scale=factor) for f in feats] + [FreezeAttention()]
        res = run_with(model, saes, traced.trace.tokens, ivs, record_attention=[layer])
        got = res.patterns[layer][head, q, list(att.key_positions)]
        assert torch.allclose(scaled_row(att, side, position, feats, factor), got, atol=1e-5)


# -- the demo model --------------------------------------------------------------------------------


def test_induction_mechanism_flips_to_the_distractor(demo, induction):
    m = induction
    assert m.correct and m.answer == " Sally" and m.p_answer > 0.9
    best = m.best
    assert best is not None and m.flips and m.confirmed
    flipped = [p for p in best.curve if p.top_token != m.answer]
    assert flipped and any(p.top_token == " Peter" for p in flipped)  # the distractor name takes over
    # ... because the steered heads stop attending to the name
    name = m.str_tokens.index(" Sally")
    keys = [p.key_pos for p in best.parts for _ in p.heads]
    at_name = [i for i, k in enumerate(keys) if k == name]
    if best.side == "key":
        assert at_name  # the key-side features sit on the name
    for p in flipped:
        assert all(p.attention[i] < 0.5 for i in at_name)
    assert m.effect(best) == min(m.effect(c) for c in m.candidates)
    assert m.criterion == "margin" and not m.rival_given


def test_heads_follow_the_graph(demo, induction):
    traced = demo.run(INDUCTION)
    graph = traced.graph(targets=[" Sally"], progress=False, qk_terms=False)
    top = graph.top_heads(len(induction.heads))
    assert [(h.layer, h.head) for h in induction.heads] == [(t["layer"], t["head"]) for t in top]
    assert [h.influence for h in induction.heads] == pytest.approx([t["influence"] for t in top])
    q = traced.trace.n_pos - 1
    for h in induction.heads:
        row = traced.pattern(h.layer, h.head, q)
        assert h.key_pos == int(row[1:].argmax()) + 1  # past the attention sink
        assert h.attention == pytest.approx(float(row[h.key_pos]))
    for s in induction.sites:
        assert all(attended_key(traced, s.layer, h, q) == s.key_pos for h in s.heads)


def test_demo_curves_equal_direct_interventions(demo, induction):
    best = induction.best
    check_curves(demo, INDUCTION, induction, [best, *induction.candidates[:2]])


def test_rival_given_uses_the_metric(demo):
    m = explain(demo, INDUCTION, " Sally", rival=" Peter", side="key", settings=SMALL)
    assert m.rival == " Peter" and m.rival_given and m.criterion == "metric"
    assert all(c.side == "key" for c in m.candidates)
    assert m.best is min(m.candidates, key=lambda c: c.lowest("metric").metric)
    logits = demo.run(INDUCTION).trace.last_logits.float()
    assert m.metric == pytest.approx(float(logits[m.answer_id] - logits[demo.model.token_id(" Peter")]), abs=1e-5)


def test_views(demo, induction, tmp_path: Path):
    m = induction
    df = m.frame()
    assert len(df) == len(m.candidates) and df["best"].sum() == 1 and bool(df.iloc[0]["best"])
    assert list(df["effect"]) == sorted(df["effect"])
    data = json.loads(json.dumps(m.to_json(), allow_nan=False))
    assert data["best"] == m.candidates.index(m.best) and len(data["candidates"]) == len(m.candidates)
    assert data["candidates"][data["best"]]["curve"][0]["metric"] == m.best.curve[0].metric
    md = m.markdown()
    assert "**Mechanism**" in md and m.best.label.split(" + ")[0] in md
    png = m.plot(tmp_path / "mech.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    m.save_json(tmp_path / "mech.json")
    assert json.loads((tmp_path / "mech.json").read_text())["answer"] == " Sally"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mech.json", "mech.png"]  # no temp files left
    assert m.n_passes <= m.settings.ablate + m.settings.sites + 2 * (m.settings.sites * m.settings.candidates + 1) * (
        len(m.scales) - 1
    )


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"answer": " Sallyhood and more"}, InputError, "tokens"),
        ({"answer": 10**7}, OutOfRangeError, "out of range"),
        ({"answer": " Sally", "rival": " Sally"}, InputError, "rival"),
        ({"answer": " Sally", "side": "both"}, InputError, "side"),
        ({"answer": 1.5}, InputError, "token"),
    ],
)
def test_bad_input_is_one_line(demo, kwargs, error, words):
    with pytest.raises(error) as e:
        explain(demo, INDUCTION, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and words in msg


def test_bad_settings_and_graph(demo):
    for bad in ({"sites": 0}, {"top_k": (1,)}, {"scales": (1.0, 2.0)}, {"scales": (0.0, float("nan"))}):
        with pytest.raises(InputError):
            ExplainSettings(**bad)
    other = demo.run("The opposite of early is").graph(progress=False, qk_terms=False)
    with pytest.raises(QKTraceError, match="another prompt"):
        explain(demo, INDUCTION, " Sally", graph=other)


def test_explain_endpoint(tiny_models, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from qktrace.server import create_app

    tracer = Tracer(tiny_models["llama"], random_saes(tiny_models["llama"], "topk", seed=5))
    prompt = "Aunt Sally is the opposite of Uncle Bob . Aunt"
    client = TestClient(create_app(tmp_path, tracer))
    r = client.post("/api/explain", json={"prompt": prompt, "answer": "Sally", "side": "key"})
    assert r.status_code == 200, r.text
    got = r.json()["mechanism"]
    want = explain(tracer, prompt, "Sally", side="key")
    assert got["best"] == want.candidates.index(want.best) and got["rival"] == want.rival
    assert [c["curve"][-1]["metric"] for c in got["candidates"]] == [c.curve[-1].metric for c in want.candidates]
    assert got["prompt"] == prompt
    bad = client.post("/api/explain", json={"prompt": prompt, "answer": "Sally Bob"})
    assert bad.status_code == 400 and "name a single token" in bad.json()["error"]


@pytest.fixture(scope="module")
def tiny_on_disk(tiny_paths, tmp_path_factory):
    """The tiny llama and random SAEs saved as SAELens folders: what the command line loads."""
    from qktrace.saes import save_sae_lens

    root = tmp_path_factory.mktemp("explain_cli")
    model = Tracer.load(tiny_paths["llama"]).model
    for c, sae in random_saes(model, "topk", seed=5).items():
        save_sae_lens(sae, root / "saes" / f"blocks.{c}.hook_resid_pre")
    return tiny_paths["llama"], root / "saes"


def test_cli_explain_prints_and_writes_what_the_library_finds(capsys, tiny_on_disk, tmp_path):
    from qktrace.cli import main

    model_dir, saes = tiny_on_disk
    prompt = "Aunt Sally is the opposite of Uncle Bob . Aunt"
    base = ["explain", str(model_dir), "--saes", str(saes), "--device", "cpu", "--prompt", prompt]
    code = main(
        [*base, "--answer", "Sally", "--json", "--out", str(tmp_path / "m.json"), "--plot", str(tmp_path / "m.png")]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    got = json.loads(out)
    want = explain(Tracer.load(model_dir, saes), prompt, "Sally")
    assert got["best"] == want.candidates.index(want.best)
    assert [c["curve"][-1]["margin"] for c in got["candidates"]] == [c.curve[-1].margin for c in want.candidates]
    assert json.loads((tmp_path / "m.json").read_text()) == got
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    assert main([*base, "--answer", "Sally"]) == 0 and "**Mechanism**" in capsys.readouterr().out
    assert got["verdict"] == want.verdict() and got["specific"] == want.specific
    assert main([*base, "--answer", "Sally", "--null-draws", "2", "--null-seed", "4", "--json"]) == 0
    nulls = json.loads(capsys.readouterr().out)["nulls"]
    assert nulls and all(n["n"] <= 2 for n in nulls) and json.loads(out)["nulls"][0]["n"] <= 8
    assert main([*base, "--answer", "Sally Bob"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "name a single token" in err


# -- the control (null) and where the answer goes ---------------------------------------------------


@pytest.fixture(scope="module")
def circuit(tmp_path_factory):
    from qktrace.testing import make_qk_circuit

    return make_qk_circuit(tmp_path_factory.mktemp("circuit") / "model")


def steered(c, probe, features, settings):
    """A candidate of `features` in the circuit's head, on the query side at the last position, confirmed."""
    from qktrace.analyses.mechanism import Candidate, Part

    q = len(probe.traced.str_tokens) - 1
    part = Part(0, c.layer, (c.head,), "query", q, c.key_pos, tuple(features), tuple("f" for _ in features))
    return probe.confirm(Candidate("feature", (part,), 0.0, 0.0, ()), settings.scales)


def test_null_of_the_built_in_feature_is_far_below_it(circuit):
    """The answer is built into one head's QK circuit through one feature: steering it flips the answer, steering
    as many random active features in the same head barely moves it; a random feature is not specific."""
    from qktrace.analyses.control import null_for
    from qktrace.analyses.explain import measure_metric

    c, settings = circuit, ExplainSettings()
    traced = c.tracer.run(c.prompt)
    q = traced.trace.n_pos - 1
    assert traced.pattern(c.layer, c.head, q)[c.key_pos] > 0.99  # the head finds the key ...
    assert c.tracer.model.str_tokens(traced.trace.last_logits.argmax().reshape(1))[0] == c.answer  # ... and answers
    probe = measure_metric(c.tracer, c.prompt, c.answer, None)
    p_answer = float(torch.softmax(traced.trace.last_logits.float(), -1)[probe.a])
    clean = {"metric": probe.clean, "p_answer": p_answer}
    right = steered(c, probe, [c.feature], settings)
    null = null_for(probe, 0, right, settings, "metric", clean, c.answer, True)
    assert null.n == settings.null_draws and all(len(d) == 1 and d[0][1] != c.feature for d in null.draws)
    assert null.effect < -1.0 and all(e > 0.05 * null.effect for e in null.effects)  # far below: < 5% of it
    assert null.confirmed and null.specific and null.p_value == pytest.approx(1 / (settings.null_draws + 1))
    assert null.flip_share == 0 and null.halve_share == 0
    assert len(null.quantiles) == len(settings.scales) and all(lo <= mid <= hi for lo, mid, hi in null.quantiles)
    # every draw is what steering its features directly does (a second code path)
    for d, curve in zip(null.draws, null.curves):
        logits, _ = fresh(c.tracer, c.prompt, steered(c, probe, [d[0][1]], settings).interventions(curve[-1].scale))
        assert curve[-1].metric == pytest.approx(float(logits[probe.a] - logits[probe.r]), abs=2e-3)
    again = null_for(probe, 0, right, settings, "metric", clean, c.answer, True)
    assert again.draws == null.draws  # seeded
    feats, _ = traced.acts(c.layer).at(q)
    other = next(int(f) for f in feats.tolist() if int(f) != c.feature)
    random_one = null_for(probe, 0, steered(c, probe, [other], settings), settings, "metric", clean, c.answer, True)
    assert not random_one.specific


def test_explain_finds_the_built_in_feature_and_calls_it_specific(circuit):
    c = circuit
    m = explain(c.tracer, c.prompt, c.answer, settings=SMALL)
    assert m.best is not None and (c.layer, c.feature) in m.best.features and m.best.side == "query"
    assert m.confirmed and m.specific and m.null is not None and m.null.candidate == m.candidates.index(m.best)
    assert "specific" in m.verdict() and "p = " in m.markdown()
    data = json.loads(json.dumps(m.to_json(), allow_nan=False))
    assert data["specific"] and data["nulls"][0]["p_value"] == m.null.p_value and data["goes_to"] == m.goes_to
    assert m.goes_to in ("rival", "other", "nowhere")
    if m.flips:
        lost = [p for p in m.best.curve if p.top_token != m.answer]
        assert m.goes_to_token in {p.top_token for p in lost}
        assert (m.goes_to == "rival") == (m.goes_to_token == m.rival)


def test_an_answer_the_model_does_not_give_never_flips(circuit):
    """The top token is not the answer on the clean run already: nothing can flip it."""
    c = circuit
    m = explain(c.tracer, c.prompt, "Bob", settings=SMALL)
    assert not m.correct and m.prediction == c.answer
    assert all(p.top_token != "Bob" for cand in m.candidates for p in cand.curve)  # the old test said "flips"
    assert not m.flips and m.goes_to_token is None and m.goes_to == "" and "nothing to flip" in m.verdict()
    assert not m.to_json()["flips"] and not any(m.frame()["flips"])
    assert m.confirmed == m.halves
    assert m.to_json()["halves"] == (min(p.p_answer for p in m.best.curve) <= 0.5 * m.p_answer)
