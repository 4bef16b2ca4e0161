"""Shared fixtures: one tiny random model per supported family, saved to disk and loaded back.

The builders behind every fixture (tiny models, random SAEs of each architecture, HF's own attention
numbers, the jobs' and the server's setups on disk) live in `qktrace.testing`; test modules import those
and these fixtures, never each other."""

from __future__ import annotations

import logging
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
logging.getLogger("transformers").setLevel(logging.ERROR)

import torch  # noqa: E402

from qktrace.testing import TINY_FAMILIES, make_tiny_model  # noqa: E402

# tiny tensors: one thread is faster than two fighting each other (and a background training run)
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {f: make_tiny_model(f, root / f, seed=i) for i, f in enumerate(TINY_FAMILIES)}


@pytest.fixture(scope="session")
def tiny_models(tiny_paths):
    from qktrace.models import load_model

    return {f: load_model(p) for f, p in tiny_paths.items()}


@pytest.fixture(params=TINY_FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The demo's induction graph and mechanism, and its largest graph (multiple choice, 300+ nodes), built
    as `qktrace demo` builds them."""
    from qktrace.analyses.explain import explain
    from qktrace.config import DEMO_MODEL, DEMO_SAES
    from qktrace.demo.run import CASES
    from qktrace.tracer import Tracer

    tracer = Tracer.load(DEMO_MODEL, DEMO_SAES)
    data = tmp_path_factory.mktemp("demo-graphs")
    cases = {c.slug: c for c in CASES}
    for slug in ("induction", "multiple_choice"):
        case = cases[slug]
        graph = tracer.run(case.prompt).graph(targets=[case.answer], progress=False)
        graph.save(data / f"{slug}.graph.json")
        if slug == "induction":
            explain(tracer, case.prompt, case.answer, case.rival, graph=graph).save_json(
                data / f"{slug}.mechanism.json"
            )
    return tracer, data, DEMO_SAES


# -- the page in headless Chromium (Debian's chromium and chromium-driver, nothing downloaded) -----------


class LiveServer:
    """An app served by uvicorn on 127.0.0.1 in a background thread: `with live_server(app) as server`."""

    def __init__(self, app):
        import socket
        import threading

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        import time

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
        import json
        import urllib.request

        req = urllib.request.Request(self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())


@pytest.fixture
def live_server():
    pytest.importorskip("uvicorn")
    return LiveServer


@pytest.fixture
def chrome(tmp_path):
    """Headless Chromium through Selenium, offline, 1680x1050; skipped where Debian's chromium is missing."""
    import shutil
    from pathlib import Path

    chromium, driver_path = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
    if not chromium.exists() or not driver_path.exists():
        pytest.skip("headless browser tests need Debian's chromium and chromium-driver: run scripts/ensure-chromium.sh")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look anything up
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(chromium)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1680,1050"):  # fmt: skip
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(str(driver_path)), options=opts)
    d.set_script_timeout(30)
    yield d
    d.quit()
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


class Page:
    """A headless Chromium driver and the few moves every browser test makes."""

    def __init__(self, driver):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as EC
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.By, self.EC, self.Wait = driver, By, EC, WebDriverWait

    def until(self, condition, timeout: float = 30):
        return self.Wait(self.driver, timeout).until(condition)

    def wait(self, css: str, timeout: float = 60):
        return self.until(self.EC.presence_of_element_located((self.By.CSS_SELECTOR, css)), timeout)

    def find(self, css: str):
        return self.driver.find_element(self.By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list:
        return self.driver.find_elements(self.By.CSS_SELECTOR, css)

    def click(self, element) -> None:
        """A real click; an element under another falls back to a dispatched click on the element itself."""
        from selenium.common.exceptions import ElementClickInterceptedException

        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center', inline: 'center'})", element)
        try:
            element.click()
        except ElementClickInterceptedException:
            self.driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", element)

    def type(self, element_id: str, text: str) -> None:
        """Replace an input's text as a user would."""
        box = self.driver.find_element(self.By.ID, element_id)
        box.clear()
        box.send_keys(text)

    def value(self, element_id: str) -> str:
        return self.driver.find_element(self.By.ID, element_id).get_attribute("value")

    def opened(self, name: str, timeout: float = 30) -> None:
        """Wait until the page says it opened graph `name` and has drawn its nodes."""
        self.until(lambda d: d.find_element(self.By.ID, "status").text == f"opened {name}", timeout)
        self.wait("#graph-svg g.node")

    def open_graph(self, server: LiveServer, name: str) -> None:
        self.driver.get(f"{server.url}/#graph={name}")
        self.opened(name)

    def rect(self, element) -> dict:
        """The element's box on screen (CSS pixels)."""
        return self.driver.execute_script("return arguments[0].getBoundingClientRect().toJSON()", element)

    def console_errors(self) -> list[str]:
        return [e["message"] for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]


@pytest.fixture
def page(chrome):
    """`chrome` with the moves of a browser test (find, click, type, open a graph, console errors)."""
    return Page(chrome)


# -- steering a transcoder or attention-SAE feature inside one head's QK circuit --------------------------------


@pytest.fixture
def check_qk_steering():
    """`check(model, ids, ts, side, kind, attention_saes=None)`: the layer-0 feature of `kind` that moves
    layer 1 head 2's `side` most, steered at s in (0, 2, -1.5) inside that head only, moves its scores by
    exactly its QK terms times s - 1 (HF's soft-cap applied); every other head of the layer is bit-identical."""
    import torch

    from qktrace.config import TOLERANCE
    from qktrace.graph.transcoder_qk import residual_writers, transcoder_qk_attribution
    from qktrace.nodes import Kind, Node
    from qktrace.steering.interventions import SteerQK, run_with

    def check(model, ids, ts, side, kind, attention_saes=None) -> None:
        clean = model.run(ids)
        writers = residual_writers(model, clean, ts, attention_saes=attention_saes)
        q, head, others = len(ids) - 1, 2, [0, 1, 3]
        att = transcoder_qk_attribution(model, clean, writers, 1, head, q)
        comp = att.query if side == "query" else att.key
        prefix = f"{kind.value}/l0/"
        feats = [(i, c) for i, c in enumerate(comp.ids) if c.startswith(prefix)]
        assert feats
        strength = (lambda i: att.terms[i].abs().sum()) if side == "query" else (lambda i: att.terms[:, i].abs().sum())
        i, cid = max(feats, key=lambda ic: float(strength(ic[0])))
        node = Node.parse(cid)
        if side == "query":
            per_key = torch.zeros_like(att.sum_of_terms).index_add_(0, att.key_index, att.terms[i])
        else:
            per_key = torch.zeros_like(att.sum_of_terms)
            per_key[att.key_index[i]] = att.terms[:, i].sum()
        base = run_with(model, {}, ids, [], clean=clean, record_attention=[1]).scores[1]
        coders = {"attention_saes": attention_saes} if kind is Kind.ATTN_FEATURE else {"transcoders": ts}
        keys = list(att.key_positions)
        for s in (0.0, 2.0, -1.5):
            iv = SteerQK(1, head, side, node.index, node.pos, scale=s, kind=kind, feature_layer=0)
            got = run_with(model, {}, ids, [iv], clean=clean, record_attention=[1], **coders).scores[1]
            assert torch.equal(got[others], base[others])
            want = att.sum_of_terms + (s - 1) * per_key  # the QK terms' prediction, before Gemma-2's soft-cap
            if att.softcap is not None:
                want = att.softcap * torch.tanh(want / att.softcap)
            err = float((got[head, q, keys] - want).abs().max())
            assert err < 10 * TOLERANCE["float32"] * float(att.terms.abs().max()), s
        assert float(per_key.abs().max()) > 1e-4

    return check
