"""The web app's JSON API on a tiny random model: every endpoint, its numbers against the library's own,
and the requests it must refuse (path traversal, out-of-range heads, empty prompts) while it keeps serving."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from qktrace.nodes import Kind, Node  # noqa: E402
from qktrace.server import API_VERSION, create_app  # noqa: E402
from qktrace.testing import GRAPH_NAME, make_server_setup  # noqa: E402
from qktrace.testing import ServerSetup as Setup  # noqa: E402
from qktrace.tracer import Tracer  # noqa: E402

SECRET = "TOPSECRET-not-a-graph"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    s = make_server_setup(tmp_path_factory.mktemp("server"))
    (s.data / "broken.json").write_text("{not json")
    (s.data / "other.json").write_text(json.dumps({"hello": 1}))
    (s.root / "secret.json").write_text(json.dumps({"secret": SECRET}))
    os.symlink(s.root / "secret.json", s.data / "escape.json")
    return s


@pytest.fixture(scope="module")
def client(setup) -> TestClient:
    return TestClient(create_app(setup.data, setup.tracer))


@pytest.fixture(scope="module")
def viewer(setup) -> TestClient:
    """No model: view only, labels and dashboards read from the SAE directory."""
    return TestClient(create_app(setup.data, saes_dir=setup.saes))


def ok(r, status=200):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["version"] == API_VERSION
    return body


def refused(r, *statuses):
    assert r.status_code in (statuses or (400, 404, 409, 422)), r.text
    body = r.json()
    assert body["version"] == API_VERSION and isinstance(body["error"], str) and "\n" not in body["error"]
    assert SECRET not in r.text
    return body["error"]


# -- graphs -----------------------------------------------------------------------------------------


def test_info(client, viewer, setup):
    info = ok(client.get("/api/info"))
    assert info["can_compute"] and info["model"] == setup.tracer.model.name
    assert info["n_layers"] == 2 and info["checkpoints"] == [0, 1, 2] and info["features"]
    view = ok(viewer.get("/api/info"))
    assert not view["can_compute"] and view["model"] is None and view["checkpoints"] == [0, 1, 2]


def test_list_graphs(client, setup):
    listing = ok(client.get("/api/graphs"))
    names = [g["name"] for g in listing["graphs"]]
    assert GRAPH_NAME in names
    tiny = next(g for g in listing["graphs"] if g["name"] == GRAPH_NAME)
    assert tiny["n_nodes"] > 0 and tiny["n_links"] > 0
    assert tiny["tokens"] == setup.graph["metadata"]["prompt_tokens"] and len(tiny["tokens"]) == len(setup.tokens)
    bad = {b["name"]: b["error"] for b in listing["invalid"]}
    assert {"broken.json", "other.json", "escape.json"} <= set(bad)
    assert "outside the data directory" in bad["escape.json"]


@pytest.mark.parametrize("name", ["tiny.json", "tiny"])
def test_get_graph(client, setup, name):
    body = ok(client.get(f"/api/graphs/{name}"))
    assert body["name"] == GRAPH_NAME and body["graph"] == setup.graph


@pytest.mark.parametrize(
    "path",
    [
        "/api/graphs/..%2fsecret.json",
        "/api/graphs/..%2F..%2Fsecret.json",
        "/api/graphs/%2e%2e%2fsecret.json",
        "/api/graphs/%2e%2e/secret.json",
        "/api/graphs/..%5csecret.json",
        "/api/graphs/%2Ftmp%2Fsecret.json",
        "/api/graphs//etc/passwd",
        "/api/graphs/..",
        "/api/graphs/.hidden.json",
        "/api/graphs/escape.json",
        "/api/graphs/nope.json",
        "/api/graphs/graphs%00.json",
        "/static/..%2f..%2fserver%2fapp.py",
    ],
)
def test_traversal_refused(client, path):
    refused(client.get(path), 400, 404)
    ok(client.get("/api/info"))  # still serving


def test_absolute_path_names_the_problem(client, setup):
    msg = refused(client.get(f"/api/graphs/{setup.root / 'secret.json'}"), 400)
    assert "plain file name" in msg


def test_unknown_and_corrupt_graphs(client):
    assert "no graph named 'missing.json'" in refused(client.get("/api/graphs/missing"), 404)
    assert "broken.json" in refused(client.get("/api/graphs/broken.json"), 422)
    assert "not a qktrace graph" in refused(client.get("/api/graphs/other.json"), 422)
    assert "not an endpoint" in refused(client.get("/api/nothing"), 404)


# -- QK ---------------------------------------------------------------------------------------------


def cross_link(graph):
    for link in sorted(graph["links"], key=lambda x: -abs(x["weight"])):
        s, t = (Node.parse(link[k]).pos for k in ("source", "target"))
        if s != t and link["head_loadings"]:
            return link, t, s
    raise AssertionError("the tiny graph has no cross-position link")


def test_qk_equals_direct(client, setup):
    link, q, k = cross_link(setup.graph)
    head = link["head_loadings"][0]
    req = {"tokens": setup.tokens, "layer": head["layer"], "head": head["head"], "query_pos": q, "key_pos": k, "top": 7}
    body = ok(client.post("/api/qk", json=req))
    traced = setup.tracer.run(setup.tokens)
    direct = traced.qk(head["layer"], head["head"], q, k)
    assert body["qk"] == json.loads(json.dumps(direct.to_json(7)))
    row = traced.qk(head["layer"], head["head"], q)
    assert body["row"]["key_positions"] == list(row.key_positions) == list(range(q + 1))
    assert body["row"]["pattern"] == row.pattern.tolist()
    assert body["key_pos"] == k and body["str_tokens"] == list(traced.str_tokens)
    effects = row.prob_effects(k)
    inhibitory = [t["prob_effect"] for t in body["inhibitory"]]
    assert inhibitory == sorted(inhibitory) and all(v < 0 for v in inhibitory)
    assert inhibitory[0] == pytest.approx(float(effects.min()))
    rival = max((i for i in row.key_positions if i != k), key=lambda i: float(row.pattern[i]))
    c = body["contrast"]
    assert c["key_a"] == k and c["key_b"] == rival
    frame = row.contrast(k, rival, top=7)
    assert c["score_diff"] == pytest.approx(frame.attrs["score_diff"])
    assert [t["diff"] for t in c["terms"]] == pytest.approx(frame["diff"].tolist())


def test_qk_rival_key_and_heatmap(client, setup):
    """A chosen rival key: the contrast's listed diffs plus the rest sum to the library's score(key) - score(rival);
    the heatmaps' cells (all components, features only) sum to the key's score."""
    link, q, k = cross_link(setup.graph)
    head = link["head_loadings"][0]
    row = setup.tracer.run(setup.tokens).qk(head["layer"], head["head"], q)
    default = max((i for i in row.key_positions if i != k), key=lambda i: float(row.pattern[i]))
    rival = next(i for i in row.key_positions if i not in (k, default))
    req = {"tokens": setup.tokens, "layer": head["layer"], "head": head["head"], "query_pos": q, "key_pos": k}
    body = ok(client.post("/api/qk", json=req | {"top": 5, "rival_pos": rival}))
    c = body["contrast"]
    want = float(row.sum_of_terms[row.key_positions.index(k)] - row.sum_of_terms[row.key_positions.index(rival)])
    assert c["key_b"] == rival and len(c["terms"]) == 5
    assert c["score_diff"] == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert sum(t["diff"] for t in c["terms"]) + c["rest"] == pytest.approx(want, rel=1e-4, abs=1e-5)
    for hm in (body["heatmap"], body["heatmap_features"]):
        assert len(hm["values"]) == len(hm["query"]) and {len(r) for r in hm["values"]} == {len(hm["key"])}
        assert sum(map(sum, hm["values"])) == pytest.approx(body["qk"]["sum_of_terms"][0], rel=1e-4, abs=1e-5)
    named = [x for x in body["heatmap_features"]["query"] + body["heatmap_features"]["key"] if x != "other"]
    assert all(Node.parse(x).kind is Kind.FEATURE for x in named)
    for bad, words in ((k, "is the key itself"), (q + 1, "cannot see"), (999, "out of range")):
        if bad < len(setup.tokens) or words == "out of range":
            assert words in refused(client.post("/api/qk", json=req | {"rival_pos": bad}), 400, 422)


def test_qk_defaults_to_the_most_attended_key(client, setup):
    body = ok(
        client.post("/api/qk", json={"prompt": "Aunt Sally is the opposite of", "layer": 1, "head": 2, "query_pos": -1})
    )
    row = body["row"]
    assert body["key_pos"] == row["key_positions"][max(range(len(row["pattern"])), key=row["pattern"].__getitem__)]
    assert body["query_pos"] == len(body["str_tokens"]) - 1


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"head": 4}, "4 is out of range: valid values are 0..3"),
        ({"layer": 2}, "layer 2 is out of range"),
        ({"layer": -1}, "layer -1 is out of range"),
        ({"query_pos": 40}, "query position 40 is out of range"),
        ({"key_pos": 5, "query_pos": 2}, "cannot attend to key position 5"),
        ({"prompt": "   ", "tokens": None}, "prompt is empty"),
        ({"prompt": "w1 w2"}, "exactly one of 'prompt'"),
        ({"tokens": [0, 10_000]}, "token ids must lie in"),
        ({"layer": "one"}, "layer"),
    ],
)
def test_qk_bad_requests(client, setup, change, words):
    req = {"tokens": setup.tokens, "layer": 1, "head": 0, "query_pos": 3} | change
    msg = refused(client.post("/api/qk", json=req), 400, 422)
    assert words in msg
    ok(client.get("/api/info"))


# -- graph jobs -------------------------------------------------------------------------------------


def test_build_graph_job(client, setup):
    req = {"prompt": "Aunt Sally is the opposite of", "name": "built", "slug": "aunt-sally.1", "scan": "tiny_llama"}
    job = ok(client.post("/api/graph", json=req), 202)
    deadline = time.monotonic() + 120
    while job["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
        job = ok(client.get(f"/api/jobs/{job['id']}"))
    assert job["status"] == "done", job
    assert job["graph"] == "built.json"
    assert "built.json" in [g["name"] for g in ok(client.get("/api/graphs"))["graphs"]]
    graph = ok(client.get("/api/graphs/built"))["graph"]
    filled = [x for x in graph["links"] if x.get("qk_top_terms")]
    assert filled, "cross-position links should carry their heads' top QK terms"
    entry = filled[0]["qk_top_terms"][0]
    traced = setup.tracer.run("Aunt Sally is the opposite of")
    frame = traced.qk(entry["layer"], entry["head"], entry["query_pos"]).terms_frame(top=8, key_pos=entry["key_pos"])
    assert [t["value"] for t in entry["terms"]] == pytest.approx(frame["value"].tolist())
    assert [t["key"] for t in entry["terms"]] == frame["key"].tolist()
    assert (graph["metadata"]["slug"], graph["metadata"]["scan"]) == ("aunt-sally.1", "tiny_llama")
    traced_nodes = [n for n in graph["nodes"] if "qk_tracing_results" in n]
    assert traced_nodes, "targets of cross-position links should carry Neuronpedia's QK tracing"


def test_graph_job_errors(client):
    for field in ("slug", "scan"):
        msg = refused(client.post("/api/graph", json={"prompt": "w1 w2", field: "a/b"}), 400)
        assert f"{field} 'a/b' may hold only letters" in msg
    assert "plain file name" in refused(client.post("/api/graph", json={"prompt": "w1 w2", "name": "../x"}), 400)
    assert "prompt is empty" in refused(client.post("/api/graph", json={"prompt": ""}), 400)
    assert "no job" in refused(client.get("/api/jobs/deadbeef"), 404)


def test_explain_job_saves_a_mechanism_the_list_opens(client, setup):
    """POST /api/explain/jobs runs explain as a job; its file is listed under mechanisms (not as an invalid
    graph) and served by GET /api/mechanisms with the same answer and candidates as POST /api/explain."""
    req = {"prompt": "Aunt Sally is the opposite of Uncle Bob . Aunt", "answer": "Sally", "name": "aunt.graph.json"}
    job = ok(client.post("/api/explain/jobs", json=req), 202)
    deadline = time.monotonic() + 300
    while job["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
        job = ok(client.get(f"/api/jobs/{job['id']}"))
    assert job["status"] == "done", job
    assert job["graph"] == "aunt.mechanism.json"
    listing = ok(client.get("/api/graphs"))
    assert "aunt.mechanism.json" in [m["name"] for m in listing["mechanisms"]]
    assert "aunt.mechanism.json" not in [b["name"] for b in listing["invalid"]]
    saved = ok(client.get("/api/mechanisms/aunt.mechanism.json"))["mechanism"]
    direct = ok(client.post("/api/explain", json={k: v for k, v in req.items() if k != "name"}))["mechanism"]
    assert (saved["answer"], saved["best"], len(saved["candidates"])) == (
        direct["answer"],
        direct["best"],
        len(direct["candidates"]),
    )
    assert [c["effect"] for c in saved["candidates"]] == pytest.approx([c["effect"] for c in direct["candidates"]])
    assert "not a mechanism file" in refused(client.get(f"/api/mechanisms/{GRAPH_NAME}"), 404)
    again = ok(client.post("/api/explain/jobs", json=req), 202)  # never overwrites: a numbered name
    while again["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
        again = ok(client.get(f"/api/jobs/{again['id']}"))
    assert again["graph"] == "aunt-2.mechanism.json"


# -- sweeps -----------------------------------------------------------------------------------------


def test_sweep_equals_direct(client, setup):
    from qktrace.steering.interventions import SCALE, FreezeAttention, SteerQK
    from qktrace.steering.sweep import sweep

    n = len(setup.tokens)
    req = {
        "tokens": setup.tokens,
        "heads": [[1, 0], [1, 3]],
        "side": "key",
        "feature": 3,
        "positions": [2, 3],
        "scales": "0:2:3",
        "freeze_others": True,
        "watch_tokens": ["Sally", 5],
        "watch_attention": [[1, 0, n - 1, 2]],
    }
    body = ok(client.post("/api/sweep", json=req))
    assert len(body["rows"]) == 3 and body["columns"][0] == "scale"
    ivs = [SteerQK(1, (0, 3), "key", 3, [2, 3], scale=SCALE), FreezeAttention()]
    m = setup.tracer.model
    df = sweep(m, setup.tracer.saes, torch.tensor(setup.tokens), ivs, "0:2:3", ["Sally", 5], [(1, 0, n - 1, 2)])
    assert body["columns"] == list(df.columns)
    assert body["rows"] == json.loads(json.dumps(df.to_dict(orient="records")))
    clean = setup.tracer.run(setup.tokens).trace
    col = f"attn:L1.H0:{n - 1}->2"
    assert body["rows"][1][col] == pytest.approx(float(clean.pattern(1, n - 1, [0])[0, 0, 2]), abs=1e-6)  # scale 1


def test_sweep_replays_a_mechanism(client):
    """A mechanism's candidate (several features, maybe several sites) replayed through POST /api/sweep's
    `also` gives the p(answer) and p(rival) of the curve that explain measured through its own path."""
    prompt = "Aunt Sally is the opposite of Uncle Bob . Aunt"
    mech = ok(client.post("/api/explain", json={"prompt": prompt, "answer": "Sally"}))["mechanism"]
    cands = sorted(mech["candidates"], key=lambda c: -sum(len(p["features"]) for p in c["parts"]))
    cand = cands[0]
    first, *rest = cand["parts"]
    assert len(first["features"]) + sum(len(p["features"]) for p in rest) > 1, "want a set of several features"
    part = lambda p: {"heads": [[p["layer"], h] for h in p["heads"]], "side": p["side"], "positions": p["position"]}  # noqa: E731
    req = {
        "prompt": prompt,
        **part(first),
        "feature": first["features"][0],
        "also": [{**part(first), "features": first["features"][1:]}] * (len(first["features"]) > 1)
        + [{**part(p), "features": p["features"]} for p in rest],
        "scales": [pt["scale"] for pt in cand["curve"]],
        "freeze_others": True,
        "mode": "scale",
        "watch_tokens": [mech["answer_id"], mech["rival_id"]],
    }
    body = ok(client.post("/api/sweep", json=req))
    p_cols = [c for c in body["columns"] if c.startswith("p:")]
    assert len(p_cols) == 2
    for row, pt in zip(body["rows"], cand["curve"]):
        assert row["scale"] == pt["scale"]
        assert row[p_cols[0]] == pytest.approx(pt["p_answer"], rel=1e-4, abs=1e-7)
        assert row[p_cols[1]] == pytest.approx(pt["p_rival"], rel=1e-4, abs=1e-7)
    bad = {**req, "heads": [], "checkpoint": first["layer"], "freeze_others": False}
    assert "needs heads" in refused(client.post("/api/sweep", json=bad), 400)
    many = {**req, "also": [{**part(first), "features": list(range(65))}]}
    assert "give 1 to 64 features" in refused(client.post("/api/sweep", json=many), 400)


def test_sweep_residual_and_errors(client, setup):
    acts = setup.tracer.run(setup.tokens).acts(1)
    active = int(acts.feature[acts.pos == 1][0])
    req = {"tokens": setup.tokens, "checkpoint": 1, "feature": active, "positions": 1, "scales": [0.0, 1.0]}
    assert len(ok(client.post("/api/sweep", json=req))["rows"]) == 2
    inactive = next(f for f in range(24) if f not in acts.feature[acts.pos == 1].tolist())
    msg = refused(client.post("/api/sweep", json=req | {"feature": inactive}), 400)
    assert f"feature {inactive} is not active at positions [1]" in msg
    assert len(ok(client.post("/api/sweep", json=req | {"feature": inactive, "mode": "value"}))["rows"]) == 2
    base = {"tokens": setup.tokens, "heads": [[1, 0]], "feature": active, "positions": [1]}
    cases = [
        ({"heads": [[0, 1], [1, 0]]}, "one layer at a time"),
        ({"feature": 999}, "checkpoint 1 feature 999 is out of range"),
        ({"heads": [[1, 9]]}, "head 9 is out of range"),
        ({"checkpoint": 0}, "pick a feature of checkpoint 1"),
        ({"scales": "a:b"}, "scale spec"),
        ({"scales": "0:1:100"}, "a sweep takes"),
        ({"positions": [99]}, "position 99 is out of range"),
        ({"heads": [], "checkpoint": None}, "give heads"),
        ({"watch_tokens": ["no such token at all"]}, "single token"),
    ]
    for change, words in cases:
        assert words in refused(client.post("/api/sweep", json=base | change), 400, 422), change
    ok(client.get("/api/info"))


# -- features, view-only, static, headers -----------------------------------------------------------------


def test_features(client, viewer):
    for c in (client, viewer):
        body = ok(c.get("/api/features/1/3"))
        assert body["label"] == "dash label" and body["dashboard"]["contexts"][0]["i"] == 1
        body = ok(c.get("/api/features/2/4"))
        assert body["label"] == "c2 feature 4" and body["dashboard"] is None
        assert ok(c.get("/api/features/0/5"))["label"] == "c0/f5"
        assert "no SAE at checkpoint 7" in refused(c.get("/api/features/7/1"), 404)
        assert "checkpoint 1 feature 24 is out of range" in refused(c.get("/api/features/1/24"), 400)
        refused(c.get("/api/features/1/x"), 422)


def test_features_carry_histograms_and_bottom_outputs(tmp_path):
    """The demo's dashboards.json (version 1) holds each feature's histogram and bottom outputs: the features
    API passes them on, the histogram with its bins' edges; a file without them (before version 1) still reads."""
    from qktrace.config import DEMO_SAES

    c = TestClient(create_app(tmp_path, saes_dir=DEMO_SAES))
    path = next(DEMO_SAES.glob("blocks.1.*/dashboards.json"))
    data = json.loads(path.read_text())
    for f in list(data["features"])[:3]:
        want, body = data["features"][f], ok(c.get(f"/api/features/1/{f}"))["dashboard"]
        lo, counts = want["hist"]["lo"], want["hist"]["counts"]
        assert body["hist"]["counts"] == counts and body["bottom_out"] == want["bottom_out"] != []
        assert body["hist"]["edges"] == data["hist_edges"][lo : lo + len(counts) + 1]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "cfg.json").write_text(json.dumps({"hook_name": "blocks.0.hook_resid_pre", "d_sae": 4}))
    old = {"features": {"2": {"freq": 0.1, "top_out": ["a"], "contexts": []}}}  # no version, hist nor bottom_out
    (tmp_path / "old" / "dashboards.json").write_text(json.dumps(old))
    body = ok(TestClient(create_app(tmp_path, saes_dir=tmp_path / "old")).get("/api/features/0/2"))["dashboard"]
    assert body["hist"] is None and body["bottom_out"] == [] and body["top_out"] == ["a"]


def test_neuronpedia_labels_reach_the_features_api(setup, tmp_path):
    """A Neuronpedia export given to the loaded SAEs (serve --labels) replaces the labels /api/features shows."""
    export = tmp_path / "export.json"
    export.write_text(
        json.dumps(
            [{"modelId": "m", "layer": "2-res-x", "index": str(f), "description": f" NP {f}"} for f in range(24)]
        )
    )
    labelled = Tracer.load(setup.root / "model", setup.saes, labels=export)
    client = TestClient(create_app(setup.data, labelled))
    assert ok(client.get("/api/features/2/4"))["label"] == "NP 4"  # was "c2 feature 4" (labels.json)
    assert ok(client.get("/api/features/2/5"))["label"] == "NP 5"
    assert ok(client.get("/api/features/1/4"))["label"] == "c1 feature 4"  # layer 1 is not in the export


@pytest.mark.parametrize("name", ["circuit_tracer_0.5_graph.json", "neuronpedia_graph.json"])
def test_other_tools_graphs_are_listed_and_served(setup, tmp_path, name):
    """circuit-tracer's and Neuronpedia's own graph files open beside qktrace's, as they are."""
    data = tmp_path / "graphs"
    data.mkdir()
    raw = (Path(__file__).parent / "fixtures" / name).read_text()
    (data / name).write_text(raw)
    (data / GRAPH_NAME).write_text(json.dumps(setup.graph))
    for app in (create_app(data, setup.tracer), create_app(data, saes_dir=setup.saes)):
        client = TestClient(app)
        listing = ok(client.get("/api/graphs"))
        assert not listing["invalid"]
        entry = {g["name"]: g for g in listing["graphs"]}[name]
        assert entry["origin"] == ("circuit-tracer" if name.startswith("circuit") else "neuronpedia")
        assert entry["model"] == json.loads(raw)["metadata"]["scan"] and entry["n_nodes"] == len(
            json.loads(raw)["nodes"]
        )
        assert {g["name"]: g for g in listing["graphs"]}[GRAPH_NAME]["origin"] == "qktrace"
        assert ok(client.get(f"/api/graphs/{name}"))["graph"] == json.loads(raw)


def test_view_only_refuses_compute(viewer, setup):
    for path, req in [
        ("/api/qk", {"tokens": setup.tokens, "layer": 0, "head": 0, "query_pos": 1}),
        ("/api/graph", {"prompt": "w1"}),
        ("/api/sweep", {"tokens": setup.tokens, "heads": [[0, 0]], "feature": 1, "positions": 1}),
    ]:
        assert "no model is loaded" in refused(viewer.post(path, json=req), 409)
    assert ok(viewer.get(f"/api/graphs/{GRAPH_NAME}"))["graph"] == setup.graph


def test_static_page_is_offline(client):
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200
        text = r.text.replace("http://www.w3.org/2000/svg", "")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text
    assert "https://" not in page.text


def test_no_cors(client):
    r = client.options("/api/qk", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    r = client.get("/api/graphs", headers={"Origin": "http://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_form_posts_are_not_json(client, setup):
    body = json.dumps({"tokens": setup.tokens, "layer": 0, "head": 0, "query_pos": 1})
    r = client.post("/api/qk", content=body, headers={"Content-Type": "text/plain"})
    refused(r, 422)


def test_trusted_hosts(setup):
    app = create_app(setup.data, allowed_hosts=["127.0.0.1", "localhost"])
    assert TestClient(app, base_url="http://127.0.0.1:8000").get("/api/info").status_code == 200
    assert "not served here" in refused(TestClient(app, base_url="http://rebound.example").get("/api/info"), 400)


def test_serve_paths(setup, tmp_path):
    from qktrace.errors import InputError
    from qktrace.server.launch import split_paths

    assert split_paths([str(setup.data)]) == (setup.data, [])
    data_dir, files = split_paths([str(setup.data / GRAPH_NAME)])
    assert files == [setup.data / GRAPH_NAME] and data_dir.is_dir()
    with pytest.raises(InputError, match="does not exist"):
        split_paths([str(tmp_path / "missing")])
    with pytest.raises(InputError, match="serve one data directory"):
        split_paths([str(setup.data), str(tmp_path)])
    app = create_app(tmp_path, files=[setup.data / GRAPH_NAME])
    assert ok(TestClient(app).get("/api/graphs/tiny"))["graph"] == setup.graph


# -- reliability: bounded work, nothing lost, one line of JSON for every mistake ---------------------------


def post_raw(client, path, body):
    """POST JSON that may hold NaN or Infinity (which Python's json writes and the server must refuse)."""
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def small_limits(**kw):
    import dataclasses

    from qktrace.config import LIMITS

    return dataclasses.replace(LIMITS, **kw)


def wait_job(client, job_id, timeout=120):
    deadline = time.monotonic() + timeout
    job = ok(client.get(f"/api/jobs/{job_id}"))
    while job["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
        job = ok(client.get(f"/api/jobs/{job_id}"))
    return job


def test_jobs_queue_is_bounded_and_running_jobs_are_never_forgotten(setup, tmp_path):
    app = create_app(tmp_path, setup.tracer, limits=small_limits(max_queued_jobs=3, max_finished_jobs=1))
    client, engine = TestClient(app), app.state.engine
    with engine.lock:  # the model is busy: jobs queue up
        ids = [
            ok(client.post("/api/graph", json={"tokens": setup.tokens[:3], "name": f"q{i}"}), 202)["id"]
            for i in range(3)
        ]
        r = client.post("/api/graph", json={"tokens": setup.tokens[:3], "name": "q3"})
        assert "queued or running" in refused(r, 429) and int(r.headers["retry-after"]) > 0
        for i in ids:  # all still known while queued
            assert ok(client.get(f"/api/jobs/{i}"))["status"] == "running"
    for i in ids:
        assert wait_job(client, i)["status"] == "done"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q0.json", "q1.json", "q2.json"]
    later = ok(client.post("/api/graph", json={"tokens": setup.tokens[:3], "name": "q4"}), 202)["id"]
    assert wait_job(client, later)["graph"] == "q4.json"
    known = [i for i in ids if client.get(f"/api/jobs/{i}").status_code == 200]
    assert len(known) <= 1  # finished jobs are forgotten, oldest first, past max_finished_jobs


def test_graphs_are_never_overwritten_unless_asked(client, setup):
    before = (setup.data / GRAPH_NAME).read_bytes()
    msg = refused(client.post("/api/graph", json={"tokens": setup.tokens[:3], "name": "tiny"}), 409)
    assert "exists" in msg and "overwrite" in msg
    assert (setup.data / GRAPH_NAME).read_bytes() == before
    # a name taken while the job waited: the job fails with that as its state, the file stays
    engine = client.app.state.engine
    with engine.lock:
        a = ok(client.post("/api/graph", json={"tokens": setup.tokens[:3], "name": "race"}), 202)
        b = ok(client.post("/api/graph", json={"tokens": setup.tokens[:4], "name": "race"}), 202)
    assert wait_job(client, a["id"])["status"] == "done"
    failed = wait_job(client, b["id"])
    assert failed["status"] == "error" and failed["stage"] == "failed" and "race.json" in failed["error"]
    first = (setup.data / "race.json").read_bytes()
    job = ok(client.post("/api/graph", json={"tokens": setup.tokens[:4], "name": "race", "overwrite": True}), 202)
    assert wait_job(client, job["id"])["status"] == "done"
    assert (setup.data / "race.json").read_bytes() != first
    # without a name, a graph of the same prompt gets a fresh file rather than replacing the first
    names = []
    for _ in range(2):
        job = ok(client.post("/api/graph", json={"tokens": setup.tokens[:3]}), 202)
        names.append(wait_job(client, job["id"])["graph"])
    assert names[0] != names[1] and names[1] == names[0].replace(".json", "-2.json")
    for name in ["race.json", *names]:
        (setup.data / name).unlink()


def test_save_never_follows_a_planted_link(setup, tmp_path, monkeypatch):
    from qktrace import files
    from qktrace.server.store import GraphStore

    outside = tmp_path / "outside.json"
    outside.write_text("precious")
    data = tmp_path / "data"
    data.mkdir()
    (data / "g.json").symlink_to(outside)
    names = iter(["planted", "fresh"])
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: next(names))
    (data / ".new.json.planted.tmp").symlink_to(outside)
    store = GraphStore(data)
    with pytest.raises(Exception, match="exists"):
        store.save("g.json", {"a": 1})  # a link at the name is an existing file
    assert store.save("new.json", {"a": 1}) == "new.json"
    assert outside.read_text() == "precious" and json.loads((data / "new.json").read_text()) == {"a": 1}


def test_unreadable_files_are_listed_as_invalid_and_the_rest_listed(setup, tmp_path):
    import shutil

    shutil.copy(setup.data / GRAPH_NAME, tmp_path / GRAPH_NAME)
    (tmp_path / "deep.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    (tmp_path / "utf8.json").write_bytes(b'{"metadata": "\xff"}')
    (tmp_path / "nodes.json").write_text(json.dumps({"metadata": {"qktrace": {"format_version": 1}}, "nodes": 5}))
    (tmp_path / "dir.json").mkdir()
    data = setup.graph | {"metadata": setup.graph["metadata"] | {"qktrace": setup.graph["metadata"]["qktrace"] | {}}}
    data["metadata"]["qktrace"]["settings"] = {"top_heads": 200_000}
    (tmp_path / "huge.json").write_text(json.dumps(data))
    client = TestClient(create_app(tmp_path, limits=small_limits(max_graph_file_bytes=1 << 20)))
    (tmp_path / "big.json").write_bytes(b" " * (2 << 20))
    listing = ok(client.get("/api/graphs"))
    assert [g["name"] for g in listing["graphs"]] == [GRAPH_NAME]  # listed valid only what is served
    bad = {b["name"]: b["error"] for b in listing["invalid"]}
    assert set(bad) == {"deep.json", "utf8.json", "nodes.json", "dir.json", "big.json", "huge.json"}
    assert "nested too deeply" in bad["deep.json"] and "MiB" in bad["big.json"]
    assert "settings.top_heads" in bad["huge.json"]
    start = time.perf_counter()
    assert "settings.top_heads" in refused(client.get("/api/graphs/huge"), 422)
    assert time.perf_counter() - start < 5
    for name in ("deep", "utf8", "nodes", "big"):
        refused(client.get(f"/api/graphs/{name}"), 422)


def test_token_limit_and_trace_cache_bytes(setup, tmp_path):
    one = setup.tracer.run(setup.tokens).nbytes
    app = create_app(tmp_path, setup.tracer, limits=small_limits(server_max_tokens=8, trace_cache_bytes=2 * one))
    client, engine = TestClient(app), app.state.engine
    msg = refused(client.post("/api/qk", json={"prompt": " ".join(["w1"] * 12), "layer": 0, "head": 0, "query_pos": 1}))
    assert "13 tokens" in msg and "8" in msg and "--max-tokens" in msg
    msg = refused(client.post("/api/qk", json={"tokens": [1] * 9, "layer": 0, "head": 0, "query_pos": 1}))
    assert "9 tokens" in msg
    for i in range(4):
        toks = setup.tokens[: 5 + i % 3] if i < 3 else setup.tokens
        ok(client.post("/api/qk", json={"tokens": toks[:8], "layer": 0, "head": 0, "query_pos": 1}))
        assert engine._cached_bytes <= 2 * one
        assert engine._cached_bytes == sum(t.nbytes for t in engine._traced.values())
    tiny = create_app(tmp_path, setup.tracer, limits=small_limits(trace_cache_bytes=1))
    ok(TestClient(tiny).post("/api/qk", json={"tokens": setup.tokens, "layer": 0, "head": 0, "query_pos": 1}))
    assert tiny.state.engine._cached_bytes == 0  # a trace larger than the cache is used, not kept


def test_body_limit_and_plain_500s_are_gone(setup, tmp_path):
    client = TestClient(create_app(tmp_path, setup.tracer, limits=small_limits(max_request_bytes=4096)))
    big = {"tokens": setup.tokens, "heads": [[1, 0]] * 2000, "feature": 1, "positions": 1}
    assert "larger than 4096 bytes" in refused(client.post("/api/sweep", json=big), 413)
    assert "token" in refused(client.post("/api/qk", json={"tokens": [10**30], "layer": 0, "head": 0, "query_pos": 0}))
    base = {"tokens": setup.tokens, "heads": [[1, 0]], "feature": 3, "positions": [2], "scales": "0,1"}
    assert "watched token id 100000 is out of range" in refused(
        client.post("/api/sweep", json=base | {"watch_tokens": [100000]})
    )
    assert "greater than or equal to 0" in refused(client.post("/api/sweep", json=base | {"watch_tokens": [-1]}))
    r = client.post("/api/qk", content=b'{"tokens": [1], "layer": NaN}', headers={"content-type": "application/json"})
    assert "layer" in refused(r, 422)
    r = client.post("/api/qk", content=b"[" * 50_000, headers={"content-type": "application/json"})
    refused(r, 400, 413)
    msg = refused(post_raw(client, "/api/qk", {"prompt": "w1 \udcff", "layer": 0, "head": 0, "query_pos": 0}))
    assert "prompt" in msg and "unicode" in msg


def test_sweep_refuses_meaning_changes(client, setup):
    base = {"tokens": setup.tokens, "heads": [[1, 0]], "feature": 3, "positions": [2, 3], "scales": "0:2:3"}
    cases = [
        ({"heads": [[1, 0], [1, 0]]}, "given twice"),
        ({"feature": -1}, "negative"),
        ({"positions": [2, 2 - len(setup.tokens)]}, "given twice"),
        ({"scales": [0.0, float("nan")]}, "not a finite number"),
        ({"scales": []}, "0 scales"),
        ({"scales": "0:1:100000000"}, "100000000 scales"),
        ({"scales": "1e400,1"}, "not a finite number"),
        ({"layer": 1}, "Extra inputs"),
        ({"feature": True}, "feature"),
        ({"feature": "3"}, "feature"),
        ({"freeze_others": "yes"}, "freeze_others"),
        ({"heads": [[1, 0]] * 300}, "300 heads"),
        ({"watch_attention": [[0, 0, 0, 0]] * 21}, "21 watched attention"),
    ]
    for change, words in cases:
        start = time.perf_counter()
        assert words in refused(post_raw(client, "/api/sweep", base | change), 400, 422), change
        assert time.perf_counter() - start < 5, change


def test_a_bug_is_one_line_of_json_and_the_server_keeps_serving(setup, tmp_path, monkeypatch):
    from qktrace.server import app as app_module
    from qktrace.tracer import Traced

    def boom(*a, **k):
        raise RuntimeError("a bug\nwith two lines")

    monkeypatch.setattr(app_module, "qk_response", boom)
    monkeypatch.setattr(Traced, "graph", boom)
    client = TestClient(create_app(tmp_path, setup.tracer))
    r = client.post("/api/qk", json={"tokens": setup.tokens, "layer": 0, "head": 0, "query_pos": 1})
    assert r.status_code == 500 and r.json()["version"] == API_VERSION
    assert r.json()["error"] == "internal error (RuntimeError: a bug with two lines): see the server log"
    job = wait_job(client, ok(client.post("/api/graph", json={"tokens": setup.tokens[:3]}), 202)["id"])
    assert job["status"] == "error" and job["stage"] == "failed" and "internal error (RuntimeError" in job["error"]
    assert list(tmp_path.iterdir()) == []
    ok(client.get("/api/info"))


def test_serve_with_transcoders_builds_transcoder_graphs(setup, tmp_path):
    """A tracer holding transcoders (what `serve --transcoders` loads) answers POST /api/graph with the plain
    transcoder graph, and /api/qk over the residual's writers."""
    from qktrace.testing import write_transcoder_set

    model = setup.tracer.model
    tracer = Tracer.load(setup.root / "model", transcoders=write_transcoder_set(tmp_path / "ct", model.d_model, 2))
    data = tmp_path / "graphs"
    data.mkdir()
    client = TestClient(create_app(data, tracer))
    job = ok(client.post("/api/graph", json={"prompt": "Aunt Sally is the opposite of", "name": "tc"}), 202)
    deadline = time.monotonic() + 120
    while job["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
        job = ok(client.get(f"/api/jobs/{job['id']}"))
    assert job["status"] == "done", job
    graph = ok(client.get("/api/graphs/tc"))["graph"]
    assert graph["metadata"]["qktrace"]["settings"]["graph"] == "transcoder"
    kinds = {Node.parse(n["node_id"]).kind.value for n in graph["nodes"]}
    assert {"mlp_error", "token", "logit"} <= kinds and "feature" not in kinds


def test_concurrent_reads_of_one_graph_share_one_parse(setup, monkeypatch):
    """Four requests for one file at once parse it once and get the same bytes; a later request parses again."""
    import threading

    from qktrace.graph import formats

    client = TestClient(create_app(setup.data))
    calls, gate = [], threading.Event()
    real = formats.read_json

    def slow(*args, **kwargs):  # the first parse waits until every request has arrived
        calls.append(1)
        gate.wait(5)
        return real(*args, **kwargs)

    monkeypatch.setattr(formats, "read_json", slow)
    bodies: list[bytes] = []
    threads = [threading.Thread(target=lambda: bodies.append(client.get(f"/api/graphs/{GRAPH_NAME}").content))
               for _ in range(4)]  # fmt: skip
    for t in threads:
        t.start()
    time.sleep(0.5)
    gate.set()
    for t in threads:
        t.join(10)
    assert len(bodies) == 4 and len(set(bodies)) == 1 and json.loads(bodies[0])["name"] == GRAPH_NAME
    assert len(calls) == 1
    client.get(f"/api/graphs/{GRAPH_NAME}")
    assert len(calls) == 2
