"""`build_dashboards`: the whole job, from a model, its SAEs and a corpus to files the web UI reads."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor
from typing_extensions import Unpack

from ...errors import InputError
from ...files import atomic_write
from ...graph.formats.numbering import cantor
from ...models import Model, residuals
from ...options import DashboardOptions  # re-exported: the job's settings, declared with the others
from ...saes import require_saes
from ...tracer import Tracer
from ..corpus import bos_token, count_documents, fingerprint, shards, tokenize_chunks
from ..pool import ShardResult, TracerSpec, replica
from ..runner import JobSpec, ModelArg, PathArg, RunArgs, check_args, run_job
from .attention import AttentionFeatures, attention_features, attention_inputs
from .render import VERSION, TokenKind, circuit_tracer_features, render, token_kind, top_outputs
from .stats import Partial, collect, from_bytes, merge, to_bytes
from .transcoders import Coder, TranscoderFeatures, transcoder_inputs

SHARDS = "shards"
INDEX_FILE, DASHBOARDS_FILE, LABELS_FILE = "index.json", "dashboards.json", "labels.json"
log = logging.getLogger(__name__)


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
        self.tracer = replica(source)
        self.options = options
        model, saes, ts = self.tracer.model, self.tracer.saes, self.tracer.transcoders
        if model.tokenizer is None:
            raise InputError(f"model '{model.name}' has no tokenizer: dashboards read text")
        if len(saes) == 0 and ts is None:
            raise InputError(
                "no SAEs or transcoders loaded: pass --saes or --transcoders (dashboards describe features)"
            )
        limit = model.max_positions
        if limit is not None and options.seq_len > limit:
            raise InputError(
                f"seq_len {options.seq_len} is more than the {limit} positions model '{model.name}' takes: "
                f"give --seq-len {limit} or less"
            )
        self.saes, self.inputs = _coders(self.tracer, options.checkpoints)
        self.bos = bos_token(model.tokenizer, getattr(saes, "prepend_bos", None))

    def info(self) -> dict[str, Any]:
        """The vocabulary as strings, each SAE's header and its features' top and bottom output tokens."""
        model = self.tracer.model
        vocab = list(model.str_tokens(range(model.anatomy.W_U.shape[1])))
        saes = {}
        for c, sae in self.saes.items():
            top, bottom = top_outputs(model, sae, self.options.n_out)
            header = {"checkpoint": c, "hook_name": sae.hook_name, "model": model.name, "d_sae": sae.d_sae, "k": sae.k}
            if isinstance(sae, TranscoderFeatures):  # keyed by the layer that reads them
                header |= {"kind": "transcoder", "layer": c}
            elif isinstance(sae, AttentionFeatures):  # keyed by the attention layer
                header |= {"kind": "attn", "layer": c, "site": sae.site}
            saes[c] = {"header": header, "top": top, "bottom": bottom}
        return {"vocab": vocab, "saes": saes, "n_layers": model.n_layers}

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
            inputs=self.inputs,
        )
        return ShardResult({shard_file(index): to_bytes(parts)}, tokens=chunks.n_tokens)


def _coders(
    tracer: Tracer, checkpoints: tuple[int, ...] | None
) -> tuple[dict[int, Coder], Callable[[Model, Tensor, list[int]], dict[int, Tensor]]]:
    """What the worker describes and how it reads their inputs: the residual SAEs when loaded, else the attention
    SAEs when loaded, else the transcoders' features (the last two keyed by layer; `checkpoints` picks)."""
    model, saes, ts, att = tracer.model, tracer.saes, tracer.transcoders, tracer.attention_saes
    if len(saes) > 0 or ts is None:
        cps = checkpoints if checkpoints is not None else saes.checkpoints
        require_saes(saes, cps)
        return {c: saes[c] for c in sorted(cps)}, residuals
    what, have = ("attention SAE", att.layers) if att is not None else ("transcoder", ts.layers)
    layers = checkpoints if checkpoints is not None else have
    bad = sorted(set(layers) - set(have))
    if bad:
        raise InputError(f"no {what} reads layers {bad}: loaded are layers {list(have)}")
    if att is not None:
        sites = {ly: att[ly].site for ly in layers}
        coders: dict[int, Coder] = {ly: attention_features(model, att, ly) for ly in sorted(layers)}
        return coders, functools.partial(attention_inputs, sites=sites)
    return {ly: TranscoderFeatures(ly, ts) for ly in sorted(layers)}, functools.partial(
        transcoder_inputs, site=ts.input_site
    )


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


class DashboardArgs(RunArgs, total=False):
    """`build_dashboards`'s keyword arguments: how it runs (`RunArgs`), `options` (default
    `DashboardOptions()`), `kind` (a token categoriser for labels, default `render.token_kind`) and
    `circuit_tracer` (also write features/{scan}/{index}.json for circuit-tracer's frontend; default False)."""

    options: DashboardOptions | None
    kind: TokenKind | None
    circuit_tracer: bool


def build_dashboards(
    model: ModelArg, saes: PathArg | None, corpus: PathArg, out: PathArg, **how: Unpack[DashboardArgs]
) -> DashboardsResult:
    """Feature dashboards of every SAE (checkpoint) over `corpus`, written under `out`.

    `model`: a path, hub id or "demo" (each worker loads its replica), or a loaded Tracer (one process
    only; then `saes=None`). `how`: `DashboardArgs` (workers, ray_address, progress, sae_ids, device and
    dtype as `qktrace.jobs.runner.run_job` takes them; options, kind, circuit_tracer). Re-running with the
    same arguments and `out` resumes; the files are the same whatever the number of workers or interruptions.
    """
    check_args(how, DashboardArgs)
    o = how.get("options") or DashboardOptions()
    out = Path(out)
    n_docs = count_documents(corpus, o.text_field)
    n_docs = min(n_docs, o.max_docs) if o.max_docs is not None else n_docs
    if n_docs == 0:
        raise InputError(f"corpus {corpus} holds no documents: give it at least one non-empty line")
    identity = {"corpus": fingerprint(corpus), "n_docs": n_docs}
    identity["options"] = {k: v for k, v in dataclasses.asdict(o).items() if k != "n_out"}
    n_shards = math.ceil(n_docs / o.docs_per_shard)
    log.info("dashboards: %d documents of %s in %d shards", n_docs, corpus, n_shards)
    worker = functools.partial(DashboardWorker, options=o)
    spec = JobSpec("dashboards", VERSION, identity, n_shards, shard_file, worker, ("info", ()))
    tasks = shards(corpus, o.docs_per_shard, o.text_field, n_docs)
    run = run_job(spec, model, saes, out, tasks, how)
    log.info("dashboards: %d shards run, %d resumed, %d tokens", n_shards - run.resumed, run.resumed, run.tokens)
    info, merged = run.prepared, _merged(out, n_shards, o.keep)
    log.info("dashboards: merged the statistics of %d checkpoints", len(merged))
    kind, circuit_tracer = how.get("kind") or token_kind, how.get("circuit_tracer", False)
    entries = [_write_checkpoint(out, c, part, info, o, kind, circuit_tracer) for c, part in merged.items()]
    n_tokens = next(iter(merged.values())).n_tokens if merged else 0
    name: str | None = info["saes"][min(merged)]["header"]["model"] if merged else None
    summary: dict[str, Any] = {"version": VERSION, "model": name, "n_docs": n_docs, "n_tokens": n_tokens}
    summary["checkpoints"] = entries
    if circuit_tracer and name is not None:
        summary["circuit_tracer_features"] = f"features/{_scan_folder(name)}"
    atomic_write(out / INDEX_FILE, (json.dumps(summary, indent=1) + "\n").encode(), parents=True)
    log.info("dashboards: wrote %s (%d checkpoints, %d tokens)", out / INDEX_FILE, len(entries), n_tokens)
    folders = {e["checkpoint"]: out / e["folder"] for e in entries}
    alive = {e["checkpoint"]: e["n_alive"] for e in entries}
    return DashboardsResult(out, folders, n_tokens, alive, n_shards, run.resumed, run.tokens)


def _write_checkpoint(
    out: Path, c: int, part: Partial, info: dict[str, Any], o: DashboardOptions, kind: TokenKind, circuit_tracer: bool
) -> dict[str, Any]:
    """Render checkpoint `c`'s merged statistics and write its labels.json and dashboards.json (and
    circuit-tracer's feature files); its entry in index.json."""
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
        kind=kind,
    )
    hook = s["header"]["hook_name"]
    folder = out / hook
    atomic_write(folder / LABELS_FILE, (json.dumps(labels, ensure_ascii=False, indent=0) + "\n").encode(), parents=True)
    atomic_write(folder / DASHBOARDS_FILE, json.dumps(dash, ensure_ascii=False, separators=(",", ":")), parents=True)
    if circuit_tracer:
        scan = _scan_folder(s["header"]["model"])
        for f, data in circuit_tracer_features(dash, f"{scan}/{hook}").items():
            attn = s["header"].get("kind") == "attn"  # numbered after every MLP layer's (`formats.numbering`)
            node = cantor(info["n_layers"] + c if attn else c, f)  # the feature's number in qktrace's graph JSON
            atomic_write(out / "features" / scan / f"{node}.json", json.dumps(data, ensure_ascii=False), parents=True)
    log.info("dashboards: checkpoint %d: %d features alive, written to %s", c, dash["n_alive"], folder)
    return {"checkpoint": c, "hook_name": hook, "folder": hook, "n_alive": dash["n_alive"]}
