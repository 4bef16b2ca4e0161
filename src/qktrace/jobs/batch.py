"""Batch tracing: a JSONL of prompts in, one folder of results out; in one process or on Ray workers.

Each line of the prompts file is a JSON object: {"prompt": "...", "answer": " Sally", "rival": " Peter",
"id": "aunt-1"}; only "prompt" is required ("answer" and "rival" are single tokens; "id" names the
prompt's folder, by default p00000, p00001, ... in line order). Per prompt, under `prompts/ID/`:

1. `graph.json`: the attribution graph with head loadings and QK terms (what `Graph.save` writes);
2. `qk.json`: the QK attribution row (query = the last position, every key) of the graph's `qk_rows` top
   heads by cross-position influence;
3. `explain.json`: `qktrace.explain`'s mechanism, when the prompt names an answer;
4. `summary.json`: the prompt's row of the summary table, written last: it marks the prompt done.

Across prompts: `summary.jsonl` (and `summary.parquet` when pyarrow is installed), in prompt order. A
restarted job skips prompts whose summary.json was written for the same prompt, answer and rival
(`qktrace.jobs.runner`): the job is its options, model and SAEs, so a corrected or extended prompts file
resumes and only the changed lines are traced again. Every line is checked (JSON, ids, answer and rival
single tokens and different) before any work. The files are the same whatever the number of workers, and
the same as tracing each prompt alone (`trace_prompt`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from typing_extensions import Unpack

from ..analyses.control import carrier_heads
from ..analyses.explain import explain
from ..errors import InputError, QKTraceError
from ..files import atomic_open, atomic_write
from ..models.tokens import Contrast
from ..options import BatchOptions  # re-exported: the job's settings, declared with the others
from ..tracer import Tracer
from .corpus import jsonl_records
from .pool import ShardResult, TracerSpec, replica
from .runner import JobSpec, ModelArg, PathArg, RunArgs, check_args, run_job

log = logging.getLogger(__name__)

VERSION = 1  # of the files written
JOB_VERSION = 2  # of the job's identity (2: the prompts are not part of it; each summary names its prompt)
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
SUMMARY_COLUMNS = (
    "id", "prompt", "n_tokens", "top_token", "top_prob", "answer", "answer_prob", "answer_rank", "rival", "rival_prob",
    "logit_diff", "n_nodes", "n_features", "n_edges", "completeness", "replacement", "top_heads", "explained",
)  # fmt: skip


@dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt: str
    answer: str | None = None
    rival: str | None = None
    line: int = 0


def read_prompts(path: str | os.PathLike[str]) -> list[PromptRecord]:
    """Every prompt of a JSONL file, checked: one line naming the file, line and fix for anything wrong."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f'prompts file {p} does not exist: pass a JSONL file with one {{"prompt": ...}} per line')
    out: list[PromptRecord] = []
    seen: dict[str, int] = {}
    for n, rec in jsonl_records(p):
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
            raise InputError(f'{p} line {n} has no non-empty "prompt" string: give each line its prompt')
        for key in ("answer", "rival", "id"):
            if rec.get(key) is not None and not isinstance(rec[key], str):
                raise InputError(f'{p} line {n}: "{key}" must be a string')
        if rec.get("rival") is not None and rec.get("answer") is None:
            raise InputError(f'{p} line {n} names a "rival" but no "answer": add the answer')
        if rec.get("rival") is not None and rec["rival"] == rec["answer"]:
            raise InputError(f'{p} line {n}: the "rival" is the "answer" itself: name another token, or drop it')
        pid = rec.get("id") or f"p{len(out):05d}"
        if not _ID.match(pid):
            raise InputError(f"{p} line {n}: id {pid!r} must be letters, digits, '.', '_' or '-' (a folder name)")
        if pid in seen:
            raise InputError(f"{p} line {n}: id {pid!r} is already used on line {seen[pid]}: make ids unique")
        seen[pid] = n
        out.append(PromptRecord(pid, rec["prompt"], rec.get("answer"), rec.get("rival"), n))
    if not out:
        raise InputError(f"prompts file {p} holds no prompts")
    return out


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "to_json"):
        return obj.to_json()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return json.loads(json.dumps(dataclasses.asdict(obj), default=str))
    return obj


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n").encode()


def trace_prompt(tracer: Tracer, record: PromptRecord, options: BatchOptions | None = None) -> dict[str, bytes]:
    """Every file of one prompt (relative to the output folder; summary.json last): what `trace_batch`
    writes for it, on any worker."""
    o = options or BatchOptions()
    model = tracer.model
    traced = tracer.run(record.prompt)
    graph = traced.graph(o.graph, progress=False)
    files: dict[str, bytes] = {}
    base = f"prompts/{record.id}"
    files[f"{base}/graph.json"] = json.dumps(graph.to_json(), separators=(",", ":"), allow_nan=False).encode()
    if graph.settings.get("graph") == "transcoder":  # no head loadings: the heads that carry it most directly
        heads = carrier_heads(traced, graph, o.qk_rows)
    else:
        heads = graph.top_heads(o.qk_rows)
    rows = []
    for h in heads:
        if h["layer"] not in tracer.saes and tracer.transcoders is None:
            continue
        att = traced.qk(h["layer"], h["head"], -1)
        rows.append({"influence": h["influence"], **att.to_json(top=o.qk_top)})
    files[f"{base}/qk.json"] = _dumps(
        {"version": VERSION, "id": record.id, "str_tokens": list(traced.str_tokens), "heads": rows}
    )
    logits = traced.trace.last_logits.float()
    probs = torch.softmax(logits, -1)
    top = int(logits.argmax())
    row: dict[str, Any] = {c: None for c in SUMMARY_COLUMNS}
    row |= {"id": record.id, "prompt": record.prompt, "n_tokens": len(traced.str_tokens)}
    row |= {"top_token": model.str_tokens([top])[0], "top_prob": float(probs[top]), "explained": False}
    if record.answer is not None:
        pair = Contrast.resolve(model, record.answer, record.rival, logits)
        a, r = pair.answer_id, pair.rival_id
        row |= {"answer": record.answer, "answer_prob": float(probs[a]), "answer_rank": int((logits > logits[a]).sum())}
        if pair.rival_given:  # no default rival here: the summary's rival is the one the prompt names
            row |= {"rival": record.rival, "rival_prob": float(probs[r]), "logit_diff": pair.metric(logits)}
        if o.explain:
            mechanism = explain(tracer, record.prompt, record.answer, rival=record.rival)
            files[f"{base}/explain.json"] = _dumps(_jsonable(mechanism))
        row["explained"] = o.explain
    s = graph.summary()
    row |= {k: s[k] for k in ("n_nodes", "n_features", "n_edges", "completeness", "replacement")}
    row["top_heads"] = ", ".join(f"L{h['layer']}H{h['head']} ({h['influence']:.0%})" for h in heads)
    files[f"{base}/summary.json"] = _dumps(row)
    return files


class BatchWorker:
    """One model replica: `check(records)` (token checks before any heavy work), then `process` per prompt."""

    def __init__(self, source: TracerSpec | Tracer, options: BatchOptions) -> None:
        self.tracer = replica(source)
        self.options = options

    def check(self, records: list[PromptRecord], where: str) -> None:
        for r in records:
            try:
                self.tracer.tokenize(r.prompt)
                if r.answer is not None:  # each a single token, the rival not the answer
                    Contrast.tokens(self.tracer.model, r.answer, r.rival)
            except QKTraceError as e:
                raise InputError(f"{where} line {r.line} ({r.id}): {e}") from None

    def process(self, index: int, record: PromptRecord) -> ShardResult:
        files = trace_prompt(self.tracer, record, self.options)
        n = json.loads(files[f"prompts/{record.id}/summary.json"])["n_tokens"]
        return ShardResult(files, tokens=int(n))


@dataclass(frozen=True)
class BatchResult:
    out: Path
    summary: Path  # summary.jsonl
    parquet: Path | None
    n_prompts: int
    resumed: int  # prompts finished by an earlier run of the same job


class BatchArgs(RunArgs, total=False):
    """`trace_batch`'s keyword arguments: how it runs (`RunArgs`) and `options` (default `BatchOptions()`)."""

    options: BatchOptions | None


def trace_batch(
    model: ModelArg, saes: PathArg | None, prompts: PathArg, out: PathArg, **how: Unpack[BatchArgs]
) -> BatchResult:
    """Trace every prompt of the JSONL file `prompts` and write the results under `out` (see the module
    docstring). `model`, `saes` and `how` (workers, ray_address, progress, sae_ids, device, dtype): as
    `qktrace.jobs.runner.run_job` takes them."""
    check_args(how, BatchArgs)
    o = how.get("options") or BatchOptions()
    out = Path(out)
    records = read_prompts(prompts)
    log.info("batch: %d prompts from %s", len(records), prompts)
    # the job is its options (and model and SAEs); each prompt is done when its summary holds that prompt,
    # so a corrected or extended prompts file resumes, and a changed prompt is traced again
    identity = {"options": dataclasses.asdict(o)}
    marker = lambda i: f"prompts/{records[i].id}/summary.json"  # noqa: E731
    worker = functools.partial(BatchWorker, options=o)
    prepare = ("check", (records, str(prompts)))
    spec = JobSpec("batch", JOB_VERSION, identity, len(records), marker, worker, prepare, _finished(records, marker))
    run = run_job(spec, model, saes, out, enumerate(records), how)
    log.info("batch: traced %d prompts, %d resumed", len(records) - run.resumed, run.resumed)
    rows = [json.loads((out / marker(i)).read_text()) for i in range(len(records))]
    summary = out / "summary.jsonl"
    atomic_write(summary, b"".join(_dumps(row) for row in rows), parents=True)
    parquet = _write_parquet(out / "summary.parquet", rows)
    log.info("batch: wrote %s%s", summary, " and its parquet" if parquet else "")
    return BatchResult(out, summary, parquet, len(records), run.resumed)


def _finished(records: list[PromptRecord], marker: Callable[[int], str]) -> Callable[[Path, int], bool]:
    """Whether prompt i is done in a folder: its summary exists and was written for this very prompt."""

    def finished(out: Path, i: int) -> bool:
        try:
            row = json.loads((out / marker(i)).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return False
        r = records[i]
        return isinstance(row, dict) and (row.get("prompt"), row.get("answer"), row.get("rival")) == (
            r.prompt, r.answer, r.rival
        )  # fmt: skip

    return finished


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path | None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return None
    with atomic_open(path, parents=True) as f:
        pq.write_table(pa.Table.from_pylist(rows), f)
    return path
