"""`build_dashboards`: the whole job, from a model, its SAEs and a corpus to files the web UI reads."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import InputError
from ...saes import require_saes
from ...tracer import Tracer
from ..corpus import bos_token, count_documents, fingerprint, shards, tokenize_chunks
from ..pool import (
    ProgressFn,
    ShardResult,
    TracerSpec,
    check_job,
    describe_source,
    run_shards,
    tracer_source,
    worker_pool,
    write_atomic,
)
from .render import VERSION, TokenKind, circuit_tracer_features, render, token_kind, top_outputs
from .stats import Partial, collect, from_bytes, merge, to_bytes

SHARDS = "shards"
INDEX_FILE, DASHBOARDS_FILE, LABELS_FILE = "index.json", "dashboards.json", "labels.json"


@dataclass(frozen=True)
class DashboardOptions:
    """What a dashboards job reads and keeps. The corpus is cut into chunks of `seq_len` tokens (at most
    `max_chunks_per_doc` per document, of the first `max_docs` documents); `docs_per_shard` documents
    make a shard; `batch_tokens` tokens go through the model at once. Per feature: `n_contexts` top
    contexts of `before` + 1 + `after` tokens, the top `label_pool` activations feed the label, `n_out`
    top and bottom output tokens. `checkpoints`: which SAEs (default: all)."""

    seq_len: int = 128
    max_chunks_per_doc: int | None = None
    max_docs: int | None = None
    text_field: str = "text"
    docs_per_shard: int = 256
    batch_tokens: int = 4096
    n_contexts: int = 10
    label_pool: int = 24
    before: int = 12
    after: int = 4
    n_out: int = 10
    checkpoints: tuple[int, ...] | None = None

    @property
    def keep(self) -> int:
        """Top activations kept per feature (contexts and the label's pool)."""
        return max(self.n_contexts, self.label_pool)

    def check(self) -> None:
        positive = ("seq_len", "docs_per_shard", "batch_tokens", "n_contexts", "label_pool", "n_out")
        for name in positive + ("max_chunks_per_doc", "max_docs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InputError(f"{name}={value!r} must be a positive integer")
        if self.seq_len < 2:
            raise InputError(f"seq_len={self.seq_len} must be at least 2 (BOS and one token)")
        for name in ("before", "after"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise InputError(f"{name}={getattr(self, name)!r} must be 0 or more tokens")


@dataclass(frozen=True)
class DashboardsResult:
    """Where the files went: `folders[c]` holds checkpoint c's dashboards.json and labels.json."""

    out: Path
    folders: dict[int, Path]
    n_tokens: int  # counted tokens of the corpus (BOS excluded)
    n_alive: dict[int, int]
    shards: int
    resumed: int  # shards finished by an earlier run of the same job
    tokens_this_run: int


class DashboardWorker:
    """One model replica: `info()` once, then `process(shard, docs)` per shard."""

    def __init__(self, source: TracerSpec | Tracer, options: DashboardOptions) -> None:
        self.tracer = source.load() if isinstance(source, TracerSpec) else source
        self.options = options
        model, saes = self.tracer.model, self.tracer.saes
        if model.tokenizer is None:
            raise InputError(f"model '{model.name}' has no tokenizer: dashboards read text")
        if len(saes) == 0:
            raise InputError("no SAEs loaded: pass --saes (dashboards describe SAE features)")
        cps = options.checkpoints if options.checkpoints is not None else saes.checkpoints
        require_saes(saes, cps)
        self.saes = {c: saes[c] for c in sorted(cps)}
        self.bos = bos_token(model.tokenizer, getattr(saes, "prepend_bos", None))

    def info(self) -> dict[str, Any]:
        """The vocabulary as strings, each SAE's header and its features' top and bottom output tokens."""
        model = self.tracer.model
        vocab = list(model.str_tokens(range(model.anatomy.W_U.shape[1])))
        saes = {}
        for c, sae in self.saes.items():
            top, bottom = top_outputs(model, sae, self.options.n_out)
            header = {"checkpoint": c, "hook_name": sae.hook_name, "model": model.name, "d_sae": sae.d_sae, "k": sae.k}
            saes[c] = {"header": header, "top": top, "bottom": bottom}
        return {"vocab": vocab, "saes": saes}

    def process(self, index: int, docs: list[tuple[int, str]]) -> ShardResult:
        o = self.options
        chunks = tokenize_chunks(self.tracer.model.tokenizer, docs, o.seq_len, self.bos, o.max_chunks_per_doc)
        parts = collect(
            self.tracer.model,
            self.saes,
            chunks,
            keep=o.keep,
            before=o.before,
            after=o.after,
            batch_tokens=o.batch_tokens,
        )
        return ShardResult({shard_file(index): to_bytes(parts)}, tokens=chunks.n_tokens)


def shard_file(index: int) -> str:
    return f"{SHARDS}/{index:06d}.npz"


def _merged(out: Path, n_shards: int, keep: int) -> dict[int, Partial]:
    """Fold every shard's partials into one per checkpoint (exact in any order)."""
    acc: dict[int, Partial] = {}
    for i in range(n_shards):
        for c, p in from_bytes((out / shard_file(i)).read_bytes()).items():
            acc[c] = merge([acc[c], p], keep) if c in acc else p
    return acc


def _scan_folder(name: str) -> str:
    """circuit-tracer asks for features/{scan}/{index}.json; a scan that is an absolute or ./ path is kept
    as its last part."""
    if name.startswith(("/", "./", "~")) or ".." in name.split("/"):
        name = Path(name).name or "model"
    return re.sub(r"[^A-Za-z0-9._/-]", "_", name)


def build_dashboards(
    model: str | os.PathLike[str] | Tracer,
    saes: str | os.PathLike[str] | None,
    corpus: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    workers: int = 1,
    ray_address: str | None = None,
    progress: ProgressFn | None = None,
    options: DashboardOptions | None = None,
    kind: TokenKind | None = None,
    circuit_tracer: bool = False,
    sae_ids: list[str] | tuple[str, ...] | None = None,
    device: str = "auto",
    dtype: str = "float32",
) -> DashboardsResult:
    """Feature dashboards of every SAE (checkpoint) over `corpus`, written under `out`.

    `model`: a path, hub id or "demo" (each worker loads its replica), or a loaded Tracer (one process
    only; then `saes=None`). `workers`/`ray_address`: see `qktrace.jobs.pool.worker_pool`. `kind`: a token
    categoriser for labels (default `render.token_kind`). `circuit_tracer`: also write
    features/{scan}/{index}.json for circuit-tracer's frontend. Re-running with the same arguments and
    `out` resumes; the files are the same whatever the number of workers or interruptions.
    """
    o = options or DashboardOptions()
    o.check()
    out = Path(out)
    n_docs = count_documents(corpus, o.text_field)
    n_docs = min(n_docs, o.max_docs) if o.max_docs is not None else n_docs
    if n_docs == 0:
        raise InputError(f"corpus {corpus} holds no documents: give it at least one non-empty line")
    source = tracer_source(
        model, saes, sae_ids=sae_ids, device=device, dtype=dtype, distributed=workers > 1 or bool(ray_address)
    )
    identity = {"job": "dashboards", "version": VERSION, **describe_source(source), "corpus": fingerprint(corpus)}
    identity |= {"n_docs": n_docs, "options": {k: v for k, v in dataclasses.asdict(o).items() if k != "n_out"}}
    n_shards = math.ceil(n_docs / o.docs_per_shard)
    resumed = check_job(out, identity)
    done = {i for i in range(n_shards) if (out / shard_file(i)).is_file()} if resumed else set()
    factory = functools.partial(DashboardWorker, source, o)
    gpu = isinstance(source, TracerSpec) and source.device != "cpu"
    with worker_pool(factory, workers=workers, ray_address=ray_address, gpu=gpu) as pool:
        info = pool.call("info")
        tasks = ((i, docs) for i, docs in shards(corpus, o.docs_per_shard, o.text_field, n_docs) if i not in done)
        tokens = run_shards(pool, tasks, out, total=n_shards, skipped=len(done), progress=progress)
    merged = _merged(out, n_shards, o.keep)
    folders: dict[int, Path] = {}
    alive: dict[int, int] = {}
    entries = []
    for c, part in merged.items():
        s = info["saes"][c]
        labels, dash = render(
            part,
            header=s["header"],
            vocab=info["vocab"],
            top_ids=s["top"],
            bottom_ids=s["bottom"],
            n_contexts=o.n_contexts,
            label_pool=o.label_pool,
            before=o.before,
            n_out=o.n_out,
            kind=kind or token_kind,
        )
        hook = s["header"]["hook_name"]
        folders[c], alive[c] = out / hook, dash["n_alive"]
        write_atomic(folders[c] / LABELS_FILE, (json.dumps(labels, ensure_ascii=False, indent=0) + "\n").encode())
        write_atomic(folders[c] / DASHBOARDS_FILE, json.dumps(dash, ensure_ascii=False, separators=(",", ":")).encode())
        entries.append({"checkpoint": c, "hook_name": hook, "folder": hook, "n_alive": dash["n_alive"]})
        if circuit_tracer:
            scan = _scan_folder(s["header"]["model"])
            for f, data in circuit_tracer_features(dash, f"{scan}/{hook}").items():
                node = (c + f) * (c + f + 1) // 2 + f  # the Cantor pairing qktrace's graph JSON gives feature nodes
                write_atomic(out / "features" / scan / f"{node}.json", json.dumps(data, ensure_ascii=False).encode())
    n_tokens = next(iter(merged.values())).n_tokens if merged else 0
    name: str | None = info["saes"][min(merged)]["header"]["model"] if merged else None
    summary: dict[str, Any] = {"version": VERSION, "model": name, "n_docs": n_docs, "n_tokens": n_tokens}
    summary["checkpoints"] = entries
    if circuit_tracer and name is not None:
        summary["circuit_tracer_features"] = f"features/{_scan_folder(name)}"
    write_atomic(out / INDEX_FILE, (json.dumps(summary, indent=1) + "\n").encode())
    return DashboardsResult(out, folders, n_tokens, alive, n_shards, len(done), tokens)
