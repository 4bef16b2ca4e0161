"""`create_app(data_dir, tracer=None)`: the local web app's JSON API and its static page.

    GET  /                                   the page (static files from qktrace/web/static, no CDN)
    GET  /api/info                           what is loaded: model, SAE checkpoints, transcoder layers, attention
                                             SAEs (layer, site, width), the graph they build, whether it computes,
                                             the model's line of work (queued or running, its limit, cancelled)
    GET  /api/graphs                         graph JSON files in the data directory (and files given)
    GET  /api/graphs/{name}                  one graph: {"version", "name", "graph": <circuit-tracer JSON>}
    POST /api/graph                          queue a graph build -> job (429 + Retry-After when the queue is
                                             full); saved to the data dir, never over an existing graph
                                             unless the request says "overwrite": true (else 409)
    GET  /api/jobs/{id}                      the job's stage, then the saved graph's name or the error
    POST /api/qk                             QK attribution at (layer, head, query_pos, key_pos), the head's
                                             attention row, inhibitory terms, the query x key heatmaps and the
                                             contrast with the rival key (rival_pos, default the most attended)
    POST /api/sweep                          steer a feature inside chosen heads' QK circuits over scales
                                             (`also`: more feature sets at the same scale, a mechanism's)
    POST /api/compare, POST /api/explain     two aligned prompts head by head; an answer's mechanism (`explain`)
    POST /api/explain/jobs                   `explain` as a job, saved as <stem>.mechanism.json (explain.py)
    GET  /api/mechanisms/{name}              a saved mechanism (GET /api/graphs lists them under `mechanisms`)
    GET  /api/features/{checkpoint}/{f}      a feature's label and dashboard (dashboards.json: contexts, top and
                                             bottom outputs, activation histogram) if any
    GET  /api/features/{kind}/{layer}/{f}    the same for a transcoder ("transcoder") or attention-SAE ("attn")
                                             feature (the dashboards job's blocks.L.transcoder / blocks.L.attn)

Safety (STYLE point 10): the app never unpickles; graph names are plain file names resolved inside the
data directory (`..`, absolute paths, encoded slashes and symlinks out are refused); no CORS; every
response is versioned JSON; QKTraceError -> 4xx {"version": 1, "error": "<its one-line message>"}.
Bounded work (`config.Limits`): request bodies (413), prompt tokens, list lengths, scales, the trace cache
in bytes, and the model's line of work: every route that runs the model (QK, sweep, compare, explain and
both jobs) goes through `Engine.work` (`work.py`): a bounded number queued or running (one more: 429 with
Retry-After), on threads of their own, so the cheap routes (info, listings, job status, the page) answer
at once under load; a client that disconnects has its work stopped at the next layer, or never started.
A bug still answers one line of JSON (500) and the server keeps serving.
Graph files and dashboards: `store`; what needs the model (behind the model's own lock): `compute`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import LIMITS, Limits
from ..errors import Cancelled, GraphFileError, QKTraceError
from ..tracer import Tracer
from . import schemas as S
from .compute import Engine, qk_response, steer_request, sweep_response
from .explain import add_routes as add_explain_routes
from .store import ApiError, Features, GraphStore
from .work import SCOPE_KEY, Token

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent.parent / "web" / "static"
CSP = "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'"


def _hostname(host: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '[::1]'."""
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0]


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    body = {"version": S.API_VERSION, "error": " ".join(message.split())}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def _shown(value: Any) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


class Guard:
    """ASGI wrapper: request bodies past `max_bytes` are refused (413) before anything parses them, a client
    that disconnects cancels its request's model work (`work.Token`), and an exception no handler knew (a
    bug) still answers one line of versioned JSON (500)."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def _send_error(self, send: Any, status: int, message: str) -> None:
        body = json.dumps({"version": S.API_VERSION, "error": message}).encode()
        headers = [(b"content-type", b"application/json"), (b"x-content-type-options", b"nosniff")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = f"the request body is larger than {self.max_bytes} bytes: send less (a shorter prompt or list)"
        length = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            await self._send_error(send, 413, too_big)
            return
        body, more = bytearray(), True
        while more:  # bounded: read the whole (small) body here, then hand it on
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await self._send_error(send, 413, too_big)
                return
        await self._forward(scope, receive, send, bytes(body))

    async def _forward(self, scope: Any, receive: Any, send: Any, body: bytes) -> None:
        """Hand the request on with its body, while watching for the client to go: then its `work.Token` is
        cancelled (its model work stops at the next layer, or never runs) and the app sees the disconnect."""
        token, gone = Token(), anyio.Event()
        scope[SCOPE_KEY] = token  # this request's own scope (not "state", which a server may share)
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            token.cancel("the client disconnected")
            gone.set()

        async def replay() -> Any:
            if pending:
                return pending.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        started = False

        async def tracked(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(watch)
            try:
                await self.app(scope, replay, tracked)
            except Exception as e:
                log.exception("bug answering %s %s", scope.get("method"), str(scope.get("path"))[:120])
                if not started:
                    first = " ".join(str(e).split())[:160]
                    await self._send_error(
                        send, 500, f"internal error ({type(e).__name__}: {first}): see the server log"
                    )
            finally:
                tasks.cancel_scope.cancel()


# -- the app ---------------------------------------------------------------------------------------------


def create_app(
    data_dir: str | Path,
    tracer: Tracer | None = None,
    *,
    files: Sequence[str | Path] = (),
    saes_dir: str | Path | None = None,
    allowed_hosts: Sequence[str] | None = None,
    limits: Limits = LIMITS,
    max_memory: int | None = None,
) -> FastAPI:
    """The web app over graph files in `data_dir` (plus `files`), computing with `tracer` when given.

    `saes_dir`: where to find labels and dashboards without a model. `allowed_hosts`: Host headers to
    accept (`serve` passes the loopback names, which blocks DNS rebinding); None accepts any. `limits`:
    the bounds on requests (`config.LIMITS`). `max_memory`: byte budget of graph builds (full-mode SAE
    graphs, transcoder and checkpointed graphs).
    """
    store = GraphStore(data_dir, files, limits)
    features = Features(tracer, saes_dir)
    engine = Engine(tracer, limits, max_memory) if tracer is not None else None
    app = new_app(store, engine, allowed_hosts)
    add_error_handlers(app)
    add_page(app)
    need_engine = _engine_needed(engine)
    add_info_routes(app, tracer, features)
    add_graph_routes(app, store, need_engine)
    add_model_routes(app, need_engine)
    add_explain_routes(app, need_engine, store)
    app.add_middleware(Guard, max_bytes=limits.max_request_bytes)  # outermost: sees every request and bug
    log.info(
        "app: %d routes over %s, %s; bodies up to %d bytes",
        len(app.routes),
        store.root,
        f"computing with {tracer.model.name}" if tracer is not None else "view only",
        limits.max_request_bytes,
    )
    return app


def new_app(store: GraphStore, engine: Engine | None, allowed_hosts: Sequence[str] | None) -> FastAPI:
    """The app (no docs, no OpenAPI) and its middleware: the Host check and the security headers."""
    app = FastAPI(title="qktrace", version=str(S.API_VERSION), docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store, app.state.engine = store, engine
    hosts = set(allowed_hosts or ())

    @app.middleware("http")
    async def headers(request: Request, call_next: Any) -> Response:
        host = _hostname(request.headers.get("host", ""))
        if hosts and host not in hosts:
            return _error(400, f"host '{host[:80]}' is not served here: open the page at http://127.0.0.1 instead")
        response: Response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
        return response

    log.debug("app: security headers; hosts %s", sorted(hosts) or "any")
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error answers one line of versioned JSON: the library's (400, 422 for graph files), the API's,
    HTTP's (404/405 name the request) and validation's (the first three problems)."""

    @app.exception_handler(QKTraceError)
    async def on_qktrace_error(request: Request, e: QKTraceError) -> JSONResponse:
        if isinstance(e, Cancelled):  # nobody is listening: the answer is for the log and the record
            return _error(503, e.line("http"))
        return _error(422 if isinstance(e, GraphFileError) else 400, e.line("http"))

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, str(e), e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        what = f"{request.method} {request.url.path[:120]}"
        msg = f"{what} is not an endpoint: see GET /api/info" if e.status_code in (404, 405) else str(e.detail)
        if e.status_code == 404 and request.url.path.startswith("/static/"):
            msg = f"no static file {request.url.path[:120]}: the page's files are index.html, app.js, style.css"
        if e.status_code == 400 and "parsing the body" in msg:
            msg = "the request body is not a JSON object (invalid JSON, bytes that are not UTF-8, or nested too deeply)"
        return _error(e.status_code, msg)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        parts = []
        for err in e.errors()[:3]:
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            msg = str(err.get("msg", "invalid"))
            if "input" in err and err.get("type") not in ("missing", "json_invalid"):
                msg += f", got {_shown(err['input'])}"
            parts.append(f"{loc}: {msg}" if loc else msg)
        return _error(422, "bad request: " + "; ".join(parts))

    log.debug("app: error handlers answering one line of versioned JSON")


def add_page(app: FastAPI) -> None:
    """GET / and /static: the page's own files (no CDN)."""

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    log.debug("app: the page from %s", STATIC)


def _engine_needed(engine: Engine | None) -> Callable[[], Engine]:
    """What a route that needs the model calls: the engine, or a 409 naming how to load one."""

    def need_engine() -> Engine:
        if engine is None:
            raise ApiError(409, "no model is loaded (view only): restart with qktrace serve --model PATH --saes DIR")
        return engine

    return need_engine


def add_info_routes(app: FastAPI, tracer: Tracer | None, features: Features) -> None:
    """GET /api/info (what is loaded) and GET /api/features/{checkpoint}/{f} and /{kind}/{layer}/{f} (a
    feature's label, dashboard)."""

    @app.get("/api/info")
    async def info() -> S.InfoResponse:  # on the event loop: answers at once however busy the model is
        engine = app.state.engine
        load = S.Load(**engine.work.load()) if engine is not None else None
        if tracer is None:
            return S.InfoResponse(
                model=None,
                checkpoints=features.checkpoints,
                can_compute=False,
                features=bool(features.d_sae),
                coder_features=features.coder_layers(),
                load=None,
            )
        m, ts, att = tracer.model, tracer.transcoders, tracer.attention_saes
        both = ts is not None and len(tracer.saes) > 0  # which graph to build is ambiguous (Traced.graph_kind)
        return S.InfoResponse(
            model=m.name,
            family=m.family,
            n_layers=m.n_layers,
            n_heads=m.n_heads,
            checkpoints=list(tracer.saes.checkpoints),
            graph=None if both else "sae" if ts is None else "transcoder" if att is None else "checkpointed",
            transcoders=[] if ts is None else list(ts.layers),
            attention_saes=[
                S.AttentionSAEInfo(layer=x.layer, site=x.site, d_sae=x.d_sae) for x in (att or {}).values()
            ],
            can_compute=True,
            features=bool(features.d_sae),
            coder_features=features.coder_layers(),
            load=load,
        )

    @app.get("/api/features/{checkpoint}/{feature}")
    def feature(checkpoint: int, feature: int) -> S.FeatureResponse:
        return features.get(checkpoint, feature)

    @app.get("/api/features/{kind}/{layer}/{feature}")
    def coder_feature(kind: Literal["transcoder", "attn"], layer: int, feature: int) -> S.FeatureResponse:
        return features.get(layer, feature, kind)

    log.debug("app: info and features of %d checkpoints", len(features.d_sae))


def add_graph_routes(app: FastAPI, store: GraphStore, need_engine: Callable[[], Engine]) -> None:
    """GET /api/graphs, GET /api/graphs/{name}; POST /api/graph (a build job) and GET /api/jobs/{id}."""

    @app.get("/api/graphs")
    def graphs() -> S.GraphList:
        return store.listing()

    @app.get("/api/graphs/{name:path}")
    def graph(name: str) -> Response:
        def render(fname: str, data: dict[str, Any]) -> bytes:
            body = {"version": S.API_VERSION, "name": fname, "graph": data}
            return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()

        return Response(store.read_shared(name, render), media_type="application/json")  # one parse for many

    @app.post("/api/graph", status_code=202)
    def build(req: S.GraphRequest) -> S.Job:
        return need_engine().start_graph(req, store).view()

    @app.get("/api/jobs/{job_id}")
    async def job(job_id: str) -> S.Job:  # on the event loop: answers at once however busy the model is
        state = need_engine().job(job_id)
        if state is None:
            raise ApiError(404, f"no job '{job_id[:40]}': jobs live in memory until the server restarts")
        return state.view()

    log.debug("app: graphs in %s and %d files given; graph jobs", store.root, len(store.files))


def add_model_routes(app: FastAPI, need_engine: Callable[[], Engine]) -> None:
    """POST /api/qk (one head's QK attribution) and POST /api/sweep (steering inside heads' QK circuits), each
    run in the engine's bounded line of model work (`Engine.run`: 429 when full, stopped when the client goes)."""

    @app.post("/api/qk")
    async def qk(req: S.QKRequest, request: Request) -> S.QKResponse:
        eng = need_engine()

        def work() -> S.QKResponse:
            ids = eng.ids(req)  # checked before waiting for the model
            with eng.traced(ids) as traced:
                return qk_response(traced, req)

        return await eng.run(request, work)

    @app.post("/api/sweep")
    async def steer(req: S.SweepRequest, request: Request) -> S.SweepResponse:
        eng = need_engine()

        def work() -> S.SweepResponse:
            checked = steer_request(req)  # every check that needs no model, before waiting for it
            ids = eng.ids(req)
            with eng.traced(ids) as traced:
                return sweep_response(traced, checked)

        return await eng.run(request, work)

    log.debug("app: qk and sweep")
