"""What the app computes with a loaded model: graphs (as background jobs), QK explanations, sweeps.

The model is used behind one lock (its hooks are not thread-safe), with a few traced prompts cached by
token ids. Every number comes from the library (`Traced.qk`, `Traced.graph`, `interventions.sweep`);
this module only picks keys, rivals and inhibitory terms and shapes them into `schemas`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..errors import InputError, QKTraceError, check_index
from ..interventions import SCALE, FreezeAttention, SteerFeature, SteerQK, parse_scales, sweep
from ..tracer import Traced, Tracer
from . import schemas as S
from .store import NAME, GraphStore, graph_name

log = logging.getLogger(__name__)
MAX_SCALES, TRACE_CACHE, MAX_JOBS = 41, 4, 64


@dataclass
class JobState:
    id: str
    started: float = field(default_factory=time.monotonic)
    status: Literal["running", "done", "error"] = "running"
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


class Engine:
    def __init__(self, tracer: Tracer):
        self.tracer = tracer
        self.lock = threading.Lock()  # the model's hooks and its (fast, not thread-safe) tokenizer
        self._traced: OrderedDict[tuple[int, ...], Traced] = OrderedDict()
        self.jobs: OrderedDict[str, JobState] = OrderedDict()

    def ids(self, req: S.PromptRequest) -> list[int]:
        """Token ids of the request's prompt (call with the lock held)."""
        prompt: str | list[int] = req.prompt if req.prompt is not None else (req.tokens or [])
        return self.tracer.model.tokenize(prompt).tolist()

    @contextmanager
    def traced(self, req: S.PromptRequest) -> Iterator[Traced]:
        """The traced prompt, holding the model lock for the duration."""
        with self.lock:
            key = tuple(self.ids(req))
            if key not in self._traced:
                self._traced[key] = self.tracer.run(list(key))
                while len(self._traced) > TRACE_CACHE:
                    self._traced.popitem(last=False)
            self._traced.move_to_end(key)
            yield self._traced[key]

    def start_graph(self, req: S.GraphRequest, store: GraphStore) -> JobState:
        # checked here without the model (a running build holds it); the rest fails in the job
        if (req.prompt is not None and not req.prompt.strip()) or req.tokens == []:
            raise InputError("the prompt is empty: give at least one token of text")
        name = req.name or graph_name(req)
        if not NAME.match(name if name.endswith(".json") else f"{name}.json"):
            raise InputError(f"graph name {name!r} is not a plain file name: use letters, digits, '.', '_', '-'")
        job = JobState(uuid.uuid4().hex[:12])
        self.jobs[job.id] = job
        while len(self.jobs) > MAX_JOBS:
            self.jobs.popitem(last=False)
        threading.Thread(target=self._build, args=(job, req, store, name), daemon=True).start()
        return job

    def _build(self, job: JobState, req: S.GraphRequest, store: GraphStore, name: str) -> None:
        try:
            job.stage = "waiting for the model"
            with self.traced(req) as traced:
                job.stage = "building the graph"
                graph = traced.graph(
                    node_threshold=req.node_threshold,
                    edge_threshold=req.edge_threshold,
                    max_nodes=req.max_nodes,
                    progress=False,
                    qk_terms=req.qk_terms,
                )
                data = graph.to_json()
            job.stage = "saving"
            job.graph = store.save(name, data)
            job.status, job.stage = "done", "done"
        except QKTraceError as e:
            job.status, job.error = "error", str(e)
        except Exception as e:  # a bug: keep serving, say what happened
            log.exception("graph job %s failed", job.id)
            job.status, job.error = "error", f"internal error ({type(e).__name__}: {e}): see the server log"


# -- QK and sweeps -------------------------------------------------------------------------------------


def _plain_label(qk: Any, component: str) -> str:
    """Label of a position-less component ('feature/c3/f12' -> its label, 'error/c3' -> 'error')."""
    parts = component.split("/")
    if parts[0] == "feature":
        f = int(parts[-1][1:])
        return str(qk.feature_labels.get(f, f"f{f}"))
    return parts[0]


def qk_response(traced: Traced, req: S.QKRequest) -> S.QKResponse:
    row = traced.qk(req.layer, req.head, req.query_pos)  # every key the query may see
    if req.key_pos is None:
        key = row.key_positions[int(row.pattern.argmax())]
    else:
        key = check_index(req.key_pos, traced.trace.n_pos, "key position", allow_negative=True)
    single = traced.qk(row.layer, row.head, row.query_pos, key)  # OutOfRangeError if masked
    effects = row.prob_effects(key)  # [q_component, k_component] first-order effect on p(key)
    flat = effects.flatten()
    order = torch.argsort(flat)[: req.top]
    inhibitory = []
    for i in order[flat[order] < 0].tolist():
        qi, ki = divmod(i, effects.shape[1])
        q_id, k_id = row.query.id(qi), row.key.id(ki)
        value, unrot = float(row.terms[qi, ki]), float(row.unrotated[qi, ki])
        inhibitory.append(
            S.QKTerm(
                query=q_id,
                query_label=row.label(q_id),
                key=k_id,
                key_label=row.label(k_id),
                key_pos=int(row.key.pos[ki]),
                value=value,
                unrotated=unrot,
                positional=value - unrot,
                prob_effect=float(flat[i]),
            )
        )
    contrast = None
    others = [i for i, k in enumerate(row.key_positions) if k != key]
    if others:
        rival = row.key_positions[max(others, key=lambda i: float(row.pattern[i]))]
        df = row.contrast(key, rival, top=req.top)
        terms = [
            S.ContrastTerm(
                query=r.query,
                query_label=r.query_label,
                key=r.key,
                key_label=_plain_label(row, r.key),
                value_a=r.value_a,
                value_b=r.value_b,
                diff=r.diff,
            )
            for r in df.itertuples(index=False)
        ]
        contrast = S.Contrast(key_a=key, key_b=rival, score_diff=df.attrs["score_diff"], terms=terms)
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
        contrast=contrast,
    )


def sweep_response(traced: Traced, req: S.SweepRequest) -> S.SweepResponse:
    model, saes = traced.model, traced.saes
    scales = parse_scales(req.scales)
    if not 1 <= len(scales) <= MAX_SCALES:
        raise InputError(f"{len(scales)} scales given: a sweep takes 1..{MAX_SCALES} (e.g. '-2:4:7')")
    layers = {check_index(ly, model.n_layers, "layer") for ly, _ in req.heads}
    if len(layers) > 1:
        raise InputError(f"heads span layers {sorted(layers)}: QK steering steers heads of one layer at a time")
    checkpoint = req.checkpoint if req.checkpoint is not None else next(iter(layers), None)
    if checkpoint is None:
        raise InputError("give heads [[layer, head], ...] to steer inside QK circuits, or a checkpoint to steer")
    if layers and checkpoint not in layers:
        raise InputError(
            f"heads of layer {min(layers)} read checkpoint {min(layers)}, not {checkpoint}: "
            f"pick a feature of checkpoint {min(layers)} or leave checkpoint out"
        )
    d_sae = traced.sae(checkpoint).d_sae
    check_index(req.feature, d_sae, f"checkpoint {checkpoint} feature")
    positions = [req.positions] if isinstance(req.positions, int) else list(req.positions)
    ivs: list[Any]
    amount = {req.mode: SCALE}  # the swept number scales the activation, or replaces it
    if req.heads:
        heads = tuple(check_index(h, model.n_heads, "head") for _, h in req.heads)
        ivs = [SteerQK(checkpoint, heads, req.side, req.feature, positions, **amount)]
    else:
        ivs = [SteerFeature(checkpoint, req.feature, positions, **amount)]
    if req.freeze_others:
        ivs.append(FreezeAttention())
    ids = traced.trace.tokens
    df = sweep(model, saes, ids, ivs, scales, req.watch_tokens, req.watch_attention, top_k=req.top_k)
    rows = [{k: _finite(v) for k, v in r.items()} for r in df.to_dict(orient="records")]
    return S.SweepResponse(columns=[str(c) for c in df.columns], rows=rows)


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v
