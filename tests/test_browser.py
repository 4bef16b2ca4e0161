"""The page end to end in headless Chromium (Debian's /usr/bin/chromium driven through /usr/bin/chromedriver,
nothing downloaded): open a graph, click an edge, read its head loadings, explain a head, compare the QK
panel's numbers with the API's, run a sweep, pin and group nodes, export a PNG; and the same without a model,
where the page shows the graph's stored QK terms; the page opening the first graph by itself, labels drawn
for hovered and pinned nodes, weights normalised per target, graphs named in the URL, and its ES modules
served as JavaScript; on the demo's graphs, the 300-node graph fitted at 1280x800 with every logit and the
answer column on screen, a mechanism opened, replayed and explained anew, and every view (edge, head, QK,
pins, prune, subgraph) reopened from a shared URL. Screenshots go to $QKTRACE_SCREENSHOTS or a tmp dir."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
    pytest.skip(
        "headless browser tests need Debian's chromium and chromium-driver: run scripts/ensure-chromium.sh as root",
        allow_module_level=True,
    )
pytest.importorskip("selenium")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import ElementClickInterceptedException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

import qktrace  # noqa: E402
from qktrace.errors import InputError  # noqa: E402
from qktrace.graph import load_graph  # noqa: E402
from qktrace.nodes import Kind, Node, component_label, visible  # noqa: E402
from qktrace.nodes import feature as feature_node  # noqa: E402
from qktrace.options import SweepOptions  # noqa: E402
from qktrace.server import create_app  # noqa: E402
from qktrace.testing import GRAPH_NAME, make_server_setup  # noqa: E402

pytestmark = pytest.mark.browser
STORED = "stored.json"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    s = make_server_setup(tmp_path_factory.mktemp("browser"))
    traced = s.tracer.run(s.tokens)
    graph = load_graph(s.data / GRAPH_NAME)
    with_terms = dataclasses.replace(graph, qk_terms=traced.link_qk_terms(graph))
    (s.data / STORED).write_text(json.dumps(with_terms.to_json()))
    return s


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    out = os.environ.get("QKTRACE_SCREENSHOTS")
    path = Path(out) if out else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def driver(tmp_path):
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look anything up
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1680,1050",
    ):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    opts.add_experimental_option("prefs", {"download.default_directory": str(tmp_path / "downloads")})
    d = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    d.set_script_timeout(30)
    yield d
    d.quit()
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def wait(driver, css: str, timeout: float = 60):
    return WebDriverWait(driver, timeout).until(EC.presence_of_element_located((By.CSS_SELECTOR, css)))


def click(driver, element) -> None:
    """A real click; SVG lines under other shapes fall back to a dispatched click on the element itself."""
    driver.execute_script("arguments[0].scrollIntoView({block: 'center', inline: 'center'})", element)
    try:
        element.click()
    except ElementClickInterceptedException:
        driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", element)


def numbers(cell) -> tuple[float, float]:
    """(shown text as a number, exact data-value) of a number cell."""
    return float(cell.text.replace("−", "-")), float(cell.get_attribute("data-value"))


def opened(driver, name: str, timeout: float = 30) -> None:
    """Wait until the page says it opened graph `name` and has drawn its nodes."""
    WebDriverWait(driver, timeout).until(lambda d: d.find_element(By.ID, "status").text == f"opened {name}")
    wait(driver, "#graph-svg g.node")


def open_graph(driver, server, name: str) -> None:
    driver.get(server.url + "/")
    WebDriverWait(driver, 30).until(
        lambda d: (
            name in d.execute_script("return [...document.querySelectorAll('#graph-select option')].map(o => o.value)")
        )
    )
    Select(driver.find_element(By.ID, "graph-select")).select_by_value(name)
    opened(driver, name)


def feature_component(driver, where: str):
    """The first component span under `where` that names an SAE feature."""
    spans = driver.find_elements(By.CSS_SELECTOR, f"{where} span.comp[data-component]")
    return next(s for s in spans if Node.parse(s.get_attribute("data-component")).kind is Kind.FEATURE)


def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def visible_cross_link(graph: dict) -> tuple[dict, int, int]:
    """The strongest cross-position link with head loadings, from a feature if any, that is among its
    target's 12 strongest inputs (the node panel lists those)."""
    is_feature = lambda node_id: Node.parse(node_id).kind is Kind.FEATURE  # noqa: E731
    links = sorted(graph["links"], key=lambda x: (not is_feature(x["source"]), -abs(x["weight"])))
    for link in links:
        ins = sorted((x for x in graph["links"] if x["target"] == link["target"]), key=lambda x: -abs(x["weight"]))
        s, t = (Node.parse(link[key]).pos for key in ("source", "target"))
        if s != t and link["head_loadings"] and link in ins[:12]:
            return link, t, s
    raise AssertionError("no cross-position link to click in the tiny graph")


def test_explain_an_edge_end_to_end(setup, shots, driver, live_server):
    graph = setup.graph
    link, q, k = visible_cross_link(graph)
    with live_server(create_app(setup.data, setup.tracer)) as server:
        open_graph(driver, server, GRAPH_NAME)
        n_nodes = len(driver.find_elements(By.CSS_SELECTOR, "#graph-svg g.node"))
        assert n_nodes == len(graph["nodes"])
        assert len(driver.find_elements(By.CSS_SELECTOR, "#graph-svg g.edge")) == len(graph["links"])
        tokens = [t.text for t in driver.find_elements(By.CSS_SELECTOR, "#graph-svg text.token-label")]
        assert tokens == graph["metadata"]["prompt_tokens"]
        driver.save_screenshot(str(shots / "01-graph.png"))

        # the strongest cross-position edge, reached by a real click on its target node, then on the row of
        # that input in the node panel (edges cross one another, so a click on a line can land on another)
        click(driver, driver.find_element(By.CSS_SELECTOR, f'#graph-svg g.node[data-id="{link["target"]}"]'))
        wait(driver, "#node-panel table.links")
        index = graph["links"].index(link)
        click(driver, driver.find_element(By.CSS_SELECTOR, f'#node-panel tr[data-link="{index}"]'))
        wait(driver, "#head-table tr.head-row")
        assert float(driver.find_element(By.ID, "edge-weight").get_attribute("data-value")) == pytest.approx(
            link["weight"]
        )
        rows = driver.find_elements(By.CSS_SELECTOR, "#head-table tr.head-row")
        assert len(rows) == len(link["head_loadings"])
        for row, h in zip(rows, link["head_loadings"]):
            assert (int(row.get_attribute("data-layer")), int(row.get_attribute("data-head"))) == (
                h["layer"],
                h["head"],
            )
            shown, exact = numbers(row.find_element(By.CSS_SELECTOR, 'td[data-field="direct"]'))
            assert exact == pytest.approx(h["direct"]) and shown == pytest.approx(h["direct"], rel=1e-3)
            assert numbers(row.find_element(By.CSS_SELECTOR, 'td[data-field="via_mlp"]'))[1] == pytest.approx(
                h["via_mlp"]
            )
        assert len(driver.find_elements(By.CSS_SELECTOR, "#head-chart g.head-bar")) == len(rows)

        # click the top head -> the QK panel, whose numbers must equal the API's
        top = link["head_loadings"][0]
        click(driver, rows[0].find_element(By.CSS_SELECTOR, "button.head-btn"))
        wait(driver, "#qk-check td[data-field=score]")
        api = server.post(
            "/api/qk",
            {
                "tokens": setup.tokens,
                "layer": top["layer"],
                "head": top["head"],
                "query_pos": q,
                "key_pos": k,
                "top": 12,
            },
        )
        qk = api["qk"]
        for field in ("score", "sum_of_terms", "capped_sum", "pattern"):
            shown, exact = numbers(driver.find_element(By.CSS_SELECTOR, f"#qk-check td[data-field={field}]"))
            assert exact == qk[field][0]
            assert shown == pytest.approx(qk[field][0], rel=1e-4, abs=1e-9)
        title = driver.find_element(By.ID, "qk-title").text
        assert f"L{top['layer']}H{top['head']}" in title and f"query {q}" in title and f"key {k}" in title
        terms = driver.find_elements(By.CSS_SELECTOR, "#qk-terms tr.qk-term")
        assert len(terms) == len(qk["terms"])
        for tr, t in zip(terms, qk["terms"]):
            cells = tr.find_elements(By.CSS_SELECTOR, "td")
            assert cells[0].text == t["query_label"] and cells[1].text == t["key_label"]
            shown, exact = numbers(tr.find_element(By.CSS_SELECTOR, "td[data-field=value]"))
            assert exact == t["value"] and shown == pytest.approx(t["value"], rel=1e-3)
        bars = driver.find_elements(By.CSS_SELECTOR, "#attn-chart g.attn-bar")
        assert [int(b.get_attribute("data-key")) for b in bars] == api["row"]["key_positions"]
        assert [float(b.get_attribute("data-value")) for b in bars] == api["row"]["pattern"]
        inhib = driver.find_elements(By.CSS_SELECTOR, "#qk-inhibitory tr.qk-term td[data-field=prob_effect]")
        assert [numbers(c)[1] for c in inhib] == [t["prob_effect"] for t in api["inhibitory"]]
        if api["contrast"]:
            diff = driver.find_element(By.ID, "qk-score-diff")
            assert float(diff.get_attribute("data-value")) == api["contrast"]["score_diff"]
        driver.execute_script("document.getElementById('qk-panel').scrollIntoView()")
        driver.save_screenshot(str(shots / "02-qk.png"))

        # hover a feature in the QK panel -> its label (and dashboard when it has one)
        comp = feature_component(driver, "#qk-terms")
        ActionChains(driver).move_to_element(comp).perform()
        WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "tooltip").is_displayed())

        # the steering panel was prefilled from the edge: run a 3-point sweep
        scales = driver.find_element(By.ID, "steer-scales")
        assert scales.get_attribute("value") == SweepOptions().scales  # the default the CLI and the API use
        scales.clear()
        scales.send_keys("0,1,2")
        assert driver.find_element(By.ID, "steer-heads").get_attribute("value") == f"L{top['layer']}H{top['head']}"
        click(driver, driver.find_element(By.ID, "steer-run"))
        wait(driver, "#sweep-table tr.sweep-row")
        sweep_rows = driver.find_elements(By.CSS_SELECTOR, "#sweep-table tr.sweep-row")
        assert [numbers(r.find_element(By.CSS_SELECTOR, "td[data-field=scale]"))[1] for r in sweep_rows] == [0, 1, 2]
        assert driver.find_elements(By.CSS_SELECTOR, "#sweep-probs polyline.series")
        assert driver.find_elements(By.CSS_SELECTOR, "#sweep-attn polyline.series")
        driver.execute_script("document.getElementById('steer-panel').scrollIntoView()")
        driver.save_screenshot(str(shots / "03-sweep.png"))

        # pin two nodes (shift-click), group them, see the supernode drawn
        for node_id in (link["source"], link["target"]):
            node = driver.find_element(By.CSS_SELECTOR, f'#graph-svg g.node[data-id="{node_id}"] > :first-child')
            driver.execute_script("arguments[0].scrollIntoView({block: 'center', inline: 'center'})", node)
            ActionChains(driver).key_down(Keys.SHIFT).click(node).key_up(Keys.SHIFT).perform()
        wait(driver, "#pinned-table")
        driver.find_element(By.ID, "group-name").send_keys("edge ends")
        click(driver, driver.find_element(By.ID, "group-btn"))
        wait(driver, '#graph-svg g.supernode[data-name="edge ends"]')

        # click a node: its inputs and outputs, labelled
        click(
            driver,
            driver.find_element(By.CSS_SELECTOR, f'#graph-svg g.node[data-id="{link["target"]}"] > :first-child'),
        )
        wait(driver, "#node-panel table.links tr.clickable")
        group = driver.find_element(By.CSS_SELECTOR, '#graph-svg g.supernode[data-name="edge ends"]')
        assert set(group.get_attribute("data-ids").split(",")) == {link["source"], link["target"]}
        driver.save_screenshot(str(shots / "04-node-pinned.png"))

        # PNG export of the view
        click(driver, driver.find_element(By.ID, "export-png"))
        WebDriverWait(driver, 20).until(lambda d: ".png" in d.find_element(By.ID, "status").text)
        assert int(driver.find_element(By.ID, "export-png").get_attribute("data-last-length")) > 1000
        click(driver, driver.find_element(By.ID, "export-json"))
        WebDriverWait(driver, 10).until(lambda d: f"saved {GRAPH_NAME}" in d.find_element(By.ID, "status").text)

        # build a new graph from a prompt: the job runs, the page polls, then opens it
        driver.find_element(By.ID, "prompt-input").send_keys("Aunt Sally is the opposite of Uncle")
        click(driver, driver.find_element(By.ID, "build-btn"))
        WebDriverWait(driver, 120).until(lambda d: "opened Aunt-Sally" in d.find_element(By.ID, "status").text)
        labels = [t.text for t in driver.find_elements(By.CSS_SELECTOR, "#graph-svg text.token-label")]
        assert labels[1:] == ["Aunt", "Sally", "is", "the", "opposite", "of", "Uncle"]
        assert console_errors(driver) == []


def test_view_only_shows_stored_terms(setup, shots, driver, live_server):
    data = json.loads((setup.data / STORED).read_text())
    link = next(x for x in sorted(data["links"], key=lambda x: -abs(x["weight"])) if x.get("qk_top_terms"))
    with live_server(create_app(setup.data, saes_dir=setup.saes)) as server:
        open_graph(driver, server, STORED)
        assert "no model" in driver.find_element(By.ID, "model-info").text
        assert not driver.find_element(By.ID, "build-btn").is_enabled()
        edge = driver.find_element(
            By.CSS_SELECTOR,
            f'#graph-svg g.edge[data-source="{link["source"]}"][data-target="{link["target"]}"] line.hit',
        )
        driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", edge)
        entry = link["qk_top_terms"][0]
        button = wait(
            driver, f'#head-table button.head-btn[data-layer="{entry["layer"]}"][data-head="{entry["head"]}"]'
        )
        click(driver, button)
        wait(driver, "#qk-terms tr.qk-term")
        values = [numbers(c)[1] for c in driver.find_elements(By.CSS_SELECTOR, "#qk-terms td[data-field=value]")]
        assert values == [t["value"] for t in entry["terms"]]
        assert "stored in the graph" in driver.find_element(By.ID, "qk-title").text
        driver.save_screenshot(str(shots / "05-view-only.png"))
        assert console_errors(driver) == []


FIXTURES = Path(__file__).parent / "fixtures"


def page_labels(raw: dict) -> dict[str, str]:
    """Every component's label as the page writes it (qktrace.nodes.component_label): a feature's clerp (less
    its QK suffix) and kind, others by kind, then the position; logits and other tools' ids keep their clerp."""
    tokens = raw["metadata"]["prompt_tokens"]
    clerps = {n["node_id"]: n["clerp"] for n in raw["nodes"]}
    clerps |= {k: v["clerp"] for k, v in raw.get("qk_only_nodes", {}).items()}
    out = {}
    for cid, clerp in clerps.items():
        own = re.sub(r" \[QK L\d+H\d+ @\d+\]$", "", clerp)
        try:
            node = Node.parse(cid)
        except InputError:  # another tool's id: its own label
            out[cid] = own or cid
            continue
        out[cid] = own if node.kind is Kind.LOGIT else component_label(node, tokens[node.pos], own)
    return out


def test_other_tools_graphs_and_qk_tracing(setup, shots, driver, tmp_path, live_server):
    """circuit-tracer's and Neuronpedia's own graph files open beside qktrace's: drawn node for node, with
    the notice that they have no head loadings (on the graph and on a clicked edge); a node's QK tracing
    (qktrace's or Neuronpedia's fields) lists its pairs with the labels of the nodes or QK-only nodes named."""
    data = tmp_path / "graphs"
    data.mkdir()
    for name in ("circuit_tracer_0.5_graph.json", "neuronpedia_graph.json"):
        (data / name).write_text((FIXTURES / name).read_text())
    (data / GRAPH_NAME).write_text((setup.data / GRAPH_NAME).read_text())
    with live_server(create_app(data, saes_dir=setup.saes)) as server:
        for name, maker in (("circuit_tracer_0.5_graph.json", "another tool"),
                            ("neuronpedia_graph.json", "llamascopium (CRM) by OpenMOSS")):  # fmt: skip
            raw = json.loads((data / name).read_text())
            open_graph(driver, server, name)
            option = driver.find_element(By.CSS_SELECTOR, f'#graph-select option[value="{name}"]').text
            assert ("(circuit-tracer)" if "circuit" in name else "(neuronpedia)") in option
            assert f"made by {maker}: no head loadings" in driver.find_element(By.ID, "graph-info").text
            drawn = {g.get_attribute("data-id") for g in driver.find_elements(By.CSS_SELECTOR, "#graph-svg g.node")}
            assert drawn == {n["node_id"] for n in raw["nodes"]}
            assert len(driver.find_elements(By.CSS_SELECTOR, "#graph-svg g.edge")) == len(raw["links"])
            link = max(raw["links"], key=lambda x: abs(x["weight"]))
            edge = driver.find_element(
                By.CSS_SELECTOR,
                f'#graph-svg g.edge[data-source="{link["source"]}"][data-target="{link["target"]}"] line.hit',
            )
            driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", edge)
            WebDriverWait(driver, 10).until(
                lambda d, m=maker: f"made by {m}: it has no head loadings" in d.find_element(By.ID, "edge-panel").text
            )
            driver.save_screenshot(str(shots / f"10-{name}.png"))
        for name in ("neuronpedia_graph.json", GRAPH_NAME):
            raw = json.loads((data / name).read_text())
            labels = page_labels(raw)
            traced = next(n for n in raw["nodes"] if "qk_tracing_results" in n)
            open_graph(driver, server, name)
            node = driver.find_element(
                By.CSS_SELECTOR, f'#graph-svg g.node[data-id="{traced["node_id"]}"] > :first-child'
            )
            click(driver, node)
            wait(driver, "#qk-tracing tr.qk-pair")
            rows = driver.find_elements(By.CSS_SELECTOR, "#qk-tracing tr.qk-pair")
            pairs = traced["qk_tracing_results"]["pair_wise_contributors"]
            assert len(rows) == len(pairs)
            for row, (q, k, v) in zip(rows, pairs):
                cells = row.find_elements(By.CSS_SELECTOR, "td")
                assert (text_of(cells[0]), text_of(cells[1])) == (labels[q], labels[k])
                assert numbers(cells[2])[1] == v
            driver.save_screenshot(str(shots / f"11-qk-tracing-{name}.png"))
        assert console_errors(driver) == []


def test_demo_graph_in_the_browser(tmp_path, shots, driver, live_server):
    """The embedded demo: its induction graph, the strongest cross-position edge, its top head's QK panel
    (numbers equal to the API's), a feature's real dashboard on hover, and a sweep."""
    from qktrace.config import DEMO_MODEL, DEMO_SAES
    from qktrace.demo.run import CASES
    from qktrace.tracer import Tracer

    tracer = Tracer.load(DEMO_MODEL, DEMO_SAES)
    traced = tracer.run(CASES[0].prompt)
    data = tmp_path / "graphs"
    data.mkdir()
    traced.graph(targets=[CASES[0].answer], progress=False).save(data / "induction.graph.json")
    graph = json.loads((data / "induction.graph.json").read_text())
    link, q, k = visible_cross_link(graph)
    top = link["head_loadings"][0]
    with live_server(create_app(data, tracer, saes_dir=DEMO_SAES)) as server:
        open_graph(driver, server, "induction.graph.json")
        tokens = [t.text for t in driver.find_elements(By.CSS_SELECTOR, "#graph-svg text.token-label")]
        assert tokens[-2:] == [",", "Aunt"]
        click(driver, driver.find_element(By.CSS_SELECTOR, f'#graph-svg g.node[data-id="{link["target"]}"]'))
        wait(driver, "#node-panel table.links")
        click(driver, driver.find_element(By.CSS_SELECTOR, f'#node-panel tr[data-link="{graph["links"].index(link)}"]'))
        wait(driver, "#head-table tr.head-row")
        rows = driver.find_elements(By.CSS_SELECTOR, "#head-table tr.head-row")
        click(driver, rows[0].find_element(By.CSS_SELECTOR, "button.head-btn"))
        wait(driver, "#qk-check td[data-field=score]")
        api = server.post(
            "/api/qk",
            {
                "tokens": traced.trace.tokens.tolist(),
                "layer": top["layer"],
                "head": top["head"],
                "query_pos": q,
                "key_pos": k,
                "top": 12,
            },
        )["qk"]
        for field in ("score", "sum_of_terms", "pattern"):
            assert (
                numbers(driver.find_element(By.CSS_SELECTOR, f"#qk-check td[data-field={field}]"))[1] == api[field][0]
            )
        assert abs(api["score"][0] - api["sum_of_terms"][0]) <= 1e-4 * max(1.0, abs(api["score"][0]))
        labels = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "#qk-terms tr.qk-term td:first-child")]
        assert labels == [t["query_label"] for t in api["terms"]]
        driver.execute_script("document.getElementById('qk-panel').scrollIntoView()")
        driver.save_screenshot(str(shots / "06-demo-qk.png"))

        # a feature's dashboard, from the shipped dashboards.json, on hover
        comp = feature_component(driver, "#qk-terms")
        node = Node.parse(comp.get_attribute("data-component"))
        checkpoint, feature = node.checkpoint, node.index
        dash = json.loads((DEMO_SAES / f"blocks.{checkpoint}.hook_resid_pre" / "dashboards.json").read_text())
        ActionChains(driver).move_to_element(comp).perform()
        tip = WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "tooltip"))
        WebDriverWait(driver, 10).until(lambda d: dash["features"][str(feature)]["top_out"][0].strip() in tip.text)
        driver.save_screenshot(str(shots / "07-demo-dashboard.png"))
        assert console_errors(driver) == []


LONG_LABEL = "says a title such as Aunt or Uncle comes next, then a name (a long label)"


def text_of(element) -> str:
    return element.get_attribute("textContent")


def label_boxes(driver) -> dict[str, tuple[float, float, float, float]]:
    """The drawn labels' background boxes, by node id: (x, y, width, height) in SVG units."""
    return driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#graph-svg g.labels g.node-label')].map(g => {"
        "  const r = g.querySelector('rect');"
        "  return [g.dataset.id, ['x', 'y', 'width', 'height'].map(k => +r.getAttribute(k))]; }))"
    )


def strongest_input(graph: dict) -> tuple[dict, float]:
    """An edge into the node with the most inputs (its strongest input, so the node panel lists it) and its
    weight normalised per target, computed here from the file: weight / sum of |weight| into its target."""
    ins: dict[str, list[dict]] = {}
    for link in graph["links"]:
        ins.setdefault(link["target"], []).append(link)
    target = max(ins, key=lambda t: len(ins[t]))
    link = max(ins[target], key=lambda x: abs(x["weight"]))
    norm = link["weight"] / sum(abs(x["weight"]) for x in ins[target])
    assert len(ins[target]) > 1 and abs(norm) < abs(link["weight"]), "pick a target whose inputs do not sum to 1"
    return link, norm


def test_first_graph_labels_normalised_weights_and_url(setup, shots, driver, tmp_path, live_server):
    """No click: the page opens the first graph GET /api/graphs lists; hovering a node draws its label on the
    graph (cut, the full text in its title), pinning keeps it, pinned labels do not overlap; the normalised
    toggle shows a known edge's weight over its target's incoming |weights|, as computed here; a URL that
    names a graph opens that graph, and choosing another one puts it into the URL."""
    graph = json.loads((setup.data / GRAPH_NAME).read_text())
    unasked = default_labelled(graph)  # logits and the top nodes by influence: labelled from the start
    labelled = next(
        n for n in graph["nodes"] if Node.parse(n["node_id"]).kind is not Kind.TOKEN and n["node_id"] not in unasked
    )
    labelled["clerp"] = LONG_LABEL
    node_id = labelled["node_id"]
    data = tmp_path / "graphs"
    data.mkdir()
    (data / "b-other.json").write_text((setup.data / STORED).read_text())
    (data / "a-first.json").write_text(json.dumps(graph))
    with live_server(create_app(data)) as server:
        with urllib.request.urlopen(server.url + "/api/graphs", timeout=30) as r:
            first = json.loads(r.read())["graphs"][0]["name"]
        assert first == "a-first.json"
        driver.get(server.url + "/")
        opened(driver, first)
        assert Select(driver.find_element(By.ID, "graph-select")).first_selected_option.get_attribute("value") == first
        assert driver.execute_script("return location.hash") == f"#graph={first}"
        assert len(driver.find_elements(By.CSS_SELECTOR, "#graph-svg g.node")) == len(graph["nodes"])

        WebDriverWait(driver, 10).until(lambda d: label_boxes(d))
        shown = set(label_boxes(driver))  # unasked: every logit, and top nodes by influence where they fit
        assert {n for n in unasked if "logit/" in n} <= shown <= unasked
        # hover: the node's name (qktrace.nodes.component_label), its label cut to fit but its position kept, the
        # whole name in its title; gone when the mouse leaves
        marker = driver.find_element(By.CSS_SELECTOR, f'#graph-svg g.node[data-id="{node_id}"] > :first-child')
        ActionChains(driver).move_to_element(marker).perform()
        label = wait(driver, f'#graph-svg g.labels g.node-label[data-id="{node_id}"]', 10)
        node = Node.parse(node_id)
        tok = graph["metadata"]["prompt_tokens"][node.pos]
        assert text_of(label.find_element(By.TAG_NAME, "title")) == component_label(node, tok, LONG_LABEL)
        full = component_label(node, tok, LONG_LABEL)
        cut = lambda t, n: t if len(t) <= n else t[: n - 1] + "…"  # noqa: E731
        short = f'{cut(full.split(f" @{node.pos} ")[0], 24)} @{node.pos} "{cut(visible(tok), 10)}"'
        assert text_of(label.find_element(By.TAG_NAME, "text")) == (full if len(full) <= 40 else short)
        assert "hover-only" in label.get_attribute("class")
        ActionChains(driver).move_to_element(driver.find_element(By.ID, "graph-info")).perform()
        WebDriverWait(driver, 10).until(lambda d: set(label_boxes(d)) == shown)

        # pin it and its three nearest nodes: their labels stay, and none covers another
        xy = {
            n["node_id"]: driver.execute_script(
                "const g = arguments[0].transform.baseVal.consolidate().matrix; return [g.e, g.f]",
                driver.find_element(By.CSS_SELECTOR, f'#graph-svg g.node[data-id="{n["node_id"]}"]'),
            )
            for n in graph["nodes"]
        }
        near = sorted(xy, key=lambda i: (xy[i][0] - xy[node_id][0]) ** 2 + (xy[i][1] - xy[node_id][1]) ** 2)[:4]
        assert near[0] == node_id
        for pin in near:
            node = driver.find_element(By.CSS_SELECTOR, f'#graph-svg g.node[data-id="{pin}"] > :first-child')
            driver.execute_script("arguments[0].scrollIntoView({block: 'center', inline: 'center'})", node)
            ActionChains(driver).key_down(Keys.SHIFT).click(node).key_up(Keys.SHIFT).perform()
        ActionChains(driver).move_to_element(driver.find_element(By.ID, "graph-info")).perform()
        WebDriverWait(driver, 10).until(lambda d: set(near) <= set(label_boxes(d)) <= set(near) | unasked)
        for label in driver.find_elements(By.CSS_SELECTOR, "#graph-svg g.node-label"):
            assert "hover-only" not in label.get_attribute("class")
        boxes = list(label_boxes(driver).values())
        for i, (x, y, w, h) in enumerate(boxes):
            for x2, y2, w2, h2 in boxes[i + 1 :]:
                assert x + w <= x2 or x2 + w2 <= x or y + h <= y2 or y2 + h2 <= y, "two labels overlap"
        driver.save_screenshot(str(shots / "08-labels.png"))

        # raw, then normalised per target: the node panel's row, the edge's drawn weight, the edge panel
        link, norm = strongest_input(graph)
        index = graph["links"].index(link)
        click(driver, driver.find_element(By.CSS_SELECTOR, f'#graph-svg g.node[data-id="{link["target"]}"]'))
        cell = f'#node-panel tr[data-link="{index}"] td[data-field="weight"]'
        edge = f'#graph-svg g.edge[data-i="{index}"]'
        assert numbers(wait(driver, cell))[1] == pytest.approx(link["weight"], rel=1e-12)
        assert float(driver.find_element(By.CSS_SELECTOR, edge).get_attribute("data-weight")) == pytest.approx(
            link["weight"], rel=1e-12
        )
        raw_width = driver.find_element(By.CSS_SELECTOR, f"{edge} line.vis").get_attribute("stroke-width")
        click(driver, driver.find_element(By.ID, "weights-norm"))
        WebDriverWait(driver, 10).until(
            lambda d: numbers(d.find_element(By.CSS_SELECTOR, cell))[1] == pytest.approx(norm, rel=1e-12)
        )
        assert numbers(driver.find_element(By.CSS_SELECTOR, cell))[0] == pytest.approx(norm, rel=1e-3)
        assert float(driver.find_element(By.CSS_SELECTOR, edge).get_attribute("data-weight")) == pytest.approx(
            norm, rel=1e-12
        )
        max_norm = max(
            abs(x["weight"]) / sum(abs(y["weight"]) for y in graph["links"] if y["target"] == x["target"])
            for x in graph["links"]
        )
        width = driver.find_element(By.CSS_SELECTOR, f"{edge} line.vis").get_attribute("stroke-width")
        assert float(width) == pytest.approx(0.6 + 4.4 * (abs(norm) / max_norm) ** 0.5, abs=0.006)
        assert width != raw_width
        assert "weights=norm" in driver.execute_script("return location.hash")
        click(driver, driver.find_element(By.CSS_SELECTOR, f'#node-panel tr[data-link="{index}"]'))
        shown = wait(driver, "#edge-weight-norm")
        assert float(shown.get_attribute("data-value")) == pytest.approx(norm, rel=1e-12)
        assert float(shown.text) == pytest.approx(norm, rel=1e-3)
        assert float(driver.find_element(By.ID, "edge-weight").get_attribute("data-value")) == pytest.approx(
            link["weight"], rel=1e-12
        )
        driver.save_screenshot(str(shots / "09-normalised.png"))

        # choosing another graph puts it into the URL; a reload comes back to it
        Select(driver.find_element(By.ID, "graph-select")).select_by_value("b-other.json")
        opened(driver, "b-other.json")
        assert driver.execute_script("return location.hash") == "#graph=b-other.json&weights=norm"
        driver.refresh()
        opened(driver, "b-other.json")
        assert driver.find_element(By.ID, "weights-norm").is_selected()
        driver.back()  # the URL before: the first graph
        opened(driver, first)

        # a URL naming a graph opens it, in the hash or in the query
        driver.get(server.url + "/?graph=b-other.json")
        opened(driver, "b-other.json")
        driver.get(server.url + "/#graph=a-first.json")
        opened(driver, "a-first.json")
        assert not driver.find_element(By.ID, "weights-norm").is_selected()
        assert console_errors(driver) == []


def test_page_modules_are_served_as_javascript(setup, live_server):
    """Every module the page imports is a sibling file under /static, served with a JavaScript MIME type
    (Chromium refuses module scripts otherwise) and without any external address."""
    static = Path(qktrace.__file__).parent / "web" / "static"
    with live_server(create_app(setup.data)) as server:
        with urllib.request.urlopen(server.url + "/", timeout=30) as r:
            page = r.read().decode()
        assert '<script type="module" src="/static/app.js"></script>' in page
        todo, seen = ["app.js"], set()
        while todo:
            name = todo.pop()
            seen.add(name)
            with urllib.request.urlopen(f"{server.url}/static/{name}", timeout=30) as r:
                assert r.headers["Content-Type"].split(";")[0] in ("text/javascript", "application/javascript")
                text = r.read().decode()
            assert "https://" not in text and "http://" not in text.replace("http://www.w3.org/2000/svg", "")
            for imported in re.findall(r'from "\./([\w-]+\.js)"', text):
                assert (static / imported).is_file()
                if imported not in seen:
                    todo.append(imported)
        assert seen == {p.name for p in static.glob("*.js")}, "a module no one imports, or one not found"


def test_compare_view(setup, shots, driver, tmp_path, live_server):
    """#compare=A,B opens two graphs side by side, the differing token marked in both, and the heads whose
    attention differs most, with the numbers the API computes; a head's row shows its QK term differences;
    closing it returns to one graph; without a model the graphs still show, with a note."""
    tracer = setup.tracer
    data = tmp_path / "graphs"
    data.mkdir()
    prompts = {
        "a.json": "Aunt Sally is the opposite of Uncle Bob . Aunt",
        "b.json": "Aunt Sally is the opposite of Uncle Sally . Aunt",
    }
    traced = {}
    for name, prompt in prompts.items():
        traced[name] = tracer.run(prompt)
        traced[name].graph(progress=False).save(data / name)
    graphs = {name: json.loads((data / name).read_text()) for name in prompts}
    with live_server(create_app(data, tracer)) as server:
        driver.get(server.url + "/#compare=a.json,b.json")
        wait(driver, "#compare-table tr.compare-row")
        assert driver.find_element(By.ID, "compare-pane").is_displayed()
        assert not driver.find_element(By.ID, "graph-pane").is_displayed()
        for side, name in (("a", "a.json"), ("b", "b.json")):
            nodes = driver.find_elements(By.CSS_SELECTOR, f"#compare-svg-{side} g.node")
            assert len(nodes) == len(graphs[name]["nodes"])
            marked = driver.find_elements(By.CSS_SELECTOR, f"#compare-svg-{side} text.token-label.differs")
            assert [int(t.get_attribute("data-pos")) for t in marked] == [8]
        api = server.post(
            "/api/compare",
            {"tokens_a": traced["a.json"].trace.tokens.tolist(), "tokens_b": traced["b.json"].trace.tokens.tolist(),
             "query_pos": -1, "top": 5},
        )  # fmt: skip
        rows = driver.find_elements(By.CSS_SELECTOR, "#compare-table tr.compare-row")
        assert len(rows) == min(20, len(api["heads"]))
        for row, h in zip(rows, api["heads"]):
            assert (int(row.get_attribute("data-layer")), int(row.get_attribute("data-head"))) == (
                h["layer"],
                h["head"],
            )
            assert int(row.get_attribute("data-key")) == h["key_pos"]
            for field in ("attention_a", "attention_b", "diff", "skew"):
                shown, exact = numbers(row.find_element(By.CSS_SELECTOR, f"td[data-field={field}]"))
                assert exact == h[field] and shown == pytest.approx(h[field], rel=1e-3, abs=1e-6)
        driver.save_screenshot(str(shots / "10-compare.png"))

        # a head's row: its QK terms in A and B, as the API lists them
        click(driver, rows[0])
        wait(driver, "#compare-terms-title")
        terms = next(
            t for t in api["terms"] if (t["layer"], t["head"]) == (api["heads"][0]["layer"], api["heads"][0]["head"])
        )
        cells = driver.find_elements(By.CSS_SELECTOR, "#compare-terms tr.compare-term td[data-field=diff]")
        assert [numbers(c)[1] for c in cells] == [x["diff"] for x in terms["terms"]]
        assert 'different at 8 ("Bob" → "Sally")' in driver.find_element(By.ID, "compare-summary").text
        driver.execute_script("document.getElementById('compare-terms').scrollIntoView()")
        driver.save_screenshot(str(shots / "11-compare-terms.png"))

        # with an answer: the top heads' patterns patched from B into A, the numbers the API computes
        driver.find_element(By.ID, "compare-answer").send_keys("Sally")
        click(driver, driver.find_element(By.ID, "compare-run"))
        wait(driver, "#compare-patching-table tr.patch-together")
        patched = server.post(
            "/api/compare",
            {"tokens_a": traced["a.json"].trace.tokens.tolist(), "tokens_b": traced["b.json"].trace.tokens.tolist(),
             "query_pos": -1, "top": 5, "answer": "Sally"},
        )["patching"]  # fmt: skip
        table = "#compare-patching-table"
        alone = driver.find_elements(By.CSS_SELECTOR, f"{table} tr.patch-alone td[data-field=delta]")
        assert [numbers(c)[1] for c in alone] == patched["alone"] and len(alone) == 5
        together = driver.find_element(By.CSS_SELECTOR, f"{table} tr.patch-together td[data-field=delta]")
        assert numbers(together)[1] == patched["together"]
        assert "m(B) − m(A)" in driver.find_element(By.ID, "compare-patching-summary").text

        # back to one graph
        click(driver, driver.find_element(By.ID, "compare-close"))
        WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "graph-pane").is_displayed())
        opened(driver, "a.json")
        assert driver.execute_script("return location.hash") == "#graph=a.json"
        # and the Compare button opens it again, A = the open graph
        click(driver, driver.find_element(By.ID, "compare-open"))
        WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "compare-pane").is_displayed())
        assert Select(driver.find_element(By.ID, "compare-a")).first_selected_option.get_attribute("value") == "a.json"
        assert Select(driver.find_element(By.ID, "compare-b")).first_selected_option.get_attribute("value") == "b.json"
        assert console_errors(driver) == []

    with live_server(create_app(data)) as server:  # view only: no model
        driver.get(server.url + "/#compare=a.json,b.json")
        note = wait(driver, "#compare-note")
        assert "No model is loaded" in note.text
        assert len(driver.find_elements(By.CSS_SELECTOR, "#compare-svg-b g.node")) == len(graphs["b.json"]["nodes"])
        driver.find_element(By.ID, "compare-prompt-b").send_keys("Aunt Bob is the opposite of Uncle Sally . Aunt")
        click(driver, driver.find_element(By.ID, "compare-run"))
        assert (
            wait(driver, "#compare-error").text
            == "a typed prompt B needs a loaded model: qktrace serve --model MODEL --saes SAES"
        )
        assert console_errors(driver) == []


def test_transcoder_graph_in_the_browser(setup, shots, driver, tmp_path, live_server):
    """A plain transcoder graph opens: every node drawn (transcoder features as their own kind), no head
    loadings, and a traced node's QK pairs name the residual's writers with their labels."""
    from qktrace.saes import load_transcoders
    from qktrace.testing import random_prompt, write_transcoder_set

    model = setup.tracer.model
    ts = load_transcoders(write_transcoder_set(tmp_path / "ct", model.d_model, model.n_layers), model)
    traced = qktrace.Tracer(model, transcoders=ts).run(random_prompt(8, seed=2))
    data = tmp_path / "graphs"
    data.mkdir()
    traced.graph(progress=False, node_threshold=0.95).save(data / "tc.json")
    raw = json.loads((data / "tc.json").read_text())
    with live_server(create_app(data, setup.tracer)) as server:
        open_graph(driver, server, "tc.json")
        nodes = driver.find_elements(By.CSS_SELECTOR, "#graph-svg g.node")
        assert {g.get_attribute("data-id") for g in nodes} == {n["node_id"] for n in raw["nodes"]}
        kinds = {g.get_attribute("data-kind") for g in nodes}
        assert {"transcoder", "mlp_error", "token", "logit"} <= kinds, kinds
        labels = page_labels(raw)
        traced_node = next(n for n in raw["nodes"] if "qk_tracing_results" in n)
        node = driver.find_element(
            By.CSS_SELECTOR, f'#graph-svg g.node[data-id="{traced_node["node_id"]}"] > :first-child'
        )
        click(driver, node)
        wait(driver, "#qk-tracing tr.qk-pair")
        rows = driver.find_elements(By.CSS_SELECTOR, "#qk-tracing tr.qk-pair")
        pairs = traced_node["qk_tracing_results"]["pair_wise_contributors"]
        assert len(rows) == len(pairs)
        for row, (q, k, _) in zip(rows, pairs):
            cells = row.find_elements(By.CSS_SELECTOR, "td")
            assert (text_of(cells[0]), text_of(cells[1])) == (labels[q], labels[k])
        driver.save_screenshot(str(shots / "12-transcoder-graph.png"))


def test_transcoder_node_opens_its_dashboard(setup, driver, tmp_path, live_server):
    """A transcoder graph served with its transcoders' dashboards (`qktrace dashboards --transcoders CT --out
    CT/dashboards`): a transcoder node carries the dashboards' label, and its Details open the feature panel
    with the file's label and top contexts."""
    from qktrace.jobs.dashboards import build_dashboards
    from qktrace.nodes import visible
    from qktrace.options import DashboardOptions
    from qktrace.saes import load_transcoders
    from qktrace.testing import random_prompt, write_transcoder_set

    model = setup.tracer.model
    ct = write_transcoder_set(tmp_path / "ct", model.d_model, model.n_layers)
    prompt = random_prompt(8, seed=2)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": prompt}) + "\n" + json.dumps({"text": random_prompt(12, seed=5)}) + "\n")
    opts = DashboardOptions(seq_len=32)
    build_dashboards(qktrace.Tracer(model, transcoders=load_transcoders(ct, model)), None, corpus, ct / "dashboards",
                     options=opts)  # fmt: skip
    tracer = qktrace.Tracer(model, transcoders=load_transcoders(ct, model))  # now labelled by the dashboards
    data = tmp_path / "graphs"
    data.mkdir()
    tracer.run(prompt).graph(progress=False, node_threshold=0.95).save(data / "tc.json")
    raw = json.loads((data / "tc.json").read_text())
    node = next(n for n in raw["nodes"] if n["node_id"].startswith("transcoder/"))
    _, layer, _, f = node["node_id"].split("/")
    dash = json.loads((ct / "dashboards" / f"blocks.{layer[1:]}.transcoder" / "dashboards.json").read_text())
    want = dash["features"][f[1:]]
    assert node["clerp"].startswith(want["label"])
    with live_server(create_app(data, tracer)) as server:
        open_graph(driver, server, "tc.json")
        click(
            driver,
            driver.find_element(By.CSS_SELECTOR, f'#graph-svg g.node[data-id="{node["node_id"]}"] > :first-child'),
        )
        click(driver, wait(driver, "#feature-details"))
        detail = wait(driver, f'#feature-detail[data-component="{node["node_id"]}"]')
        WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#feature-detail .ctx"))
        assert detail.find_element(By.CSS_SELECTOR, "b").text == want["label"]
        assert f"layer {layer[1:]} transcoder, feature {f[1:]}" in detail.text
        ctxs = detail.find_elements(By.CSS_SELECTOR, ".ctx")
        assert len(ctxs) == len(want["contexts"])
        for el_, c in zip(ctxs, want["contexts"]):
            assert el_.find_element(By.CSS_SELECTOR, "mark").text == visible(c["tokens"][c["i"]])
            assert len(el_.find_elements(By.CSS_SELECTOR, ".t")) == len(c["tokens"])
        assert console_errors(driver) == []


# -- the page researchers keep open: fitted big graphs, the explained answer, every view a link ---------------


TOP_LABELLED = 12  # graphview.js: the most influential nodes labelled without a click


def default_labelled(graph: dict) -> set[str]:
    """The nodes the page labels unasked, computed here from the file: every logit, and the 12 features with
    the largest |raw_influence| (ties by id)."""
    kind = lambda n: Node.parse(n["node_id"]).kind  # noqa: E731
    feats = sorted(
        (n for n in graph["nodes"] if kind(n) is Kind.FEATURE),
        key=lambda n: (-abs(n.get("raw_influence") or 0), n["node_id"]),
    )
    return {n["node_id"] for n in graph["nodes"] if kind(n) is Kind.LOGIT} | {
        n["node_id"] for n in feats[:TOP_LABELLED]
    }


def view_box(driver) -> str:
    return driver.execute_script("return document.getElementById('graph-svg').getAttribute('viewBox')")


def screen_rect(driver, element) -> dict:
    return driver.execute_script("const r = arguments[0].getBoundingClientRect(); return r.toJSON()", element)


def inside(inner: dict, outer: dict) -> bool:
    return (
        inner["left"] >= outer["left"] - 0.5
        and inner["right"] <= outer["right"] + 0.5
        and inner["top"] >= outer["top"] - 0.5
        and inner["bottom"] <= outer["bottom"] + 0.5
    )


def test_checkpointed_graph_in_the_browser(setup, driver, tmp_path, live_server):
    """A checkpointed graph (transcoders + attention SAEs) opens: attention-SAE features drawn as their own kind,
    named in the legend with a marker of their own; an edge into one lists its heads."""
    from qktrace.saes import load_transcoders
    from qktrace.testing import random_attention_saes, random_prompt, write_transcoder_set

    model = setup.tracer.model
    ts = load_transcoders(write_transcoder_set(tmp_path / "ct", model.d_model, model.n_layers), model)
    att = random_attention_saes(model, ("z", "attn_out"))
    traced = qktrace.Tracer(model, transcoders=ts, attention_saes=att).run(random_prompt(8, seed=2))
    data = tmp_path / "graphs"
    data.mkdir()
    traced.graph(progress=False, node_threshold=0.95).save(data / "s2.json")
    raw = json.loads((data / "s2.json").read_text())
    with live_server(create_app(data, setup.tracer)) as server:
        open_graph(driver, server, "s2.json")
        nodes = driver.find_elements(By.CSS_SELECTOR, "#graph-svg g.node")
        assert {g.get_attribute("data-id") for g in nodes} == {n["node_id"] for n in raw["nodes"]}
        kinds = {g.get_attribute("data-kind") for g in nodes}
        assert {"attn", "transcoder", "token", "logit"} <= kinds, kinds
        legend = {e.get_attribute("data-kind") for e in driver.find_elements(By.CSS_SELECTOR, "#legend [data-kind]")}
        assert legend == kinds
        markers = driver.execute_script(
            "const out = {}; for (const k of arguments[0]) { const m = document.querySelector("
            "`#legend [data-kind='${k}'] .mark`); out[k] = m.tagName + m.getAttribute('fill') }; return out",
            sorted(kinds),
        )
        assert len(set(markers.values())) == len(kinds), "two kinds share one marker"
        link = next(x for x in raw["links"] if x["head_loadings"])
        edge = driver.find_element(
            By.CSS_SELECTOR,
            f'#graph-svg g.edge[data-source="{link["source"]}"][data-target="{link["target"]}"] line.hit',
        )
        driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", edge)
        h = link["head_loadings"][0]
        wait(driver, f'#head-table button.head-btn[data-layer="{h["layer"]}"][data-head="{h["head"]}"]')
        assert console_errors(driver) == []


def test_big_graph_opens_fitted_and_labelled(demo, shots, driver, live_server):
    """The demo's largest graph at 1280x800: every logit node and the answer column on screen after load,
    logits labelled with token and probability, the top nodes by influence labelled without overlap, a
    legend of the kinds present, inhibitory edges dashed; zoom and fit change the view, labels stay 11 px."""
    tracer, data, saes = demo
    name = "multiple_choice.graph.json"
    graph = json.loads((data / name).read_text())
    assert len(graph["nodes"]) > 300
    driver.set_window_size(1280, 800)
    with live_server(create_app(data, saes_dir=saes)) as server:
        driver.get(f"{server.url}/#graph={name}")
        opened(driver, name)
        pane = screen_rect(driver, driver.find_element(By.ID, "graph-scroll"))
        logits = [n for n in graph["nodes"] if Node.parse(n["node_id"]).kind is Kind.LOGIT]
        assert logits
        unasked = default_labelled(graph)
        WebDriverWait(driver, 10).until(lambda d: label_boxes(d))
        shown = set(label_boxes(driver))
        assert {n["node_id"] for n in logits} <= shown <= unasked
        assert len(shown) >= len(logits) + TOP_LABELLED // 2, "most top nodes by influence are labelled"
        for n in logits:
            marker = driver.find_element(By.CSS_SELECTOR, f'#graph-svg g.node[data-id="{n["node_id"]}"] .mark')
            assert inside(screen_rect(driver, marker), pane), f"logit {n['node_id']} is off screen"
            label = driver.find_element(By.CSS_SELECTOR, f'#graph-svg g.node-label[data-id="{n["node_id"]}"] text')
            assert f"p={n['token_prob']:.3f}" in text_of(label) or "p=" in text_of(label)
        answer_pos = max(Node.parse(n["node_id"]).pos for n in logits)
        column = driver.find_element(By.CSS_SELECTOR, f'#graph-svg text.token-label[data-pos="{answer_pos}"]')
        assert inside(screen_rect(driver, column), pane), "the answer column is off screen"
        rects = driver.execute_script(
            "return [...document.querySelectorAll('#graph-svg g.node-label rect')]"
            ".map(r => r.getBoundingClientRect().toJSON())"
        )
        for i, a in enumerate(rects):
            for b in rects[i + 1 :]:
                dx = min(a["right"], b["right"]) - max(a["left"], b["left"])
                dy = min(a["bottom"], b["bottom"]) - max(a["top"], b["top"])
                assert dx <= 0.5 or dy <= 0.5, "two labels overlap"
        font = driver.execute_script(
            "const t = document.querySelector('#graph-svg g.node-label text'); return t.getBoundingClientRect().height"
        )
        kinds = {Node.parse(n["node_id"]).kind.value for n in graph["nodes"]}
        legend = {e.get_attribute("data-kind") for e in driver.find_elements(By.CSS_SELECTOR, "#legend [data-kind]")}
        assert legend == kinds
        markers = driver.execute_script(
            "const out = {}; for (const k of arguments[0]) { const m = document.querySelector("
            "`#legend [data-kind='${k}'] .mark`); out[k] = m.tagName + m.getAttribute('fill') }; return out",
            sorted(kinds),
        )
        assert len(set(markers.values())) == len(kinds), "two kinds share one marker"
        neg = next(i for i, x in enumerate(graph["links"]) if x["weight"] < 0)
        pos = next(i for i, x in enumerate(graph["links"]) if x["weight"] > 0)
        dash = lambda i: driver.find_element(  # noqa: E731
            By.CSS_SELECTOR, f'#graph-svg g.edge[data-i="{i}"] line.vis'
        ).get_attribute("stroke-dasharray")
        assert dash(neg) != "none" and dash(pos) == "none"
        assert driver.find_element(By.ID, "top").size["height"] < 50, "the header wraps at 1280 px"
        driver.save_screenshot(str(shots / "20-big-graph-1280.png"))

        before = view_box(driver)
        click(driver, driver.find_element(By.ID, "zoom-in"))
        WebDriverWait(driver, 5).until(lambda d: view_box(d) != before)
        zoomed = [float(x) for x in view_box(driver).split()]
        assert zoomed[2] == pytest.approx([float(x) for x in before.split()][2] / 1.4, rel=1e-3)
        WebDriverWait(driver, 5).until(
            lambda d: d.execute_script(
                "const t = document.querySelector('#graph-svg g.node-label text');"
                "return t && Math.abs(t.getBoundingClientRect().height - arguments[0]) < 1",
                font,
            )
        )
        click(driver, driver.find_element(By.ID, "zoom-fit"))
        WebDriverWait(driver, 5).until(lambda d: view_box(d) == before)
        assert console_errors(driver) == []


def test_mechanism_view_replay_and_explain(demo, shots, driver, live_server):
    """A *.mechanism.json from the list opens on its graph: the candidates table and the winning curve as the
    file holds them, the clean scale marked, the chosen features highlighted; Replay runs them all (several
    features, all its heads) in the steering panel, whose p(answer) and p(rival) equal the curve's; and
    "Explain this answer" from the logit node runs the explain job and opens its mechanism, whose numbers
    are POST /api/explain's."""
    tracer, data, saes = demo
    mech = json.loads((data / "induction.mechanism.json").read_text())
    best = mech["candidates"][mech["best"]]
    graph = json.loads((data / "induction.graph.json").read_text())
    with live_server(create_app(data, tracer, saes_dir=saes)) as server:
        open_graph(driver, server, "multiple_choice.graph.json")
        option = driver.find_element(
            By.CSS_SELECTOR, '#graph-select option[value="mechanism:induction.mechanism.json"]'
        )
        assert "(not a graph)" not in option.text
        Select(driver.find_element(By.ID, "graph-select")).select_by_value("mechanism:induction.mechanism.json")
        wait(driver, "#mech-candidates tr.mech-cand")
        WebDriverWait(driver, 20).until(
            lambda d: d.find_element(By.ID, "status").text.startswith(f"{len(set(ids_of(best)) & node_ids(graph))} of")
        )
        assert "graph=induction.graph.json" in driver.execute_script("return location.hash")
        assert "mechanism=induction.mechanism.json" in driver.execute_script("return location.hash")
        rows = driver.find_elements(By.CSS_SELECTOR, "#mech-candidates tr.mech-cand")
        assert len(rows) == len(mech["candidates"])
        effects = [numbers(r.find_element(By.CSS_SELECTOR, "td[data-field=effect]"))[1] for r in rows]
        assert effects == sorted(c["effect"] for c in mech["candidates"])
        assert "selected" in driver.find_element(
            By.CSS_SELECTOR, f'tr.mech-cand[data-index="{mech["best"]}"]'
        ).get_attribute("class")
        curve = driver.find_elements(By.CSS_SELECTOR, "#mech-curve tr.curve-row")
        assert [numbers(r.find_element(By.CSS_SELECTOR, "td[data-field=metric]"))[1] for r in curve] == [
            p["metric"] for p in best["curve"]
        ]
        assert float(driver.find_element(By.ID, "mech-metric").get_attribute("data-value")) == mech["metric"]
        assert driver.find_element(By.CSS_SELECTOR, "#mech-metric-chart g.mark").get_attribute("data-x") == "1"
        chosen = {g.get_attribute("data-id") for g in driver.find_elements(By.CSS_SELECTOR, "#graph-svg g.node.chosen")}
        assert chosen == set(ids_of(best)) & node_ids(graph) and chosen
        # the verdict beside its control, as the file holds them
        assert driver.find_element(By.ID, "mech-verdict").text == mech["verdict"]
        assert (
            driver.find_element(By.ID, "mech-verdict").get_attribute("data-specific") == str(mech["specific"]).lower()
        )
        nulls = driver.find_elements(By.CSS_SELECTOR, "#mech-nulls tr.mech-null")
        assert len(nulls) == len(mech["nulls"]) >= 1
        for row, n in zip(nulls, mech["nulls"]):
            assert int(row.get_attribute("data-candidate")) == n["candidate"]
            assert numbers(row.find_element(By.CSS_SELECTOR, "td[data-field=p_value]"))[1] == n["p_value"]
            assert numbers(row.find_element(By.CSS_SELECTOR, "td[data-field=stronger]"))[1] == n["stronger"]
        driver.save_screenshot(str(shots / "21-mechanism.png"))

        click(driver, driver.find_element(By.ID, "mech-replay"))
        wait(driver, "#sweep-table tr.sweep-row", 60)
        assert driver.find_element(By.ID, "steer-also").get_attribute("value"), "the other features go along"
        sweep = driver.find_elements(By.CSS_SELECTOR, "#sweep-table tr.sweep-row")
        assert len(sweep) == len(best["curve"])
        for row, point in zip(sweep, best["curve"]):
            cells = row.find_elements(By.CSS_SELECTOR, "td[data-field^='p:']")
            assert numbers(row.find_element(By.CSS_SELECTOR, "td[data-field=scale]"))[1] == point["scale"]
            assert float(cells[0].get_attribute("data-value")) == pytest.approx(point["p_answer"], rel=1e-3, abs=1e-6)
            assert float(cells[1].get_attribute("data-value")) == pytest.approx(point["p_rival"], rel=1e-3, abs=1e-6)
        top = driver.execute_script("return document.getElementById('steer-panel').getBoundingClientRect().top")
        assert 0 <= top < 200, "the sweep's panel is scrolled into view"
        driver.save_screenshot(str(shots / "22-replay.png"))

        # explain this answer, from the logit node: a job with progress, then its mechanism opens
        logit = next(n for n in graph["nodes"] if Node.parse(n["node_id"]).kind is Kind.LOGIT)
        click(driver, driver.find_element(By.CSS_SELECTOR, f'#graph-svg g.node[data-id="{logit["node_id"]}"] .mark'))
        click(driver, wait(driver, "#explain-logit"))
        assert driver.find_element(By.ID, "explain-answer").get_attribute("value") == mech["answer"]
        driver.find_element(By.ID, "explain-rival").clear()
        driver.find_element(By.ID, "explain-rival").send_keys(mech["rival"])
        click(driver, driver.find_element(By.ID, "explain-run"))
        WebDriverWait(driver, 120).until(
            lambda d: "mechanism=induction-2.mechanism.json" in d.execute_script("return location.hash")
        )
        wait(driver, "#mech-candidates tr.mech-cand")
        api = server.post(
            "/api/explain", {"tokens": graph["metadata"]["qktrace"]["tokens"], "answer": mech["answer"],
                             "rival": mech["rival"]}
        )["mechanism"]  # fmt: skip
        WebDriverWait(driver, 10).until(
            lambda d: float(d.find_element(By.ID, "mech-metric").get_attribute("data-value")) == api["metric"]
        )
        assert len(driver.find_elements(By.CSS_SELECTOR, "#mech-candidates tr.mech-cand")) == len(api["candidates"])
        assert console_errors(driver) == []


def ids_of(candidate: dict) -> list[str]:
    return [feature_node(p["layer"], p["position"], f).id for p in candidate["parts"] for f in p["features"]]


def node_ids(graph: dict) -> set[str]:
    return {n["node_id"] for n in graph["nodes"]}


def qk_view(driver) -> tuple[str, list[float]]:
    """The QK panel's title and its check row's exact numbers."""
    title = driver.find_element(By.ID, "qk-title").text
    cells = driver.find_elements(By.CSS_SELECTOR, "#qk-check td[data-field]")
    return title, [float(c.get_attribute("data-value")) for c in cells]


def test_every_view_is_a_link(setup, shots, driver, tmp_path, live_server):
    """Pins, prune level, the selected edge, the head and the QK query and key go into the URL; the URL opened
    afresh shows the same edge, the same QK numbers (the API's), the same pins and prune level; Back
    returns to the selected node; #compare=A,B then #graph=X opens X; tooltips never end in "null" and go
    with their graph; the keyboard moves along edges (arrow up: the strongest output), Enter opens, Escape
    closes."""
    graph = setup.graph
    link, q, k = visible_cross_link(graph)
    top = link["head_loadings"][0]
    data = tmp_path / "graphs"
    data.mkdir()
    for name in ("a.json", "b.json"):
        (data / name).write_text((setup.data / GRAPH_NAME).read_text())
    tokenless = json.loads((setup.data / GRAPH_NAME).read_text())  # nothing where the tokens were
    is_token = lambda i: Node.parse(i).kind is Kind.TOKEN  # noqa: E731
    tokenless["nodes"] = [n for n in tokenless["nodes"] if not is_token(n["node_id"])]
    tokenless["links"] = [x for x in tokenless["links"] if not (is_token(x["source"]) or is_token(x["target"]))]
    (data / "c.json").write_text(json.dumps(tokenless))
    with live_server(create_app(data, setup.tracer)) as server:
        driver.get(server.url + "/#compare=a.json,b.json")
        wait(driver, "#compare-table tr.compare-row")
        driver.execute_script("location.hash = '#graph=b.json'")
        opened(driver, "b.json")
        time.sleep(1)  # no late answer opens another graph
        assert driver.find_element(By.ID, "status").text == "opened b.json"
        assert (
            Select(driver.find_element(By.ID, "graph-select")).first_selected_option.get_attribute("value") == "b.json"
        )

        # a token node's tooltip: no "null"; it goes when another graph opens
        token = next(n for n in graph["nodes"] if Node.parse(n["node_id"]).kind is Kind.TOKEN)
        ActionChains(driver).move_to_element(
            driver.find_element(By.CSS_SELECTOR, f'#graph-svg g.node[data-id="{token["node_id"]}"] .mark')
        ).perform()
        tip = driver.find_element(By.ID, "tooltip")
        WebDriverWait(driver, 10).until(lambda d: tip.is_displayed())
        assert "null" not in tip.text
        driver.execute_script("location.hash = '#graph=c.json'")
        opened(driver, "c.json")
        assert not tip.is_displayed()
        driver.execute_script("location.hash = '#graph=a.json'")
        opened(driver, "a.json")

        # pin, prune, select the node, then the edge, then its top head's QK view
        pin = link["source"]
        driver.execute_script(
            "arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true, shiftKey: true}))",
            driver.find_element(By.CSS_SELECTOR, f'#graph-svg g.node[data-id="{pin}"]'),
        )
        driver.execute_script(
            "const p = document.getElementById('prune'); p.value = 70; p.dispatchEvent(new Event('input'))"
        )
        click(driver, driver.find_element(By.CSS_SELECTOR, f'#graph-svg g.node[data-id="{link["target"]}"] .mark'))
        wait(driver, "#node-panel table.links")
        node_url = driver.execute_script("return location.hash")
        assert f"node={link['target']}".replace("/", "%2F") in node_url
        click(driver, driver.find_element(By.CSS_SELECTOR, f'#node-panel tr[data-link="{graph["links"].index(link)}"]'))
        wait(driver, "#head-table tr.head-row")
        click(driver, driver.find_element(By.CSS_SELECTOR, "#head-table button.head-btn"))
        wait(driver, "#qk-check td[data-field=score]")
        WebDriverWait(driver, 10).until(lambda d: "qk=" in d.execute_script("return location.hash"))
        url = driver.current_url
        assert f"qk=L{top['layer']}H{top['head']}%3A{q}%3A{k}" in url and "prune=70" in url and "pins=" in url
        shown = qk_view(driver)
        qk_top = driver.execute_script("return document.getElementById('qk-panel').getBoundingClientRect().top")
        assert 0 <= qk_top < 200, "the QK result is scrolled into view"

        # Back: the selected node, before the edge
        driver.back()
        driver.back()
        WebDriverWait(driver, 10).until(lambda d: d.execute_script("return location.hash") == node_url)
        WebDriverWait(driver, 10).until(
            lambda d: (
                link["target"] in d.find_element(By.ID, "node-panel").text
                or d.find_element(By.CSS_SELECTOR, "#node-panel h3")
            )
        )

        # the same URL in a fresh page: the same edge, QK view, pins and prune level
        driver.get("about:blank")
        driver.get(url)
        opened(driver, "a.json")
        wait(driver, "#qk-check td[data-field=score]")
        WebDriverWait(driver, 10).until(lambda d: qk_view(d) == shown)
        api = server.post(
            "/api/qk",
            {"tokens": setup.tokens, "layer": top["layer"], "head": top["head"], "query_pos": q, "key_pos": k},
        )["qk"]
        assert shown[1][0] == api["score"][0]
        assert float(driver.find_element(By.ID, "edge-weight").get_attribute("data-value")) == pytest.approx(
            link["weight"]
        )
        assert driver.find_element(By.ID, "prune").get_attribute("value") == "70"
        pinned = driver.find_elements(By.CSS_SELECTOR, f'#graph-svg g.node-label[data-id="{pin}"]')
        assert pinned, "the pinned node keeps its label"
        driver.save_screenshot(str(shots / "23-shared-url.png"))

        # the keyboard: focus the source, arrow up goes to its strongest output, Enter opens it, Escape closes
        src = link["source"]
        outs = [x for x in graph["links"] if x["source"] == src]
        strongest = max(outs, key=lambda x: abs(x["weight"]))["target"]
        driver.execute_script("document.querySelector(arguments[0]).focus()", f'#graph-svg g.node[data-id="{src}"]')
        ActionChains(driver).send_keys(Keys.ARROW_UP).perform()
        WebDriverWait(driver, 5).until(
            lambda d: d.execute_script("return document.activeElement.dataset.id") == strongest
        )
        ActionChains(driver).send_keys(Keys.ENTER).perform()
        WebDriverWait(driver, 5).until(
            lambda d: strongest.replace("/", "%2F") in d.execute_script("return location.hash")
        )
        ActionChains(driver).send_keys(Keys.ESCAPE).perform()
        WebDriverWait(driver, 5).until(lambda d: "node=" not in d.execute_script("return location.hash"))

        # the QK view: features only hides every term with a bias or error side; a click opens a feature's panel
        rows = driver.find_elements(By.CSS_SELECTOR, "#qk-terms tr.qk-term")
        click(driver, driver.find_element(By.ID, "qk-features-only"))
        kinds = [
            {Node.parse(s.get_attribute("data-component")).kind for s in r.find_elements(By.CSS_SELECTOR, "span.comp")}
            for r in rows
        ]
        assert [r.is_displayed() for r in rows] == [k == {Kind.FEATURE} for k in kinds]
        click(driver, driver.find_element(By.ID, "qk-features-only"))  # all terms again
        comp = feature_component(driver, "#qk-terms")
        wanted = comp.get_attribute("data-component")
        click(driver, comp)
        detail = wait(driver, "#feature-detail")
        assert (
            detail.get_attribute("data-component") == wanted
            and driver.find_element(By.ID, "feature-panel").is_displayed()
        )

        # the subgraph of the pinned nodes: those nodes alone, every edge among them, in the URL
        driver.execute_script(
            "arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true, shiftKey: true}))",
            driver.find_element(By.CSS_SELECTOR, f'#graph-svg g.node[data-id="{link["target"]}"]'),
        )
        click(driver, driver.find_element(By.ID, "subgraph"))
        WebDriverWait(driver, 5).until(lambda d: "sub=1" in d.execute_script("return location.hash"))
        shown_nodes = driver.execute_script(
            "return [...document.querySelectorAll('#graph-svg g.node')]"
            ".filter(g => g.getAttribute('display') !== 'none')"
            ".map(g => g.dataset.id)"
        )
        shown_edges = driver.execute_script(
            "return [...document.querySelectorAll('#graph-svg g.edge')]"
            ".filter(g => g.getAttribute('display') !== 'none')"
            ".map(g => +g.dataset.i)"
        )
        ends = {link["source"], link["target"]}
        assert set(shown_nodes) == ends
        assert shown_edges == [i for i, x in enumerate(graph["links"]) if {x["source"], x["target"]} <= ends]
        click(driver, driver.find_element(By.ID, "subgraph"))

        # steering with neither heads nor a checkpoint: one line that says what to give
        driver.find_element(By.ID, "steer-heads").clear()
        driver.find_element(By.ID, "steer-checkpoint").clear()
        click(driver, driver.find_element(By.ID, "steer-run"))
        err = wait(driver, "#steer-body p.error")
        assert "name heads (e.g. L1H3 L1H0)" in err.text and "a checkpoint" in err.text
        assert console_errors(driver) == []


# -- supernodes collapsed into one node; compare with full panels on both sides -------------------------------


def shown_nodes(driver, svg: str = "graph-svg") -> list[str]:
    """The ids of the graph's nodes drawn now (not hidden by a collapsed supernode or the pinned-only view)."""
    return driver.execute_script(
        f"return [...document.querySelectorAll('#{svg} g.nodes g.node')]"
        ".filter(g => g.getAttribute('display') !== 'none').map(g => g.dataset.id)"
    )


def summed_edges(graph: dict, members: set[str], group: str) -> dict[tuple[str, str], float]:
    """From the file: the edges of a collapsed group, each the sum over its members' edges to or from one
    other node (edges among the members are inside the group)."""
    out: dict[tuple[str, str], float] = {}
    for x in graph["links"]:
        s, t = (group if x[e] in members else x[e] for e in ("source", "target"))
        if group in (s, t) and s != t:
            out[(s, t)] = out.get((s, t), 0.0) + x["weight"]
    return out


def drawn_summed_edges(driver) -> dict[tuple[str, str], float]:
    edges = driver.find_elements(By.CSS_SELECTOR, "#graph-svg g.edge.summed")
    return {(e.get_attribute("data-source"), e.get_attribute("data-target")): float(e.get_attribute("data-raw"))
            for e in edges}  # fmt: skip


def test_supernode_collapses_into_one_node(setup, shots, driver, live_server):
    """Three pinned nodes grouped, then collapsed by a click on the group's label: one node drawn for them
    (three fewer graph nodes), its edges the sums over the members' edges read from the graph file, its
    member count shown; the URL keeps it collapsed (a reload reopens it so); a click on it expands it into its
    members ringed (nothing drawn round the other nodes); "c" on a member collapses it again."""
    graph = setup.graph
    kind = lambda i: Node.parse(i).kind  # noqa: E731
    degree = {n["node_id"]: 0 for n in graph["nodes"]}
    for x in graph["links"]:
        degree[x["source"]] += 1
        degree[x["target"]] += 1
    members = sorted((i for i in degree if kind(i) is Kind.FEATURE), key=lambda i: (-degree[i], i))[:3]
    with live_server(create_app(setup.data, setup.tracer)) as server:
        open_graph(driver, server, GRAPH_NAME)
        everyone = shown_nodes(driver)
        assert len(everyone) == len(graph["nodes"])
        for node_id in members:
            node = driver.find_element(By.CSS_SELECTOR, f'#graph-svg g.node[data-id="{node_id}"] .mark')
            ActionChains(driver).key_down(Keys.SHIFT).click(node).key_up(Keys.SHIFT).perform()
        WebDriverWait(driver, 10).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".pin-check")) == 3)
        driver.find_element(By.ID, "group-name").send_keys("trio")
        click(driver, driver.find_element(By.ID, "group-btn"))
        expanded = wait(driver, '#graph-svg g.supernode.expanded[data-name="trio"]')
        assert not expanded.find_elements(By.CSS_SELECTOR, "rect")  # no box that could take in other nodes
        rings = expanded.find_elements(By.CSS_SELECTOR, "circle.member-ring")
        centres = {(float(r.get_attribute("cx")), float(r.get_attribute("cy"))) for r in rings}
        where = driver.execute_script(
            "return Object.fromEntries([...document.querySelectorAll('#graph-svg g.nodes g.node')]"
            ".map(g => [g.dataset.id, g.transform.baseVal.consolidate().matrix]).map(([i, m]) => [i, [m.e, m.f]]))"
        )
        assert centres == {tuple(where[i]) for i in members}

        click(driver, driver.find_element(By.CSS_SELECTOR, '#graph-svg .group-label[data-group="0"]'))
        group = wait(driver, '#graph-svg g.supernode.collapsed[data-name="trio"]')
        assert group.get_attribute("data-count") == "3"
        assert sorted(shown_nodes(driver)) == sorted(set(everyone) - set(members))  # three fewer, one group node
        assert len(driver.find_elements(By.CSS_SELECTOR, "#graph-svg g.supernode.collapsed")) == 1
        label = driver.find_element(By.CSS_SELECTOR, '#graph-svg .group-label[data-group="0"] text')
        assert text_of(label) == "▸ trio (3)"
        expected = summed_edges(graph, set(members), "supernode:0")
        drawn = drawn_summed_edges(driver)
        assert drawn.keys() == expected.keys() and len(drawn) > 0
        for key, w in expected.items():
            assert drawn[key] == pytest.approx(w, rel=1e-6, abs=1e-9), key
        x, y = (float(v) for v in re.findall(r"-?[\d.]+", group.get_attribute("transform")))
        assert (x, y) == pytest.approx(tuple(sum(where[i][j] for i in members) / 3 for j in (0, 1)))
        driver.save_screenshot(str(shots / "30-supernode-collapsed.png"))

        # a summed edge clicked: the edge panel shows the sum and the edges it sums; one of them opens
        (s, t), w = max(expected.items(), key=lambda kv: abs(kv[1]))
        click(
            driver,
            driver.find_element(
                By.CSS_SELECTOR, f'#graph-svg g.edge.summed[data-source="{s}"][data-target="{t}"] line.hit'
            ),
        )
        rows = wait(driver, "#summed-table") and driver.find_elements(By.CSS_SELECTOR, "#summed-table tr[data-link]")
        assert float(driver.find_element(By.ID, "edge-weight").get_attribute("data-value")) == pytest.approx(w)
        ends = lambda x: tuple("supernode:0" if x[e] in members else x[e] for e in ("source", "target"))  # noqa: E731
        sums = [x for x in graph["links"] if ends(x) == (s, t)]
        assert sorted(numbers(r.find_element(By.CSS_SELECTOR, "td[data-field=weight]"))[1] for r in rows) == sorted(
            x["weight"] for x in sums
        )
        first = graph["links"][int(rows[0].get_attribute("data-link"))]
        click(driver, rows[0])
        WebDriverWait(driver, 10).until(lambda d: not d.find_elements(By.ID, "summed-table"))
        assert float(driver.find_element(By.ID, "edge-weight").get_attribute("data-value")) == first["weight"]

        # the URL keeps it: reloaded, the group is collapsed again with the same edges
        WebDriverWait(driver, 10).until(lambda d: "group=c" in d.execute_script("return location.hash"))
        url = driver.current_url
        driver.get("about:blank")
        driver.get(url)
        wait(driver, '#graph-svg g.supernode.collapsed[data-name="trio"]')
        assert sorted(shown_nodes(driver)) == sorted(set(everyone) - set(members))
        assert drawn_summed_edges(driver) == drawn
        script = "const e = document.activeElement; return [e.getAttribute('class'), e.dataset.id]"
        focused = lambda: driver.execute_script(script)  # noqa: E731
        driver.get(url + "&node=" + members[1].replace("/", "%2F"))  # a member chosen: the keyboard is on its group
        driver.refresh()
        wait(driver, '#graph-svg g.supernode.collapsed[data-name="trio"]')
        WebDriverWait(driver, 10).until(lambda d: focused() == ["supernode collapsed", "supernode:0"])

        # a click expands it; "c" on a member collapses it again
        click(driver, driver.find_element(By.CSS_SELECTOR, "#graph-svg g.supernode.collapsed circle.mark"))
        wait(driver, '#graph-svg g.supernode.expanded[data-name="trio"]')
        assert len(shown_nodes(driver)) == len(graph["nodes"])
        assert not driver.find_elements(By.CSS_SELECTOR, "#graph-svg g.edge.summed")
        WebDriverWait(driver, 10).until(lambda d: "group=e" in d.execute_script("return location.hash"))
        member = driver.find_element(By.CSS_SELECTOR, f'#graph-svg g.node[data-id="{members[0]}"]')
        driver.execute_script("arguments[0].focus()", member)
        ActionChains(driver).send_keys("c").perform()
        wait(driver, '#graph-svg g.supernode.collapsed[data-name="trio"]')
        assert focused() == ["supernode collapsed", "supernode:0"]  # the keyboard stays on the group
        ActionChains(driver).send_keys(Keys.ENTER).perform()
        wait(driver, '#graph-svg g.supernode.expanded[data-name="trio"]')
        assert focused() == ["node", members[0]]
        assert console_errors(driver) == []


def compare_graphs(tracer, data: Path, prompts: dict[str, str]) -> dict[str, dict]:
    """Each prompt traced and its graph saved as data/name; the graph files, by name."""
    for name, prompt in prompts.items():
        tracer.run(prompt).graph(progress=False).save(data / name)
    return {name: json.loads((data / name).read_text()) for name in prompts}


PAIR = {
    "a.json": "Aunt Sally is the opposite of Uncle Bob . Aunt",
    "b.json": "Aunt Sally is the opposite of Uncle Sally . Aunt",
    "0-short.json": "Aunt Sally is the opposite of Uncle",  # listed first; its tokens align with neither
}


def font_px(driver, element) -> float:
    return float(driver.execute_script("return parseFloat(getComputedStyle(arguments[0]).fontSize)", element))


def test_compare_opens_full_panels_on_either_side(setup, shots, driver, tmp_path, live_server):
    """At 1280x800, a click on a node of graph B opens the node panel with B's numbers (from B's graph file,
    which differ from A's there), the edge panel with B's head loadings, and the QK panel computed on B's
    tokens (the API's numbers); the graphs are fitted at a readable scale (token text and labels at least
    10 px) and the panels' text too."""
    data = tmp_path / "graphs"
    data.mkdir()
    graphs = compare_graphs(setup.tracer, data, PAIR)
    a, b = graphs["a.json"], graphs["b.json"]
    last = len(b["metadata"]["prompt_tokens"]) - 1
    links_a = {(x["source"], x["target"]): x["weight"] for x in a["links"]}

    def differs_in_a(node_id: str) -> bool:
        ins = [x for x in b["links"] if x["target"] == node_id]
        return any(links_a.get((x["source"], x["target"])) != x["weight"] for x in ins)

    candidates = [
        n["node_id"]
        for n in sorted(b["nodes"], key=lambda n: -abs(n.get("raw_influence") or 0))
        if Node.parse(n["node_id"]).kind is Kind.FEATURE
        and Node.parse(n["node_id"]).pos == last
        and differs_in_a(n["node_id"])
        and any(x["target"] == n["node_id"] and x["head_loadings"] for x in b["links"])
    ]
    driver.set_window_size(1280, 800)
    with live_server(create_app(data, setup.tracer)) as server:
        driver.get(server.url + "/#compare=a.json,b.json")
        wait(driver, "#compare-table tr.compare-row")
        target = driver.execute_script(
            "return arguments[0].find(id => { const m = document.querySelector(`#compare-svg-b g.node[data-id='${id}']"
            " .mark`), r = m.getBoundingClientRect();"
            " return m.closest('g.node').contains(document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2)) })",
            candidates,
        )  # a node drawn where a click reaches it (not under a label)
        mark = driver.find_element(By.CSS_SELECTOR, f'#compare-svg-b g.node[data-id="{target}"] .mark')
        assert inside(screen_rect(driver, mark), screen_rect(driver, driver.find_element(By.ID, "compare-svg-b")))
        mark.click()  # a real click where the node is drawn
        title = wait(driver, "#node-panel .body h3")
        WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "node-title").get_attribute("title") == target)
        assert target in driver.find_element(By.CSS_SELECTOR, "#node-panel dl.kv").text
        rows = driver.find_elements(By.CSS_SELECTOR, "#node-panel table.links tr[data-link]")
        ins = sorted((x for x in b["links"] if x["target"] == target), key=lambda x: -abs(x["weight"]))[:12]
        shown = [numbers(r.find_element(By.CSS_SELECTOR, "td[data-field=weight]"))[1] for r in rows[: len(ins)]]
        assert shown == [x["weight"] for x in ins]  # B's, which differ from A's
        assert "active" in driver.find_element(By.CSS_SELECTOR, "#compare-svg-b").find_element(
            By.XPATH, "ancestor::div[contains(@class, 'compare-side')]"
        ).get_attribute("class")

        # readable: the panel's text, the graph's labels and its token text, at 1280x800
        assert font_px(driver, title) >= 10 and font_px(driver, rows[0]) >= 10
        pane = screen_rect(driver, driver.find_element(By.ID, "compare-svg-b"))
        tokens = [
            t for t in driver.find_elements(By.CSS_SELECTOR, "#compare-svg-b text.token-label")
            if inside(screen_rect(driver, t), pane)
        ]  # fmt: skip
        assert tokens and min(screen_rect(driver, t)["height"] for t in tokens) >= 10
        label = driver.find_element(By.CSS_SELECTOR, f'#compare-svg-b .node-label[data-id="{target}"] rect')
        assert screen_rect(driver, label)["height"] >= 10
        driver.save_screenshot(str(shots / "31-compare-node-panel.png"))

        # the link names the side and the node: opened afresh, B's node panel again
        url = driver.current_url
        assert "side=b" in url and "node=" + target.replace("/", "%2F") in url
        driver.get("about:blank")
        driver.get(url)
        title = wait(driver, "#node-panel .body h3")
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "node-title").get_attribute("title") == target)
        rows = driver.find_elements(By.CSS_SELECTOR, "#node-panel table.links tr[data-link]")
        assert [numbers(r.find_element(By.CSS_SELECTOR, "td[data-field=weight]"))[1] for r in rows[: len(ins)]] == shown

        # an input with head loadings: the edge panel shows B's; its top head: QK on B's tokens
        link = next(x for x in ins if x["head_loadings"])
        click(driver, driver.find_element(By.CSS_SELECTOR, f'#node-panel tr[data-link="{b["links"].index(link)}"]'))
        wait(driver, "#head-table tr.head-row")
        assert float(driver.find_element(By.ID, "edge-weight").get_attribute("data-value")) == link["weight"]
        direct = driver.find_elements(By.CSS_SELECTOR, "#head-table td[data-field=direct]")
        assert [numbers(c)[1] for c in direct] == [h["direct"] for h in link["head_loadings"]]
        top = link["head_loadings"][0]
        click(driver, driver.find_element(By.CSS_SELECTOR, "#head-table button.head-btn"))
        wait(driver, "#qk-check td[data-field=score]")
        api = server.post(
            "/api/qk",
            {"tokens": b["metadata"]["qktrace"]["tokens"], "layer": top["layer"], "head": top["head"],
             "query_pos": Node.parse(link["target"]).pos, "key_pos": Node.parse(link["source"]).pos, "top": 12},
        )  # fmt: skip
        for field in ("score", "pattern"):
            cell = driver.find_element(By.CSS_SELECTOR, f"#qk-check td[data-field={field}]")
            assert numbers(cell)[1] == api["qk"][field][0]
        driver.save_screenshot(str(shots / "32-compare-qk-panel.png"))
        assert console_errors(driver) == []


def compare_error(driver) -> str:
    """The compare view's one-line refusal or error, once shown."""
    box = wait(driver, "#compare-error", 60)
    WebDriverWait(driver, 10).until(lambda d: box.text)
    assert "\n" not in box.text and driver.find_element(By.ID, "status").text == box.text
    return box.text


def test_compare_pairs_aligned_prompts_and_takes_a_typed_prompt_b(setup, shots, driver, tmp_path, live_server):
    """The Compare button pairs the open graph with one whose tokens align (not the first listed, which does
    not), or says in one line that none does; a pair that does not align is refused in one line naming both
    token counts and the first differing position; a typed prompt B is compared (the table is
    `Traced.compare`'s for the same prompts) and its graph built and drawn; a typed prompt that does not
    align gets the server's one-line reason."""
    data = tmp_path / "graphs"
    data.mkdir()
    graphs = compare_graphs(setup.tracer, data, PAIR)
    short = graphs["0-short.json"]["metadata"]["prompt_tokens"]
    long = graphs["a.json"]["metadata"]["prompt_tokens"]
    with live_server(create_app(data, setup.tracer)) as server:
        open_graph(driver, server, "a.json")
        click(driver, driver.find_element(By.ID, "compare-open"))
        WebDriverWait(driver, 10).until(lambda d: Select(d.find_element(By.ID, "compare-b")).options)
        b_list = Select(driver.find_element(By.ID, "compare-b"))
        assert b_list.first_selected_option.get_attribute("value") == "b.json"
        names = [o.get_attribute("value") for o in b_list.options]
        assert names.index("b.json") < names.index("0-short.json")  # aligned pairs offered first

        # a pair that does not align: refused in one line, nothing compared
        b_list.select_by_value("0-short.json")
        click(driver, driver.find_element(By.ID, "compare-run"))
        why = compare_error(driver)
        assert f"A (a.json) has {len(long)} tokens and B (0-short.json) has {len(short)}" in why
        assert f"first differ at position {len(short)} ({json.dumps(long[len(short)])} vs " in why
        assert not driver.find_elements(By.CSS_SELECTOR, "#compare-table")

        # A without any graph that aligns: the Compare button says so in one line
        driver.get(server.url + "/#graph=0-short.json")
        opened(driver, "0-short.json")
        click(driver, driver.find_element(By.ID, "compare-open"))
        none = wait(driver, "#compare-none")
        assert f"No other graph aligns with A (0-short.json, {len(short)} tokens)" in none.text
        assert f"the others have {len(long)} tokens" in none.text

        # prompt B typed: compared against graph A, as Traced.compare compares them, then its graph drawn
        typed = "Aunt Bob is the opposite of Uncle Sally . Aunt"
        Select(driver.find_element(By.ID, "compare-a")).select_by_value("a.json")
        driver.find_element(By.ID, "compare-prompt-b").send_keys(typed)
        click(driver, driver.find_element(By.ID, "compare-run"))
        WebDriverWait(driver, 120).until(lambda d: "(prompt B typed)" in d.find_element(By.ID, "status").text)
        ref = setup.tracer.run(PAIR["a.json"]).compare(setup.tracer.run(typed), query_pos=-1, top=5).to_json()
        rows = driver.find_elements(By.CSS_SELECTOR, "#compare-table tr.compare-row")
        assert len(rows) == min(20, len(ref["heads"]))
        for row, h in zip(rows, ref["heads"]):
            assert (int(row.get_attribute("data-layer")), int(row.get_attribute("data-head"))) == (
                h["layer"],
                h["head"],
            )
            assert int(row.get_attribute("data-key")) == h["key_pos"]
            for field in ("attention_a", "attention_b", "diff", "skew"):
                cell = row.find_element(By.CSS_SELECTOR, f"td[data-field={field}]")
                assert numbers(cell)[1] == pytest.approx(h[field], rel=1e-6, abs=1e-9)
        assert len(ref["differing"]) == 2
        summary = driver.find_element(By.ID, "compare-summary").text
        assert f"different at {ref['differing'][0]} (" in summary and f"), {ref['differing'][1]} (" in summary
        built = sorted(set(p.name for p in data.glob("*.json")) - set(PAIR))
        assert len(built) == 1 and json.loads((data / built[0]).read_text())["metadata"]["prompt"].endswith(typed)
        b_nodes = json.loads((data / built[0]).read_text())["nodes"]
        assert len(driver.find_elements(By.CSS_SELECTOR, "#compare-svg-b g.node")) == len(b_nodes)
        marked = driver.find_elements(By.CSS_SELECTOR, "#compare-svg-b text.token-label.differs")
        assert [int(t.get_attribute("data-pos")) for t in marked] == ref["differing"]
        assert driver.execute_script("return location.hash") == f"#compare=a.json%2C{built[0]}"
        driver.save_screenshot(str(shots / "33-compare-typed-b.png"))

        # a typed prompt that does not align: the server's reason, in one line
        driver.find_element(By.ID, "compare-prompt-b").send_keys("Aunt Bob is")
        click(driver, driver.find_element(By.ID, "compare-run"))
        why = compare_error(driver)
        assert f"prompt A has {len(long)} tokens and prompt B has 4" in why, why
        assert [e for e in console_errors(driver) if "/api/compare" not in e or "status of 400" not in e] == []
