"""Transcoders everywhere a residual-SAE graph goes: `compare`, the CLI's steer / explain / compare, the
dashboards job (transcoder features encoded at their input site) and the batch job (transcoder graphs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qktrace import Tracer
from qktrace.options import DashboardOptions
from qktrace.saes import load_transcoders
from qktrace.testing import JobSetup, hf_attention, make_job_setup, write_transcoder_set

A = "Aunt Sally is the opposite of Uncle Bob . Aunt"
B = "Aunt Sally is the opposite of Uncle Sally . Aunt"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[JobSetup, Path]:
    root = tmp_path_factory.mktemp("tc-jobs")
    s = make_job_setup(root)
    return s, write_transcoder_set(root / "ct", 32, 2)


@pytest.mark.parametrize("fam", ["gpt2", "llama"])
def test_compare_on_transcoders_splits_hf_score_differences_over_writers(tiny_models, tmp_path, fam):
    model = tiny_models[fam]
    tracer = Tracer(model, transcoders=load_transcoders(write_transcoder_set(tmp_path / "ct", 32, 2), model))
    a, b = tracer.run(A), tracer.run(B)
    c = a.compare(b, top=4, top_terms=5)
    hf_a, hf_b = hf_attention(model, a.trace.tokens), hf_attention(model, b.trace.tokens)
    q = a.trace.n_pos - 1
    assert len(c.terms) == 4  # every layer's heads: transcoder tracers need no SAE at a head's layer
    for t in c.terms:
        want_a, want_b = (float(h.scores[t.layer][t.head, q, t.key_pos]) for h in (hf_a, hf_b))
        assert t.score_a == pytest.approx(want_a, abs=1e-4 * max(1.0, abs(want_a)))
        assert t.score_b == pytest.approx(want_b, abs=1e-4 * max(1.0, abs(want_b)))
        total = sum(x.diff for x in t.terms) + t.rest
        assert total == pytest.approx(want_b - want_a, abs=1e-4 * max(1.0, abs(want_a), abs(want_b)))
    ids = {x.query for t in c.terms for x in t.terms} | {x.key for t in c.terms for x in t.terms}
    assert any(i.startswith(("transcoder/", "mlp_error/", "attn_out/", "token/")) for i in ids)


def test_cli_steer_with_transcoders_prints_the_librarys_sweep(capsys, tiny_paths, tmp_path):
    from qktrace.cli import main
    from qktrace.steering.requests import SteerRequest, build_steering

    ct = write_transcoder_set(tmp_path / "ct", 32, 2)
    tracer = Tracer.load(tiny_paths["llama"], transcoders=ct)
    traced = tracer.run(A)
    x = traced.writers().enc
    at = (x.layer == 0) & (x.pos == traced.trace.n_pos - 1)
    f = int(x.index[at][0])
    base = ["steer", str(tiny_paths["llama"]), "--transcoders", str(ct), "--device", "cpu", "--prompt", A, "--json"]
    args = [*base, "--layer", "1", "--heads", "0,2", "--feature-layer", "0", "--feature", str(f), "--positions", "-1"]
    assert main([*args, "--scales", "0,2"]) == 0, capsys.readouterr().err
    got = json.loads(capsys.readouterr().out)
    from qktrace.options import SweepOptions

    req = SteerRequest(f, -1, heads=[(1, 0), (1, 2)], feature_layer=0, options=SweepOptions(scales="0,2"))
    want = build_steering(traced, req).run()
    assert [r["p_top_1"] for r in got] == pytest.approx(want["p_top_1"].tolist(), abs=1e-6)
    out = [*base, "--layer", "0", "--feature", str(f), "--positions", "-1", "--scales", "0,3"]
    assert main(out) == 0  # the feature's output, no heads
    capsys.readouterr()
    assert main([*base, "--layer", "1", "--heads", "2", "--feature", str(f), "--positions", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--feature-layer" in err and "feature_layer" not in err


def test_cli_explain_and_compare_take_transcoders(capsys, tiny_paths, tmp_path):
    from qktrace.cli import main

    ct = write_transcoder_set(tmp_path / "ct", 32, 2)
    base = [str(tiny_paths["gpt2"]), "--transcoders", str(ct), "--device", "cpu"]
    assert main(["explain", *base, "--prompt", A, "--answer", "Sally", "--null-draws", "2", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["verdict"] and all(p["kind"] == "transcoder" for c in m["candidates"] for p in c["parts"])
    assert main(["compare", *base, "--prompt-a", A, "--prompt-b", B, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["terms"]


def _site_acts(model, ts, ids: list[int]) -> torch.Tensor:
    """Every layer's transcoder activations [layer, pos, d_sae] of one chunk, from `Model.run` (one prompt)."""
    from qktrace.graph.replacement import sites

    trace = model.run(torch.tensor(ids))
    s = sites(model, trace, ts)
    return torch.stack([ts.encode(layer, s.x[layer]) for layer in range(model.n_layers)])


def test_transcoder_dashboards_equal_encoding_the_corpus_directly(setup, tmp_path):
    from qktrace.jobs.corpus import iter_documents
    from qktrace.jobs.dashboards import build_dashboards
    from qktrace.models import load_model

    s, ct = setup
    opts = DashboardOptions(seq_len=16, n_contexts=3, before=2, after=1)
    build_dashboards(s.model, None, s.corpus, tmp_path / "d", options=opts, device="cpu", transcoders=ct)
    model = load_model(s.model)
    ts = load_transcoders(ct, model)
    fired: dict[tuple[int, int], list[float]] = {}
    n_tokens = 0
    for text in iter_documents(s.corpus):
        toks = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(toks), opts.seq_len - 1):
            acts = _site_acts(model, ts, [model.tokenizer.bos_token_id] + toks[start : start + opts.seq_len - 1])
            acts = acts[:, 1:]  # BOS is not counted
            n_tokens += acts.shape[1]
            for ly, p, f in zip(*torch.nonzero(acts > 0, as_tuple=True)):
                fired.setdefault((int(ly), int(f)), []).append(float(acts[ly, p, f]))
    index = json.loads((tmp_path / "d" / "index.json").read_text())
    assert [e["checkpoint"] for e in index["checkpoints"]] == [0, 1]
    for layer in (0, 1):
        dash = json.loads((tmp_path / "d" / f"blocks.{layer}.transcoder" / "dashboards.json").read_text())
        assert dash["kind"] == "transcoder" and dash["layer"] == layer and dash["n_tokens"] == n_tokens
        want = {f for ly, f in fired if ly == layer}
        assert {int(f) for f in dash["features"]} == want and want
        for f, d in dash["features"].items():
            acts = sorted(fired[layer, int(f)], reverse=True)
            assert d["max_act"] == round(acts[0], 3)
            assert [c["act"] for c in d["contexts"]] == [round(a, 3) for a in acts[: opts.n_contexts]]
            assert d["freq"] == round(len(acts) / n_tokens, 5)
        W = ts[layer].W_dec * model.hf.model.norm.weight  # RMSNorm at unit scale is its gain
        logits = W.detach() @ model.hf.lm_head.weight.T.detach()
        vocab = [model.tokenizer.decode([i]) for i in range(logits.shape[1])]
        for f, d in dash["features"].items():
            assert d["top_out"] == [vocab[int(t)] for t in logits[int(f)].topk(len(d["top_out"])).indices]


def test_transcoder_batch_equals_tracing_each_prompt_alone(setup, tmp_path):
    from qktrace.jobs.batch import BatchOptions, trace_batch

    s, ct = setup
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": A, "answer": " Sally", "id": "a"}, {"prompt": "w3 w8 w2 of the w9 w4"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    o = BatchOptions(explain=False)
    trace_batch(s.model, None, prompts, tmp_path / "b", device="cpu", transcoders=ct, options=o)
    tracer = Tracer.load(s.model, transcoders=ct)
    for r, pid in zip(rows, ["a", "p00001"]):
        traced = tracer.run(r["prompt"])
        graph = traced.graph(o.graph, progress=False)
        assert graph.settings.get("graph") == "transcoder"
        got = (tmp_path / "b" / "prompts" / pid / "graph.json").read_bytes()
        assert got == graph.save(tmp_path / "g.json").read_bytes()
        qk = json.loads((tmp_path / "b" / "prompts" / pid / "qk.json").read_text())
        for h in qk["heads"]:
            want = json.loads(json.dumps(traced.qk(h["layer"], h["head"], -1).to_json(top=o.qk_top)))
            assert {k: v for k, v in h.items() if k != "influence"} == want
    job = json.loads((tmp_path / "b" / "job.json").read_text())
    assert job["transcoders"] == "ct"  # the set's name, not its local path


def test_server_sweep_and_explain_on_transcoders(tiny_paths, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from qktrace.server.app import create_app
    from qktrace.steering.interventions import SCALE, FreezeAttention, SteerQK
    from qktrace.steering.sweep import sweep

    tracer = Tracer.load(tiny_paths["llama"], transcoders=write_transcoder_set(tmp_path / "ct", 32, 2))
    (tmp_path / "data").mkdir()
    client = TestClient(create_app(tmp_path / "data", tracer))
    traced = tracer.run(A)
    x = traced.writers().enc
    f = int(x.index[(x.layer == 0) & (x.pos == 3)][0])
    tokens = traced.trace.tokens.tolist()
    req = {"tokens": tokens, "heads": [[1, 1]], "side": "key", "feature": f, "feature_layer": 0, "positions": 3,
           "scales": "0:2:3", "freeze_others": True, "watch_attention": [[1, 1, len(tokens) - 1, 3]]}  # fmt: skip
    r = client.post("/api/sweep", json=req)
    assert r.status_code == 200, r.text
    ivs = [SteerQK(1, 1, "key", f, 3, scale=SCALE, kind="transcoder", feature_layer=0), FreezeAttention()]
    df = sweep(tracer.model, {}, torch.tensor(tokens), ivs, "0:2:3", (), [(1, 1, len(tokens) - 1, 3)],
               transcoders=tracer.transcoders)  # fmt: skip
    assert r.json()["rows"] == json.loads(json.dumps(df.to_dict(orient="records")))
    bad = client.post("/api/sweep", json=req | {"feature_layer": 1})
    assert bad.status_code == 400 and "feature layer in 0..0" in bad.text
    r = client.post("/api/explain", json={"tokens": tokens, "answer": "Sally", "null_draws": 2})
    assert r.status_code == 200, r.text
    assert r.json()["mechanism"]["verdict"]
