"""The page end to end in headless Chromium (Debian's /usr/bin/chromium driven through /usr/bin/chromedriver,
nothing downloaded): open a graph, click an edge, read its head loadings, explain a head, compare the QK
panel's numbers with the API's, run a sweep, pin and group nodes, export a PNG; and the same without a model,
where the page shows the graph's stored QK terms. Screenshots go to $QKTRACE_SCREENSHOTS or a tmp dir."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import threading
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

import uvicorn  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import ElementClickInterceptedException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from qktrace.graph import load_graph  # noqa: E402
from qktrace.server import create_app  # noqa: E402
from tests.test_server import GRAPH_NAME, build_fixture  # noqa: E402

pytestmark = pytest.mark.browser
STORED = "stored.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    s = build_fixture(tmp_path_factory.mktemp("browser"))
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


def open_graph(driver, server: LiveServer, name: str) -> None:
    driver.get(server.url + "/")
    WebDriverWait(driver, 30).until(
        lambda d: (
            name in d.execute_script("return [...document.querySelectorAll('#graph-select option')].map(o => o.value)")
        )
    )
    Select(driver.find_element(By.ID, "graph-select")).select_by_value(name)
    wait(driver, "#graph-svg g.node")
    WebDriverWait(driver, 10).until(lambda d: name in d.find_element(By.ID, "status").text)


def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def visible_cross_link(graph: dict) -> tuple[dict, int, int]:
    """The strongest cross-position link with head loadings, from a feature if any, that is among its
    target's 12 strongest inputs (the node panel lists those)."""
    links = sorted(graph["links"], key=lambda x: (not x["source"].startswith("feature/"), -abs(x["weight"])))
    for link in links:
        ins = sorted((x for x in graph["links"] if x["target"] == link["target"]), key=lambda x: -abs(x["weight"]))
        s, t = (int(link[key].split("/")[2][1:]) for key in ("source", "target"))
        if s != t and link["head_loadings"] and link in ins[:12]:
            return link, t, s
    raise AssertionError("no cross-position link to click in the tiny graph")


def test_explain_an_edge_end_to_end(setup, shots, driver):
    graph = setup.graph
    link, q, k = visible_cross_link(graph)
    with LiveServer(create_app(setup.data, setup.tracer)) as server:
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
        comp = driver.find_element(By.CSS_SELECTOR, "#qk-terms span.comp[data-component^='feature/']")
        ActionChains(driver).move_to_element(comp).perform()
        WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "tooltip").is_displayed())

        # the steering panel was prefilled from the edge: run a 3-point sweep
        scales = driver.find_element(By.ID, "steer-scales")
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


def test_view_only_shows_stored_terms(setup, shots, driver):
    data = json.loads((setup.data / STORED).read_text())
    link = next(x for x in sorted(data["links"], key=lambda x: -abs(x["weight"])) if x.get("qk_top_terms"))
    with LiveServer(create_app(setup.data, saes_dir=setup.saes)) as server:
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


def test_demo_graph_in_the_browser(tmp_path, shots, driver):
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
    with LiveServer(create_app(data, tracer, saes_dir=DEMO_SAES)) as server:
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
        comp = driver.find_element(By.CSS_SELECTOR, "#qk-terms span.comp[data-component^='feature/']")
        checkpoint, feature = (int(p[1:]) for p in comp.get_attribute("data-component").split("/")[1::2][:2])
        dash = json.loads((DEMO_SAES / f"blocks.{checkpoint}.hook_resid_pre" / "dashboards.json").read_text())
        ActionChains(driver).move_to_element(comp).perform()
        tip = WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "tooltip"))
        WebDriverWait(driver, 10).until(lambda d: dash["features"][str(feature)]["top_out"][0].strip() in tip.text)
        driver.save_screenshot(str(shots / "07-demo-dashboard.png"))
        assert console_errors(driver) == []
