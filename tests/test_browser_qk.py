"""The QK panel and the feature detail in headless Chromium, with real clicks, on the demo's induction graph:
the query x key heatmap (its cells add up to the score shown, "features only" too), a rival key chosen in the
contrast (its terms add up to the library's score difference), the feature detail's histogram (the
dashboards file's counts) and bottom outputs, one label per component in the labels drawn on the graph, the
node panel, the QK table and the mechanism view (qktrace.nodes.component_label's), and no Python-repr position
anywhere on the page."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("selenium")
pytest.importorskip("fastapi")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from qktrace.nodes import Kind, Node, component_label, visible  # noqa: E402
from qktrace.server import create_app  # noqa: E402

pytestmark = pytest.mark.browser
GRAPH, MECH = "induction.graph.json", "induction.mechanism.json"
REPR_POSITION = re.compile(r"@\d+ ?'")  # '@6 \' Sally\'', as Python's repr writes a token


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's induction graph, and its mechanism found on a small budget."""
    from qktrace.analyses.explain import explain
    from qktrace.config import DEMO_MODEL, DEMO_SAES
    from qktrace.demo.run import CASES
    from qktrace.options import ExplainSettings
    from qktrace.tracer import Tracer

    tracer = Tracer.load(DEMO_MODEL, DEMO_SAES)
    data = tmp_path_factory.mktemp("demo-qk")
    case = next(c for c in CASES if c.slug == "induction")
    graph = tracer.run(case.prompt).graph(targets=[case.answer], progress=False)
    graph.save(data / GRAPH)
    small = ExplainSettings(sites=1, ablate=2, candidates=2, top_k=(2,), scales=(1.0, 0.0), null_draws=0)
    explain(tracer, case.prompt, case.answer, case.rival, settings=small, graph=graph).save_json(data / MECH)
    return tracer, data, DEMO_SAES


def value(driver, css: str) -> float:
    return float(driver.find_element(By.CSS_SELECTOR, css).get_attribute("data-value"))


def labels(driver, where: str) -> dict[str, str]:
    """component id -> the text the page names it with, for every component span under `where`."""
    spans = driver.find_elements(By.CSS_SELECTOR, f"{where} span.comp[data-component]")
    return {s.get_attribute("data-component"): s.text for s in spans}


def expected_label(tracer, tokens: list[str], cid: str) -> str:
    node = Node.parse(cid)
    own = tracer.saes[node.checkpoint].label(node.index) if node.kind is Kind.FEATURE else None
    return component_label(node, tokens[node.pos], own)


def repr_positions(driver) -> list[str]:
    """Python-repr positions in the page's text, SVG titles included, and in its title and aria-label attributes."""
    text = driver.execute_script(
        "return [document.body.innerText, document.body.textContent,"
        " ...[...document.querySelectorAll('[title], [aria-label]')]"
        ".map(e => (e.getAttribute('title') || '') + ' ' + (e.getAttribute('aria-label') || ''))].join('\\n')"
    )
    return REPR_POSITION.findall(text)


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    import os
    from pathlib import Path

    out = os.environ.get("QKTRACE_SCREENSHOTS")
    path = Path(out) if out else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_qk_heatmap_rival_feature_detail_and_labels(demo, page, live_server, shots):
    tracer, data, saes = demo
    driver = page.driver
    driver.set_window_size(1280, 800)  # the README's screenshots' size
    graph = json.loads((data / GRAPH).read_text())
    mech = json.loads((data / MECH).read_text())
    tokens = graph["metadata"]["prompt_tokens"]
    node_ids = {n["node_id"] for n in graph["nodes"]}
    site = mech["sites"][0]
    layer, head, q, key = site["layer"], site["heads"][0], len(tokens) - 1, site["key_pos"]
    with live_server(create_app(data, tracer, saes_dir=saes)) as server:
        driver.get(server.url + "/")
        options = "return [...document.querySelectorAll('#graph-select option')].map(o => o.value)"
        WebDriverWait(driver, 30).until(lambda d: GRAPH in d.execute_script(options))
        Select(driver.find_element(By.ID, "graph-select")).select_by_value(GRAPH)
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "status").text == f"opened {GRAPH}")

        # the QK form, filled and run by hand
        for field, v in (("qk-layer", layer), ("qk-head", head), ("qk-query", q), ("qk-key", key)):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(str(v))
        page.click(driver.find_element(By.ID, "qk-run"))
        page.wait("#qk-terms tr.qk-term")
        req = {"tokens": graph["metadata"]["qktrace"]["tokens"], "layer": layer, "head": head, "query_pos": q,
               "key_pos": key, "top": 12}  # fmt: skip
        api = server.post("/api/qk", req)
        score = value(driver, "#qk-check td[data-field=score]")
        assert score == api["qk"]["score"][0]

        # the heatmap, beside the table: the expected cells, adding up to the score shown
        page.click(driver.find_element(By.ID, "qk-show-heatmap"))
        for only, hm in ((False, api["heatmap"]), (True, api["heatmap_features"])):
            if only:
                page.click(driver.find_element(By.ID, "qk-features-only"))
            flag = str(only).lower()
            WebDriverWait(driver, 10).until(
                lambda d, f=flag: d.find_element(By.ID, "qk-heatmap").get_attribute("data-features-only") == f
            )
            cells = driver.find_elements(By.CSS_SELECTOR, "#qk-heatmap rect.hm-cell")
            assert len(cells) == len(hm["query"]) * len(hm["key"]) > 1
            total = sum(float(c.get_attribute("data-value")) for c in cells)
            assert total == pytest.approx(score, rel=1e-4, abs=1e-4)
            rows = [t.text for t in driver.find_elements(By.CSS_SELECTOR, "#qk-heatmap text.hm-query")]
            assert len(rows) == len(hm["query"])
            if only:
                comps = driver.find_elements(By.CSS_SELECTOR, "#qk-heatmap text.comp[data-component]")
                assert comps and all(Node.parse(c.get_attribute("data-component")).kind is Kind.FEATURE for c in comps)
        driver.execute_script("document.getElementById('qk-heatmap').scrollIntoView({block: 'center'})")
        driver.save_screenshot(str(shots / "qk-heatmap.png"))
        page.click(driver.find_element(By.ID, "qk-show-table"))
        page.wait("#qk-terms tr.qk-term")

        # a rival key chosen: the contrast's terms (and the rest) add up to the library's score difference
        rival_before = int(Select(driver.find_element(By.ID, "qk-rival")).first_selected_option.get_attribute("value"))
        row = tracer.run(req["tokens"]).qk(layer, head, q)
        rival = next(k for k in reversed(row.key_positions) if k not in (key, rival_before))
        Select(driver.find_element(By.ID, "qk-rival")).select_by_value(str(rival))
        WebDriverWait(driver, 60).until(
            lambda d: (
                d.find_element(By.ID, "qk-rival").get_attribute("value") == str(rival)
                and d.find_elements(By.CSS_SELECTOR, "#qk-contrast tr.contrast-rest")
            )
        )
        want = float(row.sum_of_terms[row.key_positions.index(key)] - row.sum_of_terms[row.key_positions.index(rival)])
        assert value(driver, "#qk-score-diff") == pytest.approx(want, rel=1e-5, abs=1e-6)
        diffs = driver.find_elements(By.CSS_SELECTOR, "#qk-contrast td[data-field=diff]")
        assert sum(float(c.get_attribute("data-value")) for c in diffs) == pytest.approx(want, rel=1e-4, abs=1e-5)
        # the chosen rival is in the URL: a reload reopens the same contrast
        hash_ = driver.execute_script("return location.hash")
        assert (
            f"qk=L{layer}H{head}%3A{q}%3A{key}%3A{rival}" in hash_ or f"qk=L{layer}H{head}:{q}:{key}:{rival}" in hash_
        )
        driver.get("about:blank")
        driver.get(f"{server.url}/{hash_}")
        WebDriverWait(driver, 60).until(
            lambda d: (
                d.find_elements(By.ID, "qk-rival")
                and d.find_element(By.ID, "qk-rival").get_attribute("value") == str(rival)
            )
        )
        assert value(driver, "#qk-score-diff") == pytest.approx(want, rel=1e-5, abs=1e-6)

        # one label per component: the QK table's are the library's
        qk_labels = labels(driver, "#qk-terms")
        for cid, text in qk_labels.items():
            assert text == expected_label(tracer, tokens, cid)

        # the feature detail: histogram counts and bottom outputs from the dashboards file
        fid = next(c for c in qk_labels if Node.parse(c).kind is Kind.FEATURE)
        page.click(driver.find_element(By.CSS_SELECTOR, f'#qk-terms span.comp[data-component="{fid}"]'))
        page.wait("#feature-hist rect.hist-bar")
        node = Node.parse(fid)
        path = next(saes.glob(f"blocks.{node.checkpoint}.hook_resid_pre/dashboards.json"))
        dash = json.loads(path.read_text())["features"][str(node.index)]
        bars = driver.find_elements(By.CSS_SELECTOR, "#feature-hist rect.hist-bar")
        assert [int(b.get_attribute("data-count")) for b in bars] == dash["hist"]["counts"]
        bottom = driver.find_elements(By.CSS_SELECTOR, "#feature-bottom-out span.t")
        assert [b.text for b in bottom] == [visible(t) for t in dash["bottom_out"]]
        driver.execute_script("document.getElementById('feature-panel').scrollIntoView()")
        driver.save_screenshot(str(shots / "feature-detail.png"))

        # the node panel names a graph node as the QK table does, and so does its label drawn on the graph
        title = lambda d: d.find_element(By.ID, "node-title").get_attribute("title")  # noqa: E731
        drawn = lambda c: driver.find_element(By.CSS_SELECTOR, f'#graph-svg .labels g.node-label[data-id="{c}"]')  # noqa: E731
        shared = [c for c in qk_labels if c in node_ids]
        assert shared, "no QK component of the mechanism's head is a node of the graph"
        for cid in shared[:3]:
            page.click(driver.find_element(By.CSS_SELECTOR, f'#graph-svg g.node[data-id="{cid}"] .mark'))
            WebDriverWait(driver, 10).until(lambda d, c=cid: title(d) == c)
            assert driver.find_element(By.ID, "node-title").text == qk_labels[cid]
            WebDriverWait(driver, 10).until(lambda d, c=cid: drawn(c).get_attribute("data-full") == qk_labels[c])
        # every feature label drawn on the graph (the top nodes by influence) is the library's, not the file's clerp
        tags = driver.find_elements(By.CSS_SELECTOR, "#graph-svg .labels g.node-label[data-id]")
        features = [
            g.get_attribute("data-id") for g in tags if Node.parse(g.get_attribute("data-id")).kind is Kind.FEATURE
        ]
        assert len(features) >= 5
        for cid in features:
            full = drawn(cid).get_attribute("data-full")
            assert full == expected_label(tracer, tokens, cid) and "[QK " not in full
            assert f" @{Node.parse(cid).pos} " in drawn(cid).find_element(By.CSS_SELECTOR, "text").text
        assert not repr_positions(driver)

        # the mechanism view names its features the same way
        Select(driver.find_element(By.ID, "graph-select")).select_by_value(f"mechanism:{MECH}")
        page.wait("#mech-parts span.comp")
        mech_labels = labels(driver, "#mech-parts")
        assert mech_labels
        for cid, text in mech_labels.items():
            assert text == expected_label(tracer, tokens, cid)
            assert qk_labels.get(cid, text) == text
        assert not repr_positions(driver)
        for panel in ("qk-body", "feature-body", "mech-body"):
            assert "\\n" not in driver.find_element(By.ID, panel).text
