"""The page on transcoder and checkpointed graphs, with real clicks in headless Chromium: "steer this feature" on
a transcoder node fills the steering panel's kind and feature layer, and a sweep inside a later layer's heads
plots the library's own numbers; attention-SAE features are labelled by default like other features; the
main view keeps token text readable at fit on the demo's largest graph; closing compare clears the panels
that showed a side's results."""

from __future__ import annotations

import json
import re
import urllib.error

import pytest

import qktrace
from qktrace.nodes import Kind, Node, component_label

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama with random per-layer transcoders (and attention-output SAEs for the checkpointed graph)."""
    from qktrace.saes import load_transcoders
    from qktrace.testing import make_tiny_model, random_attention_saes, write_transcoder_set

    root = tmp_path_factory.mktemp("steer")
    model = qktrace.Tracer.load(make_tiny_model("llama", root / "model")).model
    ts = load_transcoders(write_transcoder_set(root / "ct", model.d_model, model.n_layers), model)
    return model, ts, random_attention_saes(model, ("z", "attn_out"))


def transcoder_graph(tiny, data):
    """A transcoder tracer, its traced prompt and its graph saved as data/tc.json (the file's JSON)."""
    from qktrace.testing import random_prompt

    model, ts, _ = tiny
    tracer = qktrace.Tracer(model, transcoders=ts)
    traced = tracer.run(random_prompt(8, seed=2))
    data.mkdir()
    traced.graph(progress=False, node_threshold=0.95).save(data / "tc.json")
    return tracer, traced, json.loads((data / "tc.json").read_text())


def test_steer_a_transcoder_feature_inside_heads(tiny, page, live_server, tmp_path):
    """'Steer this feature' on a layer-0 transcoder node fills kind and feature layer; heads of layer 1 typed in,
    the sweep's plotted numbers equal `sweep()` run on the library's own interventions; the request without
    them (what the page sent before) is refused with a 400 that asks for the feature layer."""
    from qktrace.server import create_app
    from qktrace.steering.interventions import SCALE, SteerQK
    from qktrace.steering.sweep import sweep

    model, ts, _ = tiny
    tracer, traced, raw = transcoder_graph(tiny, tmp_path / "graphs")
    nodes = [Node.parse(n["node_id"]) for n in raw["nodes"]]
    node = next(n for n in nodes if n.kind is Kind.TRANSCODER and n.checkpoint == 0)
    layer, heads, last = 1, (0, 2), len(raw["metadata"]["prompt_tokens"]) - 1
    with live_server(create_app(tmp_path / "graphs", tracer)) as server:
        page.open_graph(server, "tc.json")
        page.click(page.find(f'#graph-svg g.node[data-id="{node.id}"] > :first-child'))
        page.click(page.wait("#steer-node"))
        assert (page.value("steer-kind"), page.value("steer-feature-layer"), page.value("steer-checkpoint")) == (
            "transcoder",
            "0",
            "",
        )
        assert (page.value("steer-feature"), page.value("steer-positions")) == (str(node.index), str(node.pos))
        page.type("steer-heads", " ".join(f"L{layer}H{h}" for h in heads))
        page.type("steer-scales", "0,0.5,3")
        page.type("steer-watch-attn", f"L{layer}H{heads[0]}:{last}->{node.pos}")
        page.type("steer-watch-tokens", "5, 9")
        page.click(page.find("#steer-run"))
        page.wait("#sweep-table tr.sweep-row")
        shown = [
            {
                c.get_attribute("data-field"): float(c.get_attribute("data-value"))
                for c in r.find_elements("css selector", "td[data-field]")
            }
            for r in page.find_all("#sweep-table tr.sweep-row")
        ]
        assert page.find_all("#sweep-attn polyline.series"), "the watched attention is plotted"

        old = {"tokens": raw["metadata"]["qktrace"]["tokens"], "heads": [[layer, h] for h in heads],
               "feature": node.index, "positions": [node.pos], "scales": "0,1"}  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as refused:
            server.post("/api/sweep", old)
        assert refused.value.code == 400 and "feature_layer" in refused.value.read().decode()
        assert page.console_errors() == []

    iv = SteerQK(layer, heads, "key", node.index, (node.pos,), scale=SCALE, kind=Kind.TRANSCODER, feature_layer=0)
    ref = sweep(model, {}, traced.trace.tokens, [iv], [0, 0.5, 3], watch_tokens=[5, 9],
                watch_attention=[(layer, heads[0], last, node.pos)], transcoders=ts)  # fmt: skip
    attn = f"attn:L{layer}.H{heads[0]}:{last}->{node.pos}"
    cols = ["p_top_1", *(c for c in ref.columns if c.startswith(("p:", "attn:")))]
    assert len(cols) == 4 and attn in cols
    assert [r["scale"] for r in shown] == [0, 0.5, 3]
    for row, (_, want) in zip(shown, ref.iterrows()):
        for c in cols:
            assert row[c] == pytest.approx(float(want[c]), rel=1e-5, abs=1e-7), c
    assert shown[0][attn] != pytest.approx(shown[-1][attn], abs=1e-6), "steering moves the watched attention"


def test_attention_features_are_labelled_by_default(tiny, page, live_server, tmp_path):
    """On a checkpointed graph the attention-SAE feature of largest |raw influence| carries its label (its short
    name a<layer>/f<index>) without a hover, as residual-SAE and transcoder features do; a head of an edge
    from a transcoder feature into an attention feature fills the steering panel with the transcoder's kind and
    layer, and its sweep runs; "steer this feature" on an attention feature, swept inside later heads, plots
    `sweep()`'s numbers."""
    from qktrace.server import create_app
    from qktrace.steering.interventions import SCALE, SteerQK
    from qktrace.steering.sweep import sweep
    from qktrace.testing import random_prompt

    model, ts, att = tiny
    tracer = qktrace.Tracer(model, transcoders=ts, attention_saes=att)
    traced = tracer.run(random_prompt(8, seed=2))
    data = tmp_path / "graphs"
    data.mkdir()
    traced.graph(progress=False, node_threshold=0.95).save(data / "s2.json")
    raw = json.loads((data / "s2.json").read_text())
    attn = [n for n in raw["nodes"] if Node.parse(n["node_id"]).kind is Kind.ATTN_FEATURE]
    top = max(attn, key=lambda n: abs(n["raw_influence"]))
    short = f"a{Node.parse(top['node_id']).checkpoint}/f{Node.parse(top['node_id']).index}"
    assert top["clerp"].startswith(short)
    link = next(
        x
        for x in raw["links"]
        if x["head_loadings"]
        and Node.parse(x["source"]).kind is Kind.TRANSCODER
        and Node.parse(x["target"]).kind is Kind.ATTN_FEATURE
    )
    source, h = Node.parse(link["source"]), link["head_loadings"][0]
    last = len(raw["metadata"]["prompt_tokens"]) - 1
    steered = min((Node.parse(n["node_id"]) for n in attn if Node.parse(n["node_id"]).checkpoint == 0),
                  key=lambda n: (n.pos == last, n.pos))  # fmt: skip
    with live_server(create_app(data, tracer)) as server:
        page.open_graph(server, "s2.json")
        label = page.wait(f'#graph-svg g.node-label[data-id="{top["node_id"]}"]', 10)
        assert "hover-only" not in label.get_attribute("class")
        node = Node.parse(top["node_id"])  # its name: the label without its QK suffix, kind and position
        own = re.sub(r" \[QK L\d+H\d+ @\d+\]$", "", top["clerp"])
        tok = raw["metadata"]["prompt_tokens"][node.pos]
        assert label.get_attribute("data-full") == component_label(node, tok, own)
        assert label.find_element("css selector", "text").text.startswith(short)

        edge = page.find(f'#graph-svg g.edge[data-source="{link["source"]}"][data-target="{link["target"]}"] line.hit')
        page.driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", edge)
        page.click(page.wait(f'#head-table button.head-btn[data-layer="{h["layer"]}"][data-head="{h["head"]}"]'))
        assert [page.value(f"steer-{f}") for f in ("kind", "feature-layer", "feature", "heads", "checkpoint")] == [
            "transcoder",
            str(source.checkpoint),
            str(source.index),
            f"L{h['layer']}H{h['head']}",
            "",
        ]
        page.type("steer-scales", "0,2")
        page.click(page.find("#steer-run"))
        page.wait("#steer-body #sweep-table tr.sweep-row, #steer-body p.error")
        assert not page.find_all("#steer-body p.error"), page.find("#steer-body").text

        # "steer this feature" on a layer-0 attention feature, then inside two heads of layer 1: sweep()'s numbers
        page.click(page.find(f'#graph-svg g.node[data-id="{steered.id}"] > :first-child'))
        page.click(page.wait("#steer-node"))
        assert [page.value(f"steer-{f}") for f in ("kind", "feature-layer", "checkpoint", "feature", "positions")] == [
            "attn",
            "0",
            "",
            str(steered.index),
            str(steered.pos),
        ]
        page.type("steer-heads", "L1H0 L1H3")
        page.type("steer-scales", "0,0.5,3")
        page.type("steer-watch-attn", f"L1H0:{last}->{steered.pos}")
        page.click(page.find("#steer-run"))
        page.until(lambda d: page.find_all(f'#sweep-table td[data-field="attn:L1.H0:{last}->{steered.pos}"]'))
        shown = [
            {
                c.get_attribute("data-field"): float(c.get_attribute("data-value"))
                for c in r.find_elements("css selector", "td[data-field]")
            }
            for r in page.find_all("#sweep-table tr.sweep-row")
        ]
        assert page.console_errors() == []
    iv = SteerQK(1, (0, 3), "key", steered.index, (steered.pos,), scale=SCALE, kind=Kind.ATTN_FEATURE, feature_layer=0)
    ref = sweep(model, {}, traced.trace.tokens, [iv], [0, 0.5, 3], watch_attention=[(1, 0, last, steered.pos)],
                transcoders=ts, attention_saes=att)  # fmt: skip
    cols = ["p_top_1", f"attn:L1.H0:{last}->{steered.pos}"]
    assert [r["scale"] for r in shown] == [0, 0.5, 3]
    for row, (_, want) in zip(shown, ref.iterrows()):
        for c in cols:
            assert row[c] == pytest.approx(float(want[c]), rel=1e-5, abs=1e-7), c
        assert page.console_errors() == []


def test_token_text_stays_readable_at_fit(demo, page, live_server):
    """The demo's largest graph at 1280x800 opens fitted at a scale where the grid's own 12-unit text would be
    under 9 px, yet the answer column is on screen and every token on screen is drawn at 11 px, cut to its
    column (no two overlap); zooming out keeps it so, and the full token is in the page."""
    from qktrace.server import create_app

    _, data, saes = demo
    name = "multiple_choice.graph.json"
    graph = json.loads((data / name).read_text())
    assert len(graph["nodes"]) > 300
    page.driver.set_window_size(1280, 800)
    with live_server(create_app(data, saes_dir=saes)) as server:
        page.open_graph(server, name)
        pane = page.rect(page.find("#graph-scroll"))
        scale = page.driver.execute_script("return document.getElementById('graph-svg').getScreenCTM().a")
        assert 12 * scale < 9, "the fitted graph is small enough that drawing-sized text would be unreadable"
        answer = max(
            Node.parse(n["node_id"]).pos for n in graph["nodes"] if Node.parse(n["node_id"]).kind is Kind.LOGIT
        )
        for when in ("fit", "zoomed out"):
            column = page.rect(page.find(f'#graph-svg text.token-label[data-pos="{answer}"]'))
            assert pane["left"] <= column["left"] and column["right"] <= pane["right"], when
            assert pane["top"] <= column["top"] and column["bottom"] <= pane["bottom"], when
            texts = [t for t in page.find_all("#graph-svg text.token-label") if t.text]
            on_screen = []
            for t in texts:
                r = page.rect(t)
                if r["left"] >= pane["left"] and r["right"] <= pane["right"]:
                    px = page.driver.execute_script(
                        "const t = arguments[0]; return parseFloat(t.getAttribute('font-size') || "
                        "getComputedStyle(t).fontSize) * t.getScreenCTM().a",
                        t,
                    )
                    assert px >= 9, (when, t.text, px)
                    on_screen.append(r)
            assert len(on_screen) >= 5, when
            on_screen.sort(key=lambda r: r["left"])
            assert all(a["right"] <= b["left"] + 0.5 for a, b in zip(on_screen, on_screen[1:])), when
            page.click(page.find("#zoom-out"))
        tokens = graph["metadata"]["prompt_tokens"]
        full = [t.get_attribute("data-full") for t in page.find_all("#graph-svg text.token-label")]
        assert full == tokens
        assert page.console_errors() == []


def first_cross_link(graph: dict, skip: tuple[int, int] | None = None) -> dict:
    """The strongest cross-position link with head loadings whose top head is not `skip`."""
    links = sorted(graph["links"], key=lambda x: -abs(x["weight"]))
    return next(
        x
        for x in links
        if x["head_loadings"]
        and Node.parse(x["source"]).pos != Node.parse(x["target"]).pos
        and (x["head_loadings"][0]["layer"], x["head_loadings"][0]["head"]) != skip
    )


def test_closing_compare_clears_a_sides_results(page, live_server, tmp_path):
    """A QK view on the page's graph, then compare: the QK and steering panels start empty there; a head of
    graph B explained and a sweep run on B; compare closed: the sweep is gone and the QK panel shows the
    page's own view again (its numbers, not B's)."""
    from selenium.webdriver.support.ui import Select

    from qktrace.server import create_app
    from qktrace.testing import make_server_setup

    s = make_server_setup(tmp_path / "setup")
    data = tmp_path / "graphs"
    data.mkdir()
    prompts = {"a.json": "Aunt Sally is the opposite of Uncle Bob . Aunt",
               "b.json": "Aunt Sally is the opposite of Uncle Sally . Aunt"}  # fmt: skip
    for name, prompt in prompts.items():
        s.tracer.run(prompt).graph(progress=False).save(data / name)
    a, b = (json.loads((data / n).read_text()) for n in prompts)

    def explain_head(svg: str, link: dict) -> tuple[str, float]:
        edge = page.find(f'{svg} g.edge[data-source="{link["source"]}"][data-target="{link["target"]}"] line.hit')
        page.driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", edge)
        h = link["head_loadings"][0]
        page.click(page.wait(f'#head-table button.head-btn[data-layer="{h["layer"]}"][data-head="{h["head"]}"]'))
        page.until(lambda d: page.find_all("#qk-title") and f"L{h['layer']}H{h['head']}" in page.find("#qk-title").text)
        return page.find("#qk-title").text, float(
            page.find("#qk-check td[data-field=score]").get_attribute("data-value")
        )

    link_a = first_cross_link(a)
    top_a = (link_a["head_loadings"][0]["layer"], link_a["head_loadings"][0]["head"])
    with live_server(create_app(data, s.tracer)) as server:
        page.open_graph(server, "a.json")
        view_a = explain_head("#graph-svg", link_a)

        page.driver.execute_script("location.hash = '#compare=a.json,b.json'")
        page.wait("#compare-table tr.compare-row")
        assert "hint" in page.find("#qk-body").get_attribute("class") and not page.find_all("#qk-title")
        view_b = explain_head("#compare-svg-b", first_cross_link(b, skip=top_a))
        assert view_b != view_a
        Select(page.find("#steer-mode")).select_by_value("value")  # set the feature's activation: any feature
        page.type("steer-scales", "0,1")
        page.click(page.find("#steer-run"))
        page.wait("#steer-body #sweep-table")

        page.click(page.find("#compare-close"))
        page.until(lambda d: page.find_all("#qk-title") and page.find("#qk-title").text == view_a[0])
        score = float(page.find("#qk-check td[data-field=score]").get_attribute("data-value"))
        assert score == view_a[1]
        assert "hint" in page.find("#steer-body").get_attribute("class")
        assert not page.find_all("#steer-body #sweep-table, #steer-body p.error")
        assert page.console_errors() == []


def test_steer_a_residual_feature_as_before(page, live_server, tmp_path):
    """On a residual-SAE graph 'steer this feature' fills kind "feature", the node's checkpoint and no feature
    layer; run without heads, it steers the residual there: the plotted numbers are `sweep()`'s."""
    from qktrace.server import create_app
    from qktrace.steering.interventions import SCALE, SteerFeature
    from qktrace.steering.sweep import sweep
    from qktrace.testing import GRAPH_NAME, make_server_setup

    s = make_server_setup(tmp_path / "setup")
    node = max(
        (Node.parse(n["node_id"]) for n in s.graph["nodes"] if Node.parse(n["node_id"]).kind is Kind.FEATURE),
        key=lambda n: (n.checkpoint, n.pos),
    )
    with live_server(create_app(s.data, s.tracer)) as server:
        page.open_graph(server, GRAPH_NAME)
        page.click(page.find(f'#graph-svg g.node[data-id="{node.id}"] > :first-child'))
        page.click(page.wait("#steer-node"))
        fields = ("kind", "checkpoint", "feature-layer", "feature", "positions", "heads")
        assert [page.value(f"steer-{f}") for f in fields] == [
            "feature",
            str(node.checkpoint),
            "",
            str(node.index),
            str(node.pos),
            "",
        ]
        page.type("steer-scales", "0,2")
        page.click(page.find("#steer-run"))
        page.wait("#sweep-table tr.sweep-row")
        shown = [float(c.get_attribute("data-value")) for c in page.find_all("#sweep-table td[data-field=p_top_1]")]
        assert page.console_errors() == []
    traced = s.tracer.run(s.tokens)
    iv = SteerFeature(node.checkpoint, node.index, (node.pos,), scale=SCALE)
    ref = sweep(traced.model, traced.saes, traced.trace.tokens, [iv], [0, 2])
    assert shown == pytest.approx(ref["p_top_1"].tolist(), rel=1e-5, abs=1e-7)
