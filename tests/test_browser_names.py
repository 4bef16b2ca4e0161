"""One name per component across the page, in headless Chromium with real clicks, on a tiny model's graphs: the
labels drawn on the graph, the node panel, the pins and supernodes panel and the compare view's terms name a
component as qktrace.nodes.component_label does (no Python-repr position anywhere); a graph opened without a
model shows its stored QK terms as a heatmap whose cells add up to the stored score ("top terms only" when the
file has none); and a QK answer that comes back after a newer request, or after the panel was reset, is dropped."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

pytest.importorskip("selenium")
pytest.importorskip("fastapi")

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

from qktrace.graph import load_graph  # noqa: E402
from qktrace.nodes import Kind, Node, component_label  # noqa: E402
from qktrace.server import create_app  # noqa: E402
from qktrace.testing import GRAPH_NAME, make_server_setup  # noqa: E402

pytestmark = pytest.mark.browser
REPR_POSITION = re.compile(r"@\d+ ?'")  # '@6 \' Sally\'', as Python's repr writes a token
PROMPTS = {
    "a.json": "Aunt Sally is the opposite of Uncle Bob . Aunt",
    "b.json": "Aunt Sally is the opposite of Uncle Sally . Aunt",
}
STORED, TOP_ONLY = "stored.json", "top-only.json"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny setup's graph with QK terms stored on its links (and a copy without their scores), and two
    graphs of aligned prompts to compare."""
    s = make_server_setup(tmp_path_factory.mktemp("names"))
    graph = load_graph(s.data / GRAPH_NAME)
    stored = dataclasses.replace(graph, qk_terms=s.tracer.run(s.tokens).link_qk_terms(graph)).to_json()
    (s.data / STORED).write_text(json.dumps(stored))
    for link in stored["links"]:
        for entry in link.get("qk_top_terms") or []:
            entry.pop("score", None)
    (s.data / TOP_ONLY).write_text(json.dumps(stored))
    for name, prompt in PROMPTS.items():
        s.tracer.run(prompt).graph(progress=False).save(s.data / name)
    return s


def expected_name(tracer, tokens: list[str], cid: str) -> str:
    node = Node.parse(cid)
    own = tracer.saes[node.checkpoint].label(node.index) if node.kind is Kind.FEATURE else None
    return component_label(node, tokens[node.pos], own)


def repr_positions(driver) -> list[str]:
    text = driver.execute_script(
        "return [document.body.innerText, document.body.textContent,"
        " ...[...document.querySelectorAll('[title], [aria-label]')]"
        ".map(e => (e.getAttribute('title') || '') + ' ' + (e.getAttribute('aria-label') || ''))].join('\\n')"
    )
    return REPR_POSITION.findall(text)


def node_mark(page, cid: str):
    return page.find(f'#graph-svg g.node[data-id="{cid}"] > :first-child')


def test_one_name_in_drawn_labels_panels_supernodes_and_compare(setup, page, live_server):
    tracer = setup.tracer
    raw = json.loads((setup.data / "a.json").read_text())
    tokens = raw["metadata"]["prompt_tokens"]
    with live_server(create_app(setup.data, tracer, saes_dir=setup.saes)) as server:
        page.open_graph(server, "a.json")
        drawn = page.find_all("#graph-svg .labels g.node-label[data-id]")
        features = [g for g in drawn if Node.parse(g.get_attribute("data-id")).kind is Kind.FEATURE]
        assert len(features) >= 3, "the top nodes by influence are labelled on the graph"
        names: dict[str, str] = {}
        for g in features[:3]:
            cid = g.get_attribute("data-id")
            full, text = g.get_attribute("data-full"), g.find_element(page.By.CSS_SELECTOR, "text").text
            assert full == expected_name(tracer, tokens, cid)
            assert g.find_element(page.By.CSS_SELECTOR, "title").get_attribute("textContent") == full
            # a drawn label may be cut to fit, but it keeps the position
            at = f" @{Node.parse(cid).pos} "
            assert at in text and text.split(at)[0].rstrip("…") in full.split(at)[0]
            names[cid] = full
        for cid, full in names.items():  # the node panel, after a real click on the node
            page.click(node_mark(page, cid))
            page.until(lambda d, c=cid: d.find_element(page.By.ID, "node-title").get_attribute("title") == c)
            assert page.find("#node-title").text == full
            assert page.find(f'#graph-svg g.node[data-id="{cid}"]').get_attribute("aria-label") == f"{full} ({cid})"

        # the pins and supernodes panel: two nodes shift-clicked, then grouped
        pins = list(names)[:2]
        for cid in pins:
            ActionChains(page.driver).key_down(Keys.SHIFT).click(node_mark(page, cid)).key_up(Keys.SHIFT).perform()
        page.wait("#pinned-table span.comp")
        page.until(lambda d: len(d.find_elements(page.By.CSS_SELECTOR, "#pinned-table span.comp")) == 2)
        for span in page.find_all("#pinned-table span.comp"):
            assert span.text == names[span.get_attribute("data-component")]
        page.type("group-name", "my group")
        page.click(page.find("#group-btn"))
        page.wait("#supernode-table span.comp")
        members = {s.get_attribute("data-component"): s.text for s in page.find_all("#supernode-table span.comp")}
        assert members == {cid: names[cid] for cid in pins}
        # collapsed, the group keeps its name on the graph
        page.click(page.find("#supernode-table button.group-toggle"))
        tag = page.wait("#graph-svg .labels g.group-label.collapsed")
        assert "my group (2)" in tag.text
        # a summed edge of the collapsed group: its ends and the edges it sums named the same way
        summed = page.find("#graph-svg g.edge.summed line.hit")
        page.driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", summed)
        page.wait("#summed-table span.comp")
        assert page.find("#edge-panel h3 b.group-name").text == "my group (2)"
        clerps = {n["node_id"]: n["clerp"] for n in raw["nodes"]}
        for span in page.find_all("#summed-table span.comp"):
            cid = span.get_attribute("data-component")  # a logit keeps its own label: 'Output " x" (p=…)'
            want = clerps[cid] if Node.parse(cid).kind is Kind.LOGIT else expected_name(tracer, tokens, cid)
            assert span.text == want
        assert not repr_positions(page.driver)

        # the compare view's terms name a component as the graph does
        page.driver.get(f"{server.url}/#compare=a.json,b.json")
        page.wait("#compare-table tr.compare-row")
        page.click(page.find("#compare-table tr.compare-row"))
        page.wait("#compare-terms tr.compare-term span.comp")
        spans = page.find_all("#compare-terms tr.compare-term span.comp")
        assert spans
        for s in spans:
            cid = s.get_attribute("data-component")
            assert s.text == expected_name(tracer, tokens, cid)
            assert names.get(cid, s.text) == s.text
        assert not repr_positions(page.driver)
        assert page.console_errors() == []


def stored_entry(setup, name: str):
    data = json.loads((setup.data / name).read_text())
    link = next(x for x in sorted(data["links"], key=lambda x: -abs(x["weight"])) if x.get("qk_top_terms"))
    return link, link["qk_top_terms"][0]


def open_stored(page, link, entry) -> None:
    """The edge clicked (a click event on its hit line: nodes and labels may lie over it), then its head."""
    hit = page.find(f'#graph-svg g.edge[data-source="{link["source"]}"][data-target="{link["target"]}"] line.hit')
    page.driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", hit)
    css = f'#head-table button.head-btn[data-layer="{entry["layer"]}"][data-head="{entry["head"]}"]'
    page.click(page.wait(css))
    page.until(lambda d: "stored in the graph" in d.find_element(page.By.ID, "qk-body").text)
    page.wait("#qk-terms-view")


def both_features(term: dict) -> bool:
    return all(Node.parse(term[side]).kind is Kind.FEATURE for side in ("query", "key"))


def cells(page) -> dict[tuple[str, str], float]:
    out = {}
    for c in page.find_all("#qk-heatmap rect.hm-cell"):
        out[c.get_attribute("data-query"), c.get_attribute("data-key")] = float(c.get_attribute("data-value"))
    return out


def test_stored_terms_heatmap_adds_up_to_the_stored_score(setup, page, live_server):
    link, entry = stored_entry(setup, STORED)
    terms, score = entry["terms"], entry["score"]
    with live_server(create_app(setup.data, saes_dir=setup.saes)) as server:  # no model: the stored terms
        page.open_graph(server, STORED)
        open_stored(page, link, entry)
        assert float(page.find("#qk-stored-score").get_attribute("data-value")) == score
        page.click(page.find("#qk-show-heatmap"))
        page.wait("#qk-heatmap rect.hm-cell")
        for only in (False, True):
            if only:
                page.click(page.find("#qk-features-only"))
                page.until(lambda d: page.find("#qk-heatmap").get_attribute("data-features-only") == "true")
            kept = [t for t in terms if not only or both_features(t)]
            want = {(t["query"], t["key"]): t["value"] for t in kept}
            want["other", "other"] = score - sum(t["value"] for t in kept)
            got = cells(page)
            assert got.keys() == want.keys()
            for pair, v in want.items():
                assert got[pair] == pytest.approx(v, rel=1e-6, abs=1e-6)
            assert sum(got.values()) == pytest.approx(score, rel=1e-5, abs=1e-5)
            queries = [t.get_attribute("data-component") for t in page.find_all("#qk-heatmap text.hm-query.comp")]
            assert queries == list(dict.fromkeys(t["query"] for t in kept))
        assert page.find("#qk-heatmap").get_attribute("data-top-only") is None

        # a file without the score: the top terms only, and no "other"
        link, entry = stored_entry(setup, TOP_ONLY)
        page.open_graph(server, TOP_ONLY)
        open_stored(page, link, entry)
        assert "top terms only" in page.find("#qk-top-only").text
        page.until(lambda d: page.find_all("#qk-heatmap"))  # the heatmap and features only are kept
        assert page.find("#qk-heatmap").get_attribute("data-top-only") == "true"
        page.click(page.find("#qk-features-only"))
        page.until(lambda d: page.find("#qk-heatmap").get_attribute("data-features-only") == "false")
        assert cells(page) == pytest.approx({(t["query"], t["key"]): t["value"] for t in entry["terms"]})
        assert page.console_errors() == []


DELAY_QK = """
const delays = arguments[0], real = window.realFetch || (window.realFetch = window.fetch);
window.qkAnswered = 0;
window.fetch = async (url, opts) => {
  const res = await real(url, opts);
  if (String(url).includes("/api/qk")) {
    await new Promise((r) => setTimeout(r, delays.shift() || 0));
    window.qkAnswered += 1;
  }
  return res;
};
"""


def ask_qk(page, layer: int, head: int, query: int, key: int) -> None:
    for field, v in (("qk-layer", layer), ("qk-head", head), ("qk-query", query), ("qk-key", key)):
        page.type(field, str(v))
    page.click(page.find("#qk-run"))


def test_the_latest_qk_request_wins(setup, page, live_server):
    q = len(setup.tokens) - 1
    with live_server(create_app(setup.data, setup.tracer, saes_dir=setup.saes)) as server:
        page.open_graph(server, "a.json")
        # two requests, the first answered last: only the second is shown
        page.driver.execute_script(DELAY_QK, [2500, 0])
        ask_qk(page, 0, 1, q, 0)
        ask_qk(page, 1, 2, q, 1)
        page.until(lambda d: d.execute_script("return window.qkAnswered") == 2, 30)
        assert page.find("#qk-title").text.startswith(f"L1H2: query {q} ")
        assert len(page.find_all("#qk-title")) == 1
        # a request still running when the panel is reset (compare opened, then closed): its answer is dropped
        page.driver.execute_script(DELAY_QK, [2500])
        ask_qk(page, 0, 3, q, 0)
        page.click(page.find("#compare-open"))
        page.until(lambda d: d.find_element(page.By.ID, "compare-pane").is_displayed(), 10)
        page.until(lambda d: d.execute_script("return window.qkAnswered") == 1, 30)
        assert not page.find_all("#qk-title") or not page.find("#qk-title").text.startswith("L0H3")
        assert page.console_errors() == []
