"""A checkpointed tracer (transcoders + attention-output SAEs) in `compare` and the server's `/api/info`."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from qktrace import Tracer
from qktrace.saes import load_transcoders
from qktrace.server.app import create_app
from qktrace.testing import hf_attention, random_attention_saes, write_transcoder_set

A = "Aunt Sally is the opposite of Uncle Bob . Aunt"
B = "Aunt Sally is the opposite of Uncle Sally . Aunt"


def _tracer(model, tmp_path, sites=("z", "attn_out")) -> Tracer:
    ts = load_transcoders(write_transcoder_set(tmp_path / "ct", model.d_model, model.n_layers), model)
    return Tracer(model, transcoders=ts, attention_saes=random_attention_saes(model, sites, d_sae=40))


@pytest.mark.parametrize("fam,sites", [("gpt2", ("z", "attn_out")), ("llama", ("attn_out", "z"))])
def test_compare_on_a_checkpointed_tracer_splits_hf_score_differences_over_writers(tiny_models, tmp_path, fam, sites):
    model = tiny_models[fam]
    tracer = _tracer(model, tmp_path, sites)
    a, b = tracer.run(A), tracer.run(B)
    c = a.compare(b, top=4, top_terms=8)
    hf_a, hf_b = hf_attention(model, a.trace.tokens), hf_attention(model, b.trace.tokens)
    q = a.trace.n_pos - 1
    assert len(c.terms) == 4
    for t in c.terms:
        want_a, want_b = (float(h.scores[t.layer][t.head, q, t.key_pos]) for h in (hf_a, hf_b))
        assert t.score_a == pytest.approx(want_a, abs=1e-4 * max(1.0, abs(want_a)))
        assert t.score_b == pytest.approx(want_b, abs=1e-4 * max(1.0, abs(want_b)))
        total = sum(x.diff for x in t.terms) + t.rest
        assert total == pytest.approx(want_b - want_a, abs=1e-4 * max(1.0, abs(want_a), abs(want_b)))
    ids = {x.query for t in c.terms for x in t.terms} | {x.key for t in c.terms for x in t.terms}
    assert not any(i.startswith("attn_out/") for i in ids)  # attention is split over its SAE's features
    assert any(i.startswith(("attn/", "attn_error/", "attn_sae_bias/")) for i in ids)


def test_info_lists_the_attention_saes_and_the_graph_they_build(tiny_models, tmp_path):
    model = tiny_models["llama"]
    info = TestClient(create_app(tmp_path, _tracer(model, tmp_path))).get("/api/info").json()
    assert info["graph"] == "checkpointed" and info["transcoders"] == list(range(model.n_layers))
    want = [{"layer": 0, "site": "z", "d_sae": 40}, {"layer": 1, "site": "attn_out", "d_sae": 40}]
    assert info["attention_saes"] == want
    ts = load_transcoders(write_transcoder_set(tmp_path / "ct2", model.d_model, model.n_layers), model)
    plain = TestClient(create_app(tmp_path, Tracer(model, transcoders=ts))).get("/api/info").json()
    assert plain["graph"] == "transcoder" and plain["attention_saes"] == [] and plain["transcoders"] == [0, 1]
    view = TestClient(create_app(tmp_path)).get("/api/info").json()
    assert view["graph"] is None and view["attention_saes"] == [] and view["transcoders"] == []


def test_server_sweep_and_explain_steer_attention_features(tiny_models, tmp_path):
    import json

    import torch

    from qktrace.steering.interventions import SCALE, FreezeAttention, SteerFeature, SteerQK
    from qktrace.steering.requests import SteerRequest, build_steering
    from qktrace.steering.sweep import sweep, watch_column

    model = tiny_models["llama"]
    tracer = _tracer(model, tmp_path)
    (tmp_path / "data").mkdir()
    client = TestClient(create_app(tmp_path / "data", tracer))
    traced = tracer.run(A)
    x = traced.writers().att
    f = int(x.index[(x.layer == 0) & (x.pos == 3)][0])
    tokens = traced.trace.tokens.tolist()
    req = {"tokens": tokens, "heads": [[1, 1]], "side": "key", "feature": f, "feature_layer": 0, "positions": 3,
           "scales": "0:2:3", "freeze_others": True, "watch_attention": [[1, 1, len(tokens) - 1, 3]],
           "kind": "attn"}  # fmt: skip
    r = client.post("/api/sweep", json=req)
    assert r.status_code == 200, r.text
    ivs = [SteerQK(1, 1, "key", f, 3, scale=SCALE, kind="attn", feature_layer=0), FreezeAttention()]
    df = sweep(model, {}, torch.tensor(tokens), ivs, "0:2:3", (), [(1, 1, len(tokens) - 1, 3)],
               attention_saes=tracer.attention_saes)  # fmt: skip
    assert r.json()["rows"] == json.loads(json.dumps(df.to_dict(orient="records")))
    assert df[watch_column(1, 1, len(tokens) - 1, 3)].nunique() == 3  # the steered attention moves
    bad = client.post("/api/sweep", json=req | {"feature_layer": 1})
    assert bad.status_code == 400 and "feature layer in 0..0" in bad.text
    out = build_steering(traced, SteerRequest(f, 3, checkpoint=0, kind="attn")).run()  # its output, no heads
    want = sweep(model, {}, torch.tensor(tokens), [SteerFeature(0, f, (3,), scale=SCALE, kind="attn")],
                 [float(s) for s in out["scale"]], attention_saes=tracer.attention_saes)  # fmt: skip
    assert out.equals(want)
    r = client.post("/api/explain", json={"tokens": tokens, "answer": "Sally", "null_draws": 2})
    assert r.status_code == 200, r.text
    assert r.json()["mechanism"]["verdict"]


def test_cli_steer_takes_attention_saes_and_kind(capsys, tiny_models, tiny_paths, tmp_path):
    """`qktrace steer --transcoders T --attention-saes A --kind attn` prints what the library's sweep gives."""
    import json

    from qktrace.cli import main
    from qktrace.options import SweepOptions
    from qktrace.steering.requests import SteerRequest, build_steering
    from qktrace.testing import write_attention_saes

    model = tiny_models["llama"]
    ct = write_transcoder_set(tmp_path / "ct", model.d_model, model.n_layers)
    att = write_attention_saes(tmp_path / "att", random_attention_saes(model, ("z", "attn_out"), d_sae=40))
    tracer = Tracer.load(tiny_paths["llama"], transcoders=ct, attention_saes=att)
    traced = tracer.run(A)
    x = traced.writers().att
    f = int(x.index[(x.layer == 0) & (x.pos == 3)][0])
    base = ["steer", str(tiny_paths["llama"]), "--transcoders", str(ct), "--attention-saes", str(att)]
    args = [*base, "--device", "cpu", "--prompt", A, "--json", "--kind", "attn", "--feature", str(f)]
    qk = [*args, "--layer", "1", "--heads", "1", "--feature-layer", "0", "--positions", "3", "--side", "key"]
    assert main([*qk, "--scales", "0,2"]) == 0, capsys.readouterr().err
    got = json.loads(capsys.readouterr().out)
    req = SteerRequest(
        f, 3, heads=[(1, 1)], feature_layer=0, kind="attn", options=SweepOptions(side="key", scales="0,2")
    )
    want = build_steering(traced, req).run()
    assert [r["p_top_1"] for r in got] == pytest.approx(want["p_top_1"].tolist(), abs=1e-6)
    assert main([*args, "--layer", "0", "--positions", "3", "--scales", "0,3"]) == 0  # its output, no heads
    capsys.readouterr()
    assert main([*args[:-4], "--kind", "nope", "--feature", str(f), "--layer", "0", "--positions", "3"]) == 2
