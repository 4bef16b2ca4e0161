"""What the app computes with a loaded model: graphs (as queued jobs), QK explanations, sweeps.

Every request is checked before it waits for the model: the prompt is tokenized by a private copy of the
tokenizer and held to the server's token limit, graph options and steering requests go through
`qktrace.steering.requests` (the CLI's checks). Then the model is used behind its own lock (`Model.seam`:
its hooks are per model, and one model runs one forward pass at a time; requests to other models do not
wait), with traced prompts cached by token ids up to `Limits.trace_cache_bytes`.

Every piece of model work (requests and jobs) goes through `Engine.work` (`work.py`): at most
`Limits.max_queued_jobs` are queued or running, one more is answered 429 with Retry-After; they take
the model in the order they came, and one whose client has gone stops at the next layer. A queued or
running job is never forgotten; finished ones are, oldest first, past `Limits.max_finished_jobs`. A
failed job reports its error as its state.

Every number comes from the library (`Traced.qk`, `QKAttribution.effects_frame` / `contrast` / `heatmap`,
`Traced.graph`, `sweep.sweep`); this module only picks keys and rivals and shapes the results
into `schemas`.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import pandas as pd
from starlette.requests import Request

from ..config import LIMITS, Limits
from ..errors import InputError, QKTraceError, check_index
from ..graph.formats import check_name
from ..models import Model
from ..options import GraphOptions, SweepOptions
from ..qk import QKAttribution
from ..steering.requests import Checked, SteerPart, SteerRequest, build_steering, check_request, check_text
from ..tracer import Traced, Tracer
from . import schemas as S
from .store import ApiError, GraphStore, graph_name
from .work import POLL_S, SCOPE_KEY, Token, Turns, Work, checkpoints, current

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class JobState:
    id: str
    started: float = field(default_factory=time.monotonic)
    status: Literal["running", "done", "error"] = "running"  # "running" while queued, too
    stage: str = "queued"
    graph: str | None = None
    error: str | None = None

    def view(self) -> S.Job:
        return S.Job(
            id=self.id,
            status=self.status,
            stage=self.stage,
            elapsed_s=round(time.monotonic() - self.started, 2),
            graph=self.graph,
            error=self.error,
        )


@dataclass(frozen=True)
class _GraphJob:
    job: JobState
    ids: tuple[int, ...]
    options: GraphOptions
    names: dict[str, str]  # slug and scan, when the request names them
    name: str
    overwrite: bool


def error_text(e: BaseException) -> str:
    if isinstance(e, QKTraceError):
        return " ".join(e.line("http").split())
    if isinstance(e, ApiError):
        return " ".join(str(e).split())
    if isinstance(e, MemoryError) or "out of memory" in str(e) or "can't allocate memory" in str(e):
        return (
            "out of memory while building the graph: use a shorter prompt, or start the server with a smaller "
            "budget (`qktrace serve --max-memory SIZE`)"
        )
    first = " ".join(str(e).split())[:200]
    return f"internal error ({type(e).__name__}: {first}): see the server log"


class Engine:
    def __init__(self, tracer: Tracer, limits: Limits = LIMITS, max_memory: int | None = None):
        self.tracer = tracer
        self.limits = limits
        self.max_memory = max_memory
        # the model's own lock (its seam's: its hooks, its fast but not thread-safe tokenizer, the traces cached
        # here); another model, in this process or another server, has its own and never waits for this one
        self.lock = tracer.model.seam.lock
        self._tok_lock = threading.Lock()
        self._tokenizing = self._twin(tracer.model)
        self._traced: OrderedDict[tuple[int, ...], Traced] = OrderedDict()
        self.jobs: OrderedDict[str, JobState] = OrderedDict()
        self.jobs_lock = threading.Lock()
        self.work = Work(limits.max_queued_jobs, limits.retry_after_s)  # every piece of model work, bounded
        self.turns = Turns()  # the order they take the model in

    @staticmethod
    def _twin(model: Model) -> Model | None:
        """The model with a private copy of its tokenizer, so that requests are tokenized (and refused)
        without waiting for the model lock. None when the tokenizer cannot be copied."""
        if model.tokenizer is None:
            return model
        try:
            twin = copy.copy(model)
            twin.tokenizer = copy.deepcopy(model.tokenizer)
            return twin
        except Exception as e:  # tokenize under the model lock instead
            log.info("tokenizing under the model lock (%s)", e)
            return None

    # -- prompts ---------------------------------------------------------------------------------------
    def ids(self, req: S.PromptRequest, suffix: str = "") -> tuple[int, ...]:
        """Token ids of the request's prompt, held to the server's token limit; without the model lock.
        A refusal names the request's field: 'prompt' or 'tokens', plus `suffix` ("_b" for compare's B)."""
        limit = self.limits.server_max_tokens
        field = ("prompt" if req.prompt is not None else "tokens") + suffix
        if req.prompt is not None:
            check_text(req.prompt, field)
            if self._tokenizing is None:
                with self.lock:
                    ids = self.tracer.model.tokenize(req.prompt, what=field)
            else:
                with self._tok_lock:
                    ids = self._tokenizing.tokenize(req.prompt, what=field)
            n = int(ids.shape[0])
        else:
            n = len(req.tokens or [])
            if n == 0:
                raise InputError(f"{field} is empty: give at least one token")
        if n > limit:
            raise InputError(
                f"{field} is {n:,} tokens, more than the {limit:,} this server traces: shorten it, "
                f"or start the server with `qktrace serve --max-tokens {n}`"
            )
        if req.prompt is None:
            ids = self.tracer.model.tokenize(req.tokens or [], what=field)  # checks ids against the vocabulary
        return tuple(int(i) for i in ids.tolist())

    async def run(self, request: Request, fn: Callable[[], T]) -> T:
        """Run a request's model work `fn` (its checks, then the model) in `work`, cancelled when the client goes."""
        token = request.scope.get(SCOPE_KEY) or Token()
        future = self.work.submit(fn, token, f"{request.method} {request.url.path[:80]}")
        try:
            return await asyncio.wrap_future(future)
        finally:
            if not future.done():
                token.cancel("the request was cancelled")

    @contextmanager
    def holding(self) -> Iterator[None]:
        """The model for the running piece of work: its turn, then the model's lock (503 after
        `Limits.model_wait_s` in all), with a cancellation checkpoint before every layer while held."""
        token, wait = current(), self.limits.model_wait_s
        deadline = time.monotonic() + wait
        with self.turns.turn(token, wait, self.limits.retry_after_s):
            while not self.lock.acquire(timeout=POLL_S):
                token.check("before it ran")
                if time.monotonic() > deadline:
                    raise ApiError(
                        503,
                        f"the model has been busy for {wait:.0f} s (a graph is being built): try again",
                        {"Retry-After": str(self.limits.retry_after_s)},
                    )
            try:
                with checkpoints(self.tracer.model.blocks):
                    yield
            finally:
                self.lock.release()

    @contextmanager
    def traced(self, ids: tuple[int, ...]) -> Iterator[Traced]:
        """The traced prompt, holding the model (`holding`) for the duration."""
        with self.holding():
            yield self._cached(ids)
            self._evict()  # what the request computed (SAE encodings, patterns) counts too

    def _cached(self, key: tuple[int, ...]) -> Traced:
        hit = self._traced.get(key)
        if hit is not None:
            self._traced.move_to_end(key)
            self._evict()
            return hit
        traced = self.tracer.run(list(key))
        if traced.nbytes <= self.limits.trace_cache_bytes:
            self._traced[key] = traced
            self._evict()
        return traced

    @property
    def _cached_bytes(self) -> int:
        """What the cached prompts hold now (a traced prompt grows as SAE encodings and patterns are made)."""
        return sum(t.nbytes for t in self._traced.values())

    def _evict(self) -> None:
        """Least recently used out until the cache fits."""
        while self._traced and self._cached_bytes > self.limits.trace_cache_bytes:
            self._traced.popitem(last=False)

    # -- graph jobs ------------------------------------------------------------------------------------
    def start_graph(self, req: S.GraphRequest, store: GraphStore) -> JobState:
        """Check the request (options, prompt, token limit, name) and queue it; 429 when the queue is full."""
        options = GraphOptions(
            node_threshold=req.node_threshold,
            edge_threshold=req.edge_threshold,
            max_nodes=req.max_nodes,
            qk_terms=req.qk_terms,
            max_memory=self.max_memory,
        )
        names = {w: check_name(getattr(req, w), w) for w in ("slug", "scan") if getattr(req, w) is not None}
        ids = self.ids(req)
        with self.jobs_lock:
            name = store.plan_name(req.name, graph_name(req, self.tracer.model.name), req.overwrite)
            job = JobState(uuid.uuid4().hex[:12])
            item = _GraphJob(job, ids, options, names, name, req.overwrite)
            self.work.submit(lambda: self._build(item, store), Token(), f"graph job {job.id}")  # 429 when full
            self.jobs[job.id] = job
            self._forget_finished()
        return job

    def job(self, job_id: str) -> JobState | None:
        with self.jobs_lock:
            return self.jobs.get(job_id)

    def _forget_finished(self) -> None:
        finished = [j.id for j in self.jobs.values() if j.status != "running"]  # oldest first
        for jid in finished[: max(0, len(finished) - self.limits.max_finished_jobs)]:
            del self.jobs[jid]

    def _build(self, item: _GraphJob, store: GraphStore) -> None:
        job = item.job
        try:
            job.stage = "waiting for the model"
            with self.holding():
                job.stage = "building the graph"
                graph = self._cached(item.ids).graph(
                    item.options, slug=item.names.get("slug"), scan=item.names.get("scan"), progress=False
                )
                data = graph.to_json()
            job.stage = "saving"
            job.graph = store.save(item.name, data, overwrite=item.overwrite)
            job.status, job.stage = "done", "done"
        except Exception as e:  # every failure is the job's state; the server keeps serving
            if not isinstance(e, QKTraceError | ApiError):
                log.exception("graph job %s failed", job.id)
            job.error, job.stage, job.status = error_text(e), "failed", "error"


# -- QK and sweeps -------------------------------------------------------------------------------------


def qk_response(traced: Traced, req: S.QKRequest) -> S.QKResponse:
    n = traced.trace.n_pos
    key = None if req.key_pos is None else check_index(req.key_pos, n, "key position", allow_negative=True)
    rival = None if req.rival_pos is None else check_index(req.rival_pos, n, "rival key position", allow_negative=True)
    row = traced.qk(req.layer, req.head, req.query_pos)  # every key the query may see
    if key is None:
        key = row.key_positions[int(row.pattern.argmax())]
    rival = _rival(row, key, rival)
    single = traced.qk(row.layer, row.head, row.query_pos, key)  # OutOfRangeError if masked
    effects = row.effects_frame(target_key=key, top=req.top, inhibitory=True)
    inhibitory = [
        S.EffectTerm.model_validate(r) for r in effects.to_dict(orient="records") if float(r["prob_effect"]) < 0
    ]
    heatmaps = [S.Heatmap.model_validate(single.heatmap(S.HEATMAP_TOP, key, only)) for only in (False, True)]
    return S.QKResponse(
        model=traced.model.name,
        str_tokens=list(traced.str_tokens),
        layer=row.layer,
        head=row.head,
        query_pos=row.query_pos,
        key_pos=key,
        qk=S.QKAttributionOut.model_validate(single.to_json(req.top)),
        row=S.AttentionRow(
            key_positions=list(row.key_positions), pattern=row.pattern.tolist(), score=row.score.tolist()
        ),
        inhibitory=inhibitory,
        contrast=None if rival is None else _contrast(row, key, rival, req.top),
        heatmap=heatmaps[0],
        heatmap_features=heatmaps[1],
    )


def _rival(row: QKAttribution, key: int, rival: int | None) -> int | None:
    """The key to contrast with: `rival` when the query sees it and it is not the key (else a one-line
    InputError), by default the most attended other key; None when the query sees one key."""
    others = [k for k in row.key_positions if k != key]
    if rival is not None and rival not in others:
        why = "the key itself" if rival == key else "a key the query cannot see"
        raise InputError(f"rival key position {rival} is {why}: give another of {others[:20]}")
    if rival is None and others:
        rival = max(others, key=lambda k: float(row.pattern[row.key_positions.index(k)]))
    return rival


def _contrast(row: QKAttribution, key: int, rival: int, top: int) -> S.Contrast:
    """Why `key` rather than `rival`: `QKAttribution.contrast`'s `top` terms and the sum of the rest."""
    df = row.contrast(key, rival, top=None)
    shown = df.head(top)
    terms = [
        S.ContrastTerm(
            query=r.query,
            query_label=r.query_label,
            key=r.key,
            key_label=row.plain_label(r.key),
            value_a=r.value_a,
            value_b=r.value_b,
            diff=r.diff,
        )
        for r in shown.itertuples(index=False)
    ]
    rest = float(df["diff"].sum() - shown["diff"].sum())
    return S.Contrast(key_a=key, key_b=rival, score_diff=df.attrs["score_diff"], terms=terms, rest=rest)


def _positions(p: int | list[int]) -> int | list[int]:
    return p if isinstance(p, int) else list(p)


def steer_request(req: S.SweepRequest) -> Checked:
    """The sweep request as the CLI's `SteerRequest`, checked without the model (`steering.requests.check_request`)."""
    positions = _positions(req.positions)
    return check_request(
        SteerRequest(
            feature=req.feature,
            positions=positions,
            heads=[(ly, h) for ly, h in req.heads],
            checkpoint=req.checkpoint,
            watch_tokens=list(req.watch_tokens),
            watch_attention=list(req.watch_attention),
            also=[
                SteerPart([(ly, h) for ly, h in x.heads], list(x.features), _positions(x.positions), x.side)
                for x in req.also
            ],
            options=SweepOptions(
                scales=req.scales if isinstance(req.scales, str) else tuple(req.scales),
                side=req.side,
                mode=req.mode,
                freeze_others=req.freeze_others,
                top_k=req.top_k,
            ),
            kind=req.kind,
            feature_layer=req.feature_layer,
        )
    )


def sweep_response(traced: Traced, checked: Checked) -> S.SweepResponse:
    df: pd.DataFrame = build_steering(traced, checked).run()
    rows = [_finite(r) for r in df.to_dict(orient="records")]
    return S.SweepResponse(columns=[str(c) for c in df.columns], rows=rows)


def _finite(v: Any) -> Any:
    """Non-finite floats become null (JSON has no NaN)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v
