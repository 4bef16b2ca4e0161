"""Property-based: every API route, given a valid body with one field replaced by a bad, huge or
ill-typed value (or given bytes that are not JSON at all), answers a 4xx with one line of versioned JSON,
in bounded time, leaves every file in the data directory byte for byte as it was, and keeps serving.
Bodies that could make an unbounded allocation run again in a subprocess under a memory limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from qktrace.config import LIMITS  # noqa: E402
from qktrace.server import API_VERSION, create_app  # noqa: E402
from qktrace.testing import GRAPH_NAME, make_server_setup  # noqa: E402

FUZZ = settings(
    max_examples=int(os.environ.get("QKTRACE_FUZZ_EXAMPLES", "30")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SRC = str(Path(__file__).resolve().parents[1] / "src")
N_LAYERS, N_HEADS, D_SAE = 2, 4, 24


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    s = make_server_setup(tmp_path_factory.mktemp("fuzz_server"))
    (s.data / "broken.json").write_text("{not json")
    client = TestClient(create_app(s.data, s.tracer), raise_server_exceptions=True)
    acts = s.tracer.run(s.tokens).acts(1)
    on = sorted(set(acts.feature[acts.pos == 2].tolist()))
    n = len(s.tokens)
    bases = {
        "/api/qk": {"tokens": s.tokens, "layer": 1, "head": 0, "query_pos": 3, "key_pos": 2, "top": 5},
        "/api/sweep": {
            "tokens": s.tokens,
            "heads": [[1, 0]],
            "checkpoint": 1,
            "feature": on[0],
            "positions": [2],
            "scales": "0,1",
            "side": "key",
            "mode": "scale",
            "freeze_others": False,
            "watch_tokens": ["Sally"],
            "watch_attention": [[1, 0, n - 1, 2]],
            "top_k": 3,
        },
        "/api/compare": {
            "prompt_a": "w1 w2 w3 w4",
            "prompt_b": "w1 w2 w5 w4",
            "answer": "w4",
            "top": 2,
            "top_terms": 3,
        },
        "/api/graph": {
            "prompt": "w1 w2 w3",
            "name": "fuzzed",
            "node_threshold": 0.8,
            "edge_threshold": 0.98,
            "max_nodes": 20,
            "qk_terms": True,
            "overwrite": False,
        },
    }
    for path, body in bases.items():  # the bases are valid (graph: checked by the job test in test_server)
        if path != "/api/graph":
            assert client.post(path, json=body).status_code == 200, path
    off = [f for f in range(D_SAE) if f not in on]
    return {"setup": s, "client": client, "bases": bases, "n": n, "off": off}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() if p.is_file() else b"<link>" for p in sorted(folder.iterdir())}


def post_raw(client: TestClient, path: str, body: object) -> object:
    """JSON as Python writes it: NaN and Infinity included, lone surrogates escaped."""
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def check_refused(w, method: str, path: str, body: object = None, raw: bytes | None = None) -> str:  # type: ignore[no-untyped-def]
    client, data = w["client"], w["setup"].data
    before = snapshot(data)
    start = time.perf_counter()
    if raw is not None:
        r = client.post(path, content=raw, headers={"content-type": "application/json"})
    elif method == "GET":
        r = client.get(path)
    else:
        r = post_raw(client, path, body)
    seconds = time.perf_counter() - start
    case = f"{method} {path} {json.dumps(body)[:300] if body is not None else raw[:80] if raw else ''}"
    assert 400 <= r.status_code < 500, f"{case}: {r.status_code} {r.text[:300]}"
    got = r.json()
    assert got["version"] == API_VERSION and isinstance(got["error"], str), case
    assert len(got["error"].splitlines()) == 1 and got["error"].strip(), case
    assert seconds < 30, f"{case}: {seconds:.1f} s"
    assert snapshot(data) == before, f"{case} changed the data directory"
    assert client.get("/api/info").status_code == 200
    return str(got["error"])


# -- bad values ------------------------------------------------------------------------------------------

leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**40), 10**40),
    st.text(max_size=20),
)
junk = st.recursive(
    leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


def is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def not_int(none_is_valid: bool = False) -> st.SearchStrategy[object]:
    return junk.filter(lambda x: not is_int(x) and (x is not None or not none_is_valid))


def ints_outside(lo: int, hi: int) -> st.SearchStrategy[object]:
    return st.one_of(st.integers(max_value=lo - 1), st.integers(min_value=hi + 1), not_int())


def not_a(*types: type, none_is_valid: bool = False) -> st.SearchStrategy[object]:
    return junk.filter(lambda x: not isinstance(x, types) and (x is not None or not none_is_valid))


def valid_fraction(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and 0 < x <= 1


surrogate = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
bad_text_prompt = st.one_of(
    st.text(alphabet=" \t\n\r", max_size=5),
    st.tuples(st.text(max_size=5), surrogate).map("".join),
    st.just("w1 \x00 w2"),
    st.just("w1 " * (LIMITS.server_max_tokens + 5)),
    not_a(str, none_is_valid=True).filter(lambda x: x is not None),
)
bad_tokens = st.one_of(
    st.lists(st.integers(0, 50), min_size=1, max_size=5).map(lambda t: [*t, 10**6]),
    st.lists(st.integers(0, 50), min_size=1, max_size=5).map(lambda t: [*t, -1]),
    st.just([]),
    st.just([1] * (LIMITS.server_max_tokens + 1)),
    st.lists(not_int(), min_size=1, max_size=3),
    not_a(list, none_is_valid=True).filter(lambda x: x is not None),
)
bad_scales = st.one_of(
    st.integers(LIMITS.max_scales + 1, 10**15).map(lambda n: f"0:1:{n}"),
    st.sampled_from(["nan", "inf", "1e400", "0,nan", "", ",", "1e5", "a:b:c", "0:1:0", "x" * 300]),
    st.lists(st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e300]), min_size=1, max_size=3),
    st.just([]),
    st.just([0.5] * (LIMITS.max_scales + 1)),
    st.lists(st.text(max_size=3), min_size=1, max_size=3),
    not_a(str, list),
)


bad_token = st.one_of(
    st.sampled_from(["Aunt Sally", "w1 w2", "", 10**6, -1, 2**70, True, 1.5]),
    st.text(min_size=201, max_size=300),
    not_a(str, int, none_is_valid=True),
)


def field_bad(w) -> dict[str, dict[str, st.SearchStrategy[object]]]:  # type: ignore[no-untyped-def]
    n = w["n"]
    prompt = {"tokens": bad_tokens, "prompt": bad_text_prompt, "bogus": junk}
    return {
        "/api/qk": {
            **prompt,
            "layer": ints_outside(0, N_LAYERS - 1),
            "head": ints_outside(0, N_HEADS - 1),
            "query_pos": ints_outside(-n, n - 1),
            "key_pos": st.one_of(ints_outside(-n, n - 1), st.integers(4, n - 1)).filter(lambda x: x is not None),
            "top": ints_outside(1, LIMITS.max_top),
            # the query (3) sees keys 0..3; the key is 2: a rival must be another key the query sees
            "rival_pos": st.one_of(
                ints_outside(-n, n - 1).filter(lambda x: x is not None),
                st.sampled_from([2, 2 - n, *range(4, n), *range(4 - n, 0)]),
            ),
        },
        "/api/compare": {
            "prompt_a": bad_text_prompt,
            "prompt_b": st.one_of(bad_text_prompt, st.sampled_from(["w1 w2", "w1 w2 w3 w4 w5", "w1 " * 3000])),
            "tokens_a": bad_tokens,
            "tokens_b": bad_tokens,
            "query_pos": ints_outside(-5, 4),  # 5 tokens with BOS
            "answer": bad_token,
            "rival": st.one_of(bad_token, st.just("w4")),  # w4: the answer itself
            "top": ints_outside(0, 64),
            "top_terms": ints_outside(0, 200),
            "bogus": junk,
        },
        "/api/sweep": {
            **prompt,
            "heads": st.one_of(
                st.sampled_from(
                    [[[1, 0], [1, 0]], [[1, 9]], [[0, 0], [1, 0]], [[1]], [[1, 0, 0]], [[5, 0]], [[1, -1]]]
                ),
                st.just([[1, 0]] * (LIMITS.max_heads + 1)),
                not_a(list),
            ),
            "feature": st.one_of(ints_outside(0, D_SAE - 1), st.sampled_from(w["off"])),
            "positions": st.one_of(
                ints_outside(-n, n - 1),
                st.sampled_from([[2, 2], [2, 2 - n], [], [n], [-n - 1]]),
                st.just(list(range(LIMITS.max_positions + 1))),
            ),
            "scales": bad_scales,
            "side": junk.filter(lambda x: x not in ("query", "key")),
            "mode": junk.filter(lambda x: x not in ("scale", "value")),
            "checkpoint": st.one_of(st.sampled_from([0, 2, 3, -1, 10**12]), not_int(none_is_valid=True)),
            "freeze_others": not_a(bool),
            "watch_tokens": st.one_of(
                st.sampled_from([["Aunt Sally"], [""], [10**6], [-1], [2**40], [True]]),
                st.just(["Sally"] * (LIMITS.max_watch_tokens + 1)),
                not_a(list),
            ),
            "watch_attention": st.one_of(
                st.sampled_from([[[9, 0, 0, 0]], [[1, 9, 0, 0]], [[1, 0, 99, 0]], [[1, 0, 0]], [[1, 0, 0, 0, 0]]]),
                st.just([[1, 0, 1, 0]] * (LIMITS.max_watch_attention + 1)),
                not_a(list),
            ),
            "top_k": ints_outside(1, 20),
            # no transcoders or attention SAEs are loaded: a kind of theirs, or a feature layer, is refused
            "kind": st.one_of(st.sampled_from(["transcoder", "attn"]), junk.filter(lambda x: x != "feature")),
            "feature_layer": st.one_of(st.integers(-(10**20), 10**20), not_int(none_is_valid=True)),
        },
        "/api/graph": {
            **prompt,
            "name": st.one_of(
                st.sampled_from(["tiny", GRAPH_NAME, "broken", "../x", ".x", "a/b", "x" * 300, "", "a b", "é"]),
                not_a(str, none_is_valid=True),
            ),
            "node_threshold": st.one_of(
                st.sampled_from([0, -1, 1.5, float("nan"), float("inf"), "0.5", True]),
                junk.filter(lambda x: not valid_fraction(x)),
            ),
            "edge_threshold": st.one_of(
                st.sampled_from([0.0, 2, float("-inf"), "1"]), junk.filter(lambda x: not valid_fraction(x))
            ),
            "max_nodes": st.one_of(
                st.sampled_from([0, -1, LIMITS.max_graph_nodes + 1, 10**30, 1.5]), not_int(none_is_valid=True)
            ),
            "qk_terms": not_a(bool),
            "overwrite": not_a(bool),
        },
    }


def _route(path: str):  # type: ignore[no-untyped-def]
    @FUZZ
    @given(data=st.data())
    def test(world, data):  # type: ignore[no-untyped-def]
        bad = field_bad(world)[path]
        key = data.draw(st.sampled_from(sorted(bad)), label="field")
        body = dict(world["bases"][path])
        field, _, which = key.partition("_")
        if field in ("prompt", "tokens") and which in ("", "a", "b"):  # exactly one of text or ids is given
            body.pop(f"tokens{_}{which}", None), body.pop(f"prompt{_}{which}", None)
        body[key] = data.draw(bad[key], label="value")
        check_refused(world, "POST", path, body)

    return test


test_fuzz_qk = _route("/api/qk")
test_fuzz_sweep = _route("/api/sweep")
test_fuzz_graph = _route("/api/graph")
test_fuzz_compare = _route("/api/compare")


@FUZZ
@given(
    raw=st.one_of(st.binary(max_size=200), st.text(max_size=100).map(str.encode), junk.map(json.dumps).map(str.encode))
)
def test_fuzz_bodies_that_are_not_requests(world, raw):
    for path in ("/api/qk", "/api/sweep", "/api/graph", "/api/compare"):
        check_refused(world, "POST", path, raw=raw)


@FUZZ
@given(
    name=st.text(max_size=40).filter(lambda s: s.removesuffix(".json") not in ("tiny", "")),
    checkpoint=st.one_of(st.integers(-(10**20), 10**20), st.text(max_size=8)),
    feature=st.one_of(st.integers(-(10**20), 10**20), st.text(max_size=8)),
    job=st.text(max_size=40),
)
def test_fuzz_get_routes(world, name, checkpoint, feature, job):
    check_refused(world, "GET", f"/api/graphs/{quote(name, safe='')}")
    check_refused(world, "GET", f"/api/jobs/{quote(job, safe='') or 'x'}")

    def as_index(x: object) -> int | None:
        try:
            return int(TypeAdapter(int).validate_python(str(x)))
        except ValueError:
            return None

    c, f = as_index(checkpoint), as_index(feature)
    if not (c is not None and 0 <= c <= N_LAYERS and f is not None and 0 <= f < D_SAE):
        check_refused(world, "GET", f"/api/features/{quote(str(checkpoint), safe='')}/{quote(str(feature), safe='')}")


# -- what could allocate without bound, under a memory limit ----------------------------------------------


def test_huge_requests_are_refused_in_bounded_memory(tmp_path):
    """One subprocess capped at 3 GiB of address space once the model is loaded: each huge request is a 4xx,
    quickly, and the server keeps answering."""
    script = textwrap.dedent(
        f"""
        import json, resource, sys, time
        from pathlib import Path
        sys.path.insert(0, {SRC!r})
        from fastapi.testclient import TestClient
        from qktrace.server import create_app
        from qktrace.testing import make_server_setup
        s = make_server_setup(Path({str(tmp_path)!r}))
        graph = json.loads((s.data / "tiny.json").read_text())
        graph["metadata"]["qktrace"]["settings"]["top_heads"] = 200_000
        (s.data / "huge.json").write_text(json.dumps(graph))
        link = dict(graph["links"][0], head_loadings=[])
        wide = dict(link, head_loadings=[{{"layer": 0, "head": h, "direct": 0.0, "via_mlp": 0.0}} for h in range(1024)])
        graph["metadata"]["qktrace"]["settings"]["top_heads"] = 5
        graph["links"] = [wide] + [link] * 100_000  # padded to 1024 heads: 2.4 GB in float64
        (s.data / "pad.json").write_text(json.dumps(graph))
        client = TestClient(create_app(s.data, s.tracer))
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        base = {{"tokens": s.tokens, "heads": [[1, 0]], "feature": 3, "positions": [2], "scales": "0,1"}}
        qk = {{"tokens": s.tokens, "layer": 1, "head": 0, "query_pos": 3}}
        cases = [
            ("POST", "/api/sweep", base | {{"scales": "0:1:100000000"}}),
            ("POST", "/api/sweep", base | {{"scales": "0:1:" + "9" * 4000}}),
            ("POST", "/api/sweep", base | {{"heads": [[1, 0]] * 100_000}}),
            ("POST", "/api/sweep", base | {{"positions": [1] * 150_000}}),
            ("POST", "/api/sweep", base | {{"watch_tokens": [1] * 150_000}}),
            ("POST", "/api/sweep", base | {{"watch_attention": [[1, 0, 1, 0]] * 50_000}}),
            ("POST", "/api/qk", {{k: v for k, v in qk.items() if k != "tokens"}} | {{"prompt": "w1 " * 20_000}}),
            ("POST", "/api/qk", qk | {{"tokens": [1] * 200_000}}),
            ("POST", "/api/qk", qk | {{"top": 10**30}}),
            ("POST", "/api/qk", qk | {{"layer": 10**30}}),
            ("POST", "/api/graph", {{"prompt": "w1", "max_nodes": 10**30}}),
            ("POST", "/api/qk", "x" * (50 << 20)),
            ("GET", "/api/graphs/huge", None),
            ("GET", "/api/graphs/pad", None),
        ]
        out = []
        for method, path, body in cases:
            start = time.perf_counter()
            if method == "GET":
                r = client.get(path)
            else:
                content = body if isinstance(body, str) else json.dumps(body)
                r = client.post(path, content=content, headers={{"content-type": "application/json"}})
            out.append((path, r.status_code, r.json().get("error", ""), time.perf_counter() - start))
        out.append(("/api/info", client.get("/api/info").status_code, "", 0.0))
        print(json.dumps(out))
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    *cases, info = results
    for path, status, error, seconds in cases:
        assert 400 <= status < 500 and error and "\n" not in error, (path, status, error)
        assert seconds < 30, (path, seconds)
    assert info[1] == 200


# -- hostile graph files: listed and read alike ------------------------------------------------------------


def _hostile_graph(base: dict, kind: str, n: int) -> bytes | None:
    """A graph file of one hostile kind, from a valid one; None for a FIFO (made by the caller)."""
    g = json.loads(json.dumps(base))
    qk = g["metadata"]["qktrace"]
    node = next(x for x in g["nodes"] if x.get("qk_tracing_head")) if kind.startswith("head") else None
    if kind == "non-finite":
        return json.dumps(g).replace('"replacement":', f'"replacement":1e{308 + n}, "x":', 1).encode()
    if kind == "deeply-nested":
        g["metadata"]["prompt"] = json.loads("[" * 50 + "]" * 50)
        return json.dumps(g).replace('"prompt": [', '"prompt": ' + "[" * (1000 * n), 1).replace(
            "]", "]" * (1000 * n), 1
        ).encode()  # fmt: skip
    if kind == "padding":  # one link with many head loadings beside many with none
        link = dict(g["links"][0], head_loadings=[])
        wide = [{"layer": 0, "head": h, "direct": 0.0, "via_mlp": 0.0} for h in range(min(64 * n, 1100))]
        g["links"] = [dict(link, head_loadings=wide)] + [link] * (500 * n)
    elif kind == "top_heads":
        qk["settings"] = {"top_heads": 10**n}
    elif kind == "head-layer":
        assert node is not None
        node["qk_tracing_head"]["layer"] = -n
    elif kind == "head-head":
        assert node is not None
        node["qk_tracing_head"]["head"] = 10 ** (3 + n)
    elif kind == "head-pos":
        assert node is not None
        node["qk_tracing_head"]["query_pos"] = len(qk["tokens"]) + n
    elif kind == "invalid-utf8":
        return json.dumps(g).encode()[:-10] + b"\xff\xfe" + json.dumps(g).encode()[-10:]
    elif kind == "compressed":
        import gzip

        return gzip.compress(json.dumps(g).encode())
    elif kind == "fifo":
        return None
    return json.dumps(g).encode()


GRAPH_KINDS = ["non-finite", "deeply-nested", "padding", "top_heads", "head-layer", "head-head", "head-pos",
               "invalid-utf8", "compressed", "fifo"]  # fmt: skip


@FUZZ
@given(kind=st.sampled_from(GRAPH_KINDS), n=st.integers(1, 6))
def test_fuzz_graph_files_listed_as_served(world, tmp_path_factory, kind, n):
    """A hostile graph file is listed valid exactly when it is served (200), else refused with one line (4xx),
    in bounded time; `load_graph` agrees; a graph that loads keeps its head table within what the file holds."""
    from qktrace.errors import GraphFileError
    from qktrace.graph import load_graph

    folder = tmp_path_factory.mktemp("hostile")
    path = folder / "h.json"
    data = _hostile_graph(world["setup"].graph, kind, n)
    if data is None:
        os.mkfifo(path)
    else:
        path.write_bytes(data)
    client = TestClient(create_app(folder), raise_server_exceptions=True)
    start = time.perf_counter()
    listing = client.get("/api/graphs").json()
    r = client.get("/api/graphs/h")
    assert time.perf_counter() - start < 30, kind
    listed = [g["name"] for g in listing["graphs"]]
    assert (listed == ["h.json"]) == (r.status_code == 200), (kind, listing, r.status_code)
    if r.status_code != 200:
        assert 400 <= r.status_code < 500 and len(r.json()["error"].splitlines()) == 1, (kind, r.text[:300])
    if kind == "fifo":
        return  # load_graph names a file the user chose: refused as not regular (checked below without blocking)
    try:
        graph = load_graph(path)
    except GraphFileError as e:
        assert "\n" not in str(e) and len(str(e)) < 500, (kind, str(e)[:600])
        assert r.status_code != 200, kind
        return
    assert kind in ("padding", "top_heads") and r.status_code == 200, kind  # within the bounds: served
    loadings = sum(len(link.get("head_loadings") or []) for link in json.loads(data or b"{}")["links"])
    assert graph.heads.numel() <= 16 * (len(graph.source) + loadings)


def test_load_graph_refuses_a_fifo(tmp_path):
    from qktrace.errors import GraphFileError
    from qktrace.graph import load_graph

    os.mkfifo(tmp_path / "g.json")
    with pytest.raises(GraphFileError, match="not a regular file"):
        load_graph(tmp_path / "g.json")
