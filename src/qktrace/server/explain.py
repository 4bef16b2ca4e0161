"""The web app's compare and explain endpoints, registered on the app by `add_routes`:

    POST /api/compare    two prompts whose tokens align (text or token ids, e.g. two graphs' tokens) ->
                         every head's attention from the query position in both, the heads that differ
                         most with their QK terms matched component by component, W_QK skew per head
                         (`qktrace.compare`)
    POST /api/explain    a prompt and its answer -> the confirmed QK mechanism and every candidate tried
                         (`qktrace.explain`; seconds on a small model, one request at a time)
    POST /api/explain/jobs   the same as a job (202; poll GET /api/jobs/{id}) that saves the mechanism as
                         `<graph or prompt>.mechanism.json` in the data directory; the job's `graph` names it
    GET  /api/mechanisms/{name}   a saved `*.mechanism.json` (GET /api/graphs lists them under `mechanisms`)

Both need a loaded model (409 otherwise), run in the engine's bounded line of model work (429 when it is
full; stopped when the client disconnects), hold the model's lock while they compute, and answer with
versioned JSON built from the library's own `to_json`.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, Strict, StrictStr, model_validator

from ..analyses.compare import compare
from ..analyses.explain import explain
from ..config import LIMITS
from ..options import CompareOptions, ExplainSettings, doc
from . import schemas as S
from .compute import Engine, JobState, error_text
from .store import MECHANISM, ApiError, GraphStore
from .work import Token as CancelToken

log = logging.getLogger(__name__)

Prompt = Annotated[StrictStr, Field(max_length=LIMITS.max_prompt_chars)]
Token = Annotated[StrictStr, Field(min_length=1, max_length=200)] | S.TokenId  # a token's text, or its id


def _one(text: str | None, tokens: list[int] | None, which: str) -> None:
    if (text is None) == (tokens is None):
        raise ValueError(f"give exactly one of 'prompt_{which}' (text) or 'tokens_{which}' (token ids)")
    if (text is not None and not text.strip()) or tokens == []:
        given = f"prompt_{which}" if text is not None else f"tokens_{which}"
        raise ValueError(f"{given} is empty: give at least one token of prompt {which.upper()}")


class CompareRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt_a: Prompt | None = None
    tokens_a: list[S.TokenId] | None = None
    prompt_b: Prompt | None = None
    tokens_b: list[S.TokenId] | None = None
    query_pos: S.Int = Field(-1, description="the attending position (negative counts from the end)")
    answer: Token | None = Field(None, description="a token: logit(answer) - logit(rival) in both prompts")
    rival: Token | None = None
    top: Annotated[int, Strict(), Field(ge=0, le=64)] = Field(
        CompareOptions().top, description=doc(CompareOptions, "top")
    )
    top_terms: Annotated[int, Strict(), Field(ge=0, le=200)] = Field(
        CompareOptions().top_terms, description=doc(CompareOptions, "top_terms")
    )

    @model_validator(mode="after")
    def _prompts(self) -> CompareRequest:
        _one(self.prompt_a, self.tokens_a, "a")
        _one(self.prompt_b, self.tokens_b, "b")
        return self


class HeadDiffOut(BaseModel):
    layer: int
    head: int
    key_pos: int
    attention_a: float
    attention_b: float
    diff: float
    skew: float


class TermDiffOut(BaseModel):
    query: str
    key: str
    query_label: str
    key_label: str
    value_a: float
    value_b: float
    diff: float


class HeadTermsOut(BaseModel):
    layer: int
    head: int
    query_pos: int
    key_pos: int
    score_a: float
    score_b: float
    terms: list[TermDiffOut]
    rest: float
    n_terms: int


class PatchingOut(BaseModel):
    heads: list[list[int]] = Field(description="(layer, head) of the top heads, in compare's order")
    alone: list[float] = Field(description="per head: the change of m in A with its pattern taken from B")
    together: float = Field(description="the change of m in A with every one of them patched from B")
    total: float = Field(description="m(B) - m(A)")
    share: float | None = Field(description="together / total (None when m does not differ)")


class CompareResponse(S.Versioned):
    model: str
    prompt_a: str
    prompt_b: str
    str_tokens_a: list[str]
    str_tokens_b: list[str]
    differing: list[int] = Field(description="positions whose tokens differ")
    query_pos: int
    answer: str | None
    rival: str | None
    metric_a: float | None
    metric_b: float | None
    patching: PatchingOut | None = Field(
        None, description="with an answer: the top heads' patterns patched from B into A, others frozen"
    )
    heads: list[HeadDiffOut] = Field(description="every head, largest |attention_b - attention_a| first")
    terms: list[HeadTermsOut] = Field(description="the top heads' QK terms at (query, key), matched by component")
    attention_a: list[list[list[float]]] = Field(description="[layer][head][key] attention from query_pos")
    attention_b: list[list[list[float]]]
    skew: list[list[float]] = Field(description="[layer][head] W_QK eigenvalue sign skew")


class ExplainRequest(S.PromptRequest):
    answer: Token
    rival: Token | None = None
    side: Literal["auto", "query", "key"] = "auto"
    null_draws: Annotated[int, Strict(), Field(ge=0, le=1000)] = Field(
        ExplainSettings().null_draws, description=doc(ExplainSettings, "null_draws")
    )
    null_seed: Annotated[int, Strict(), Field(ge=0)] = Field(
        ExplainSettings().null_seed, description=doc(ExplainSettings, "null_seed")
    )


class ExplainResponse(S.Versioned):
    model: str
    mechanism: dict[str, Any] = Field(description="`Mechanism.to_json()`: heads, sites, candidates, the best")


class ExplainJobRequest(ExplainRequest):
    name: Annotated[StrictStr, Field(min_length=1, max_length=150)] | None = Field(
        None, description="the file's stem (e.g. the graph's name): saved as <stem>.mechanism.json, made unique"
    )


def start_explain(engine: Engine, store: GraphStore, req: ExplainJobRequest) -> JobState:
    """Check the prompt, then run `explain` on its own thread; the job names the saved file when done."""
    ids = engine.ids(req)  # checked (and held to the token limit) before the job starts
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", (req.name or req.prompt or "explained").removesuffix(".json"))
    stem = stem.removesuffix(".graph").strip("-.")[:60] or "explained"
    names = (f"{stem}{'' if i == 1 else f'-{i}'}{MECHANISM}" for i in range(1, 1000))
    fname = next((f for f in names if not store.exists(f)), None)
    if fname is None:
        raise ApiError(409, f"mechanisms named {stem}-*{MECHANISM} fill the data directory: give this one a name")
    job = JobState(uuid.uuid4().hex[:12], stage="waiting for the model")

    def work() -> None:
        try:
            with engine.traced(ids):  # holds the model's lock
                job.stage = "explaining: ablating heads, then steering candidate feature sets"
                m = explain(engine.tracer, list(ids), req.answer, req.rival, req.side)
            job.stage = "saving"
            store.root.mkdir(parents=True, exist_ok=True)
            m.save_json(store.root / fname)
            job.graph, job.status, job.stage = fname, "done", "done"
        except Exception as e:  # every failure is the job's state; the server keeps serving
            log.info("explain job %s failed: %s", job.id, e)
            job.error, job.stage, job.status = error_text(e), "failed", "error"

    with engine.jobs_lock:
        engine.work.submit(work, CancelToken(), f"explain job {job.id}")  # 429 when the line is full
        engine.jobs[job.id] = job
    return job


def compare_response(engine: Engine, req: CompareRequest) -> CompareResponse:
    # both prompts checked (and held to the token limit) before waiting for the model
    ids_a = engine.ids(S.PromptRequest(prompt=req.prompt_a, tokens=req.tokens_a), "_a")
    ids_b = engine.ids(S.PromptRequest(prompt=req.prompt_b, tokens=req.tokens_b), "_b")
    with engine.traced(ids_a) as a:  # holds the model's lock
        b = engine.tracer.run(list(ids_b))
        c = compare(
            a, b, query_pos=req.query_pos, answer=req.answer, rival=req.rival, top=req.top, top_terms=req.top_terms
        )
        return CompareResponse(model=engine.tracer.model.name, **c.to_json())


def explain_response(engine: Engine, req: ExplainRequest) -> ExplainResponse:
    ids = engine.ids(req)  # checked before waiting for the model
    with engine.traced(ids):  # holds the model's lock
        settings = ExplainSettings(null_draws=req.null_draws, null_seed=req.null_seed)
        m = explain(engine.tracer, list(ids), req.answer, req.rival, req.side, settings=settings)
        return ExplainResponse(model=engine.tracer.model.name, mechanism=m.to_json())


def add_routes(app: FastAPI, need_engine: Callable[[], Engine], store: GraphStore) -> None:
    """Register POST /api/compare, POST /api/explain (and its job) and GET /api/mechanisms/{name} on `app`."""

    @app.post("/api/explain/jobs", status_code=202)
    def explain_job(req: ExplainJobRequest) -> S.Job:
        return start_explain(need_engine(), store, req).view()

    @app.get("/api/mechanisms/{name:path}")
    def mechanism(name: str) -> dict[str, Any]:
        fname, data = store.read_mechanism(name)
        return {"version": S.API_VERSION, "name": fname, "mechanism": data}

    @app.post("/api/compare")
    async def compare_prompts(req: CompareRequest, request: Request) -> CompareResponse:
        engine = need_engine()
        return await engine.run(request, lambda: compare_response(engine, req))

    @app.post("/api/explain")
    async def explain_answer(req: ExplainRequest, request: Request) -> ExplainResponse:
        engine = need_engine()
        return await engine.run(request, lambda: explain_response(engine, req))
