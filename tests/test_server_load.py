"""The server under load, over a real socket: model work goes through one bounded line (exactly the excess
is answered 429 with Retry-After), cheap routes answer at once while it is full, and a client that
disconnects has its work stopped (queued: never run; running: at the next layer), so abandoned requests do
not delay the next one by their cost. Times are bounded relative to one request's own time."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from qktrace.config import LIMITS  # noqa: E402
from qktrace.errors import Cancelled  # noqa: E402
from qktrace.server import create_app  # noqa: E402
from qktrace.server.work import Token, Turns, Work, checkpoints  # noqa: E402
from qktrace.testing import ServerSetup, make_server_setup  # noqa: E402

log = logging.getLogger(__name__)
WAIT_S = 60.0  # the longest any step here waits for the server


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> ServerSetup:
    return make_server_setup(tmp_path_factory.mktemp("load"))


@contextlib.contextmanager
def live(app) -> Iterator[str]:
    """`app` served by uvicorn on 127.0.0.1 (a port of our own) in a thread; stopped and joined on exit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(WAIT_S)
        sock.close()


@contextlib.contextmanager
def slow_layers(setup: ServerSetup, seconds: float) -> Iterator[None]:
    """Every decoder block of the model sleeps before it runs: a request costs time in proportion to its layers."""
    handles = [b.register_forward_pre_hook(lambda m, a: time.sleep(seconds)) for b in setup.tracer.model.blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def wait_until(check, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"waited {WAIT_S} s for {what}"
        time.sleep(0.02)


def heavy_requests(setup: ServerSetup) -> list[tuple[str, dict]]:
    """One request of every route that runs the model."""
    toks = setup.tokens
    return [
        ("/api/qk", {"tokens": toks, "layer": 1, "head": 0, "query_pos": -1}),
        ("/api/sweep", {"tokens": toks, "heads": [[1, 0]], "feature": 3, "positions": [2], "scales": "0:2:3"}),
        ("/api/compare", {"tokens_a": toks, "tokens_b": toks[:1] + toks[:-1], "top": 2}),
        ("/api/explain", {"tokens": toks, "answer": toks[1], "null_draws": 0}),
        ("/api/graph", {"tokens": toks[:3]}),
        ("/api/explain/jobs", {"tokens": toks, "answer": toks[1], "null_draws": 0}),
    ]


def test_flood_excess_is_429_and_cheap_routes_answer_at_once(setup, tmp_path):
    n, m = 8, 42  # the line's bound, and the excess: 50 heavy requests at once
    app = create_app(tmp_path, setup.tracer, limits=dataclasses.replace(LIMITS, max_queued_jobs=n))
    engine, kinds = app.state.engine, heavy_requests(setup)
    answers: list = []
    with live(app) as url, httpx.Client(base_url=url, timeout=WAIT_S) as client:
        with engine.lock:  # the model is busy: what is admitted waits, what is not is refused at once
            threads = [
                threading.Thread(target=lambda p=p, b=b: answers.append(client.post(p, json=b)))
                for p, b in (kinds[i % len(kinds)] for i in range(n + m))
            ]
            for t in threads:
                t.start()
            n_refused = lambda: sum(r.status_code == 429 for r in answers)  # noqa: E731
            wait_until(lambda: n_refused() + engine.work.active == n + m, "every request admitted or refused")
            assert (n_refused(), engine.work.active) == (m, n)
            assert all(r.status_code in (429, 202) for r in answers)  # only jobs (202) answer before they run
            start = time.monotonic()
            info = client.get("/api/info")
            took = time.monotonic() - start
            assert info.status_code == 200 and took < 1.0, took
            assert info.json()["load"] == {"active": n, "limit": n, "cancelled": 0}
            for path in ("/api/graphs", "/", "/static/app.js"):
                start = time.monotonic()
                assert client.get(path).status_code == 200 and time.monotonic() - start < 1.0, path
        for t in threads:
            t.join(WAIT_S)
    refused = [r for r in answers if r.status_code == 429]
    assert len(refused) == m and len(answers) == n + m
    assert all(r.status_code in (200, 202) for r in answers if r.status_code != 429)  # 202: a job, queued
    wait_until(lambda: engine.work.active == 0, "the admitted jobs to finish")
    for r in refused:
        error = r.json()["error"]
        assert int(r.headers["retry-after"]) == LIMITS.retry_after_s
        assert "\n" not in error and f"the most this server takes (qktrace serve --queue {n})" in error


def _abandon(url: str, path: str, body: dict) -> socket.socket:
    """Send a request on a raw socket and return it unread (closing it is the client going away)."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=WAIT_S)
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(data)}\r\n\r\n"
    sock.sendall(head.encode() + data)
    return sock


@pytest.mark.parametrize("path", ["/api/sweep", "/api/explain"])
def test_disconnected_clients_work_is_cancelled(setup, tmp_path, caplog, path):
    k = 6
    body = {"tokens": setup.tokens, "heads": [[1, 0]], "feature": 3, "positions": [2], "scales": "0:2:12"}
    if path == "/api/explain":
        body = {"tokens": setup.tokens, "answer": setup.tokens[1], "null_draws": 0}
    app = create_app(tmp_path, setup.tracer)
    engine = app.state.engine
    with (
        live(app) as url,
        httpx.Client(base_url=url, timeout=WAIT_S) as client,
        slow_layers(setup, 0.02),
        caplog.at_level(logging.INFO, logger="qktrace.server.work"),
    ):
        start = time.monotonic()
        assert client.post(path, json=body).status_code == 200
        alone = time.monotonic() - start  # one request's own time
        gone = [_abandon(url, path, body) for _ in range(k)]
        wait_until(lambda: engine.work.active == k, f"{k} requests admitted")
        time.sleep(alone / 3)  # the first is running
        for s in gone:
            s.close()
        start = time.monotonic()
        assert client.post(path, json=body).status_code == 200
        after = time.monotonic() - start
        # without cancelling, the next request waits for k of them: about (k + 1) * alone
        assert after < alone * 2.5, (alone, after)
        log.info("%s alone %.2f s; after %d abandoned ones %.2f s", path, alone, k, after)
        wait_until(lambda: client.get("/api/info").json()["load"]["cancelled"] == k, f"{k} cancelled")
    cancelled = [r.getMessage() for r in caplog.records if "cancelled" in r.getMessage()]
    assert len(cancelled) == k and all("the client disconnected" in c for c in cancelled), cancelled
    assert sum("before layer" in c for c in cancelled) >= 1  # the running one stopped between layers
    assert sum("before it ran" in c for c in cancelled) >= k - 2  # the queued ones never ran


# -- the parts -------------------------------------------------------------------------------------------


def test_work_is_bounded_and_cancelled_work_never_runs():
    work, ran, gate = Work(2, 7), [], threading.Event()
    token = Token()
    token.cancel("gone")
    with pytest.raises(Cancelled, match="before it ran: gone"):
        work.submit(lambda: ran.append(0), token, "cancelled").result(WAIT_S)
    busy = [work.submit(lambda: gate.wait(WAIT_S), Token(), f"busy {i}") for i in range(2)]
    with pytest.raises(Exception, match="2 requests that run the model are queued or running, the most") as e:
        work.submit(lambda: ran.append(1), Token(), "one more")
    assert e.value.status == 429 and e.value.headers == {"Retry-After": "7"}  # type: ignore[attr-defined]
    gate.set()
    assert [f.result(WAIT_S) for f in busy] == [True, True] and ran == []
    assert work.load() == {"active": 0, "limit": 2, "cancelled": 1}
    assert work.submit(lambda: ran.append(2), Token(), "after").result(WAIT_S) is None and ran == [2]


def test_turns_are_first_come_first_served_and_leave_when_cancelled():
    turns, order, tokens = Turns(), [], [Token() for _ in range(4)]
    gate = threading.Event()

    def take(i: int) -> None:
        try:
            with turns.turn(tokens[i], WAIT_S, 1):
                order.append(i)
                if i == 0:
                    gate.wait(WAIT_S)
        except Cancelled:
            order.append(-i)

    threads = []
    for i in range(4):
        threads.append(threading.Thread(target=take, args=(i,)))
        threads[-1].start()
        wait_until(lambda i=i: turns.waiting == i and len(order) == 1, f"thread {i} in line")
    tokens[2].cancel("gone")
    wait_until(lambda: -2 in order, "the cancelled one to leave")
    gate.set()
    for t in threads:
        t.join(WAIT_S)
    assert order == [0, -2, 1, 3]


def test_checkpoints_stop_between_layers_and_go_away(setup):
    model = setup.tracer.model
    blocks = model.blocks
    token = Token()
    seen: list[int] = []
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: seen.append(i)) for i, b in enumerate(blocks)]
    try:
        with checkpoints(blocks):
            from qktrace.server.work import _current

            reset = _current.set(token)
            try:
                token.cancel("gone")
                with pytest.raises(Cancelled, match="cancelled before layer 0: gone"):
                    setup.tracer.run(setup.tokens)
            finally:
                _current.reset(reset)
        assert seen == [0]  # stopped before layer 0's block ran past its hooks
        seen.clear()
        setup.tracer.run(setup.tokens)  # hooks gone: runs through
        assert seen == [0, 1]
    finally:
        for h in hooks:
            h.remove()


def test_serve_checks_its_queue_before_loading(tmp_path):
    from qktrace.cli.args import build_parser
    from qktrace.cli.commands import COMMANDS
    from qktrace.errors import InputError
    from qktrace.server import serve

    assert build_parser(COMMANDS).parse_args(["serve", "--queue", "3"]).queue == 3
    assert build_parser(COMMANDS).parse_args(["serve"]).queue == LIMITS.max_queued_jobs
    for bad in (0, 1025, True):
        with pytest.raises(InputError, match="queue .* is not a number of requests in 1..1024"):
            serve([str(tmp_path)], model="no-such-model", queue=bad)
