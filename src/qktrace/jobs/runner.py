"""Resumable jobs, the one skeleton every shard-by-shard job runs (`batch.trace_batch`,
`dashboards.build_dashboards`): the job says what it computes (`JobSpec`), `run_job` runs it.

1. `check_job`: the driver writes `job.json` (what the job computes: its name, version, model and SAEs,
   and the job's own identity) into the output folder. A folder that holds the same job is resumed:
   shards whose marker file exists are skipped. A folder that holds another job is refused, so nothing
   on disk is overwritten by mistake.
2. A pool of workers (`pool.worker_pool`), each holding one model replica, here or on Ray; the job's
   `prepare` method runs once on one worker before any shard (checks, shared tables).
3. `run_shards`: each shard's files are written as they arrive through `files.atomic_write`, the shard's
   marker last: a shard is done on disk or not at all, and an interrupted job restarts where it stopped.
   Progress (shards done, tokens, tokens/s) goes to a callback.

What follows the shards (merging them, summaries) is the job's own.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from typing_extensions import TypedDict

from ..errors import InputError
from ..files import atomic_write
from .pool import Pool, Progress, ProgressFn, TracerSpec, Worker, describe_source, tracer_source, worker_pool

if TYPE_CHECKING:
    from ..tracer import Tracer

JOB_FILE = "job.json"
PathArg: TypeAlias = "str | os.PathLike[str]"
ModelArg: TypeAlias = "str | os.PathLike[str] | Tracer"  # a path, hub id or "demo"; or a loaded Tracer


class RunArgs(TypedDict, total=False):
    """How a job runs, the keyword arguments every job takes (each job adds its own): `workers` model replicas
    (1: this process; more: Ray actors), on the Ray cluster at `ray_address` (see `pool.worker_pool`),
    each loading the model with `sae_ids`, on `device` in `dtype` (as `Tracer.load` takes them); `progress`
    hears where the job stands; `full_path`: job files name a local model by its full path
    (`ModelOptions.full_path`); `transcoders`: a transcoder set each replica loads (`Tracer.load`), with
    `attention_saes` (attention-output SAEs) when given."""

    workers: int
    ray_address: str | None
    progress: ProgressFn | None
    sae_ids: Sequence[str] | None
    device: str
    dtype: str
    full_path: bool
    transcoders: PathArg | None
    attention_saes: PathArg | None


def check_args(how: Mapping[str, Any], args: Any) -> None:
    """InputError for a keyword argument the job's TypedDict `args` does not declare (as a signature would), and
    for attention SAEs without transcoders."""
    known = set(args.__required_keys__) | set(args.__optional_keys__)
    unknown = sorted(set(how) - known)
    if unknown:
        raise InputError(f"unknown keyword argument {unknown[0]!r}: use one of {', '.join(sorted(known))}")
    if how.get("attention_saes") is not None and how.get("transcoders") is None:  # before any corpus or model work
        raise InputError(
            "attention SAEs were given without transcoders: a checkpointed tracer needs both, so pass transcoders "
            "too (transcoders=PATH, --transcoders)"
        )


@dataclass(frozen=True)
class JobSpec:
    """One resumable job: its `name` and `version`, what else identifies it (`identity`, written to
    job.json after the model and SAEs), its `n_shards`, each shard's `marker` (its last file, relative to
    the output folder: there, the shard is done) and `worker` (`worker(source)` builds one replica's
    worker; it must pickle for Ray). `prepare`: (method, arguments) run on one worker before any shard."""

    name: str
    version: int
    identity: Mapping[str, Any]
    n_shards: int
    marker: Callable[[int], str]
    worker: Callable[[TracerSpec | Tracer], Worker]
    prepare: tuple[str, tuple[Any, ...]] | None = None
    finished: Callable[[Path, int], bool] | None = None  # shard i done in this folder (default: its marker exists)


@dataclass(frozen=True)
class JobRun:
    """What a run did: shards finished by an earlier run, tokens processed by this one, and what
    `prepare` returned."""

    resumed: int
    tokens: int
    prepared: Any = None


def run_job(
    spec: JobSpec, model: ModelArg, saes: PathArg | None, out: Path, tasks: Iterable[tuple[int, Any]], how: RunArgs
) -> JobRun:
    """Run `spec`'s unfinished shards of `tasks` ((index, payload) for every shard, in order) and write
    their files under `out` (see the module docstring). `model`: a path, hub id or "demo" (each worker
    loads its replica), or a loaded Tracer (this process only; then `saes=None`)."""
    workers, ray_address = how.get("workers", 1), how.get("ray_address")
    distributed = workers > 1 or bool(ray_address)
    ids, device, dtype = how.get("sae_ids"), how.get("device", "auto"), how.get("dtype", "float32")
    source = tracer_source(
        model, saes, sae_ids=ids, device=device, dtype=dtype, distributed=distributed, full_path=how.get("full_path"),
        transcoders=how.get("transcoders"), attention_saes=how.get("attention_saes"),
    )  # fmt: skip
    identity = {"job": spec.name, "version": spec.version, **describe_source(source), **spec.identity}
    resumed = check_job(out, identity, write=False)  # job.json is written once `prepare` has passed
    finished = spec.finished or (lambda folder, i: (folder / spec.marker(i)).is_file())
    done = {i for i in range(spec.n_shards) if resumed and finished(out, i)}
    factory = functools.partial(spec.worker, source)
    gpu = isinstance(source, TracerSpec) and source.device != "cpu"
    with worker_pool(factory, workers=workers, ray_address=ray_address, gpu=gpu) as pool:
        prepared = pool.call(spec.prepare[0], *spec.prepare[1]) if spec.prepare is not None else None
        if not resumed:
            check_job(out, identity)
        todo = ((i, payload) for i, payload in tasks if i not in done)
        progress = how.get("progress")
        tokens = run_shards(pool, todo, out, total=spec.n_shards, skipped=len(done), progress=progress)
    return JobRun(len(done), tokens, prepared)


def check_job(out: Path, identity: Mapping[str, Any], *, write: bool = True) -> bool:
    """Write `out/job.json` (`write`; else only check that it could be), or check that the one there
    describes the same job. True when resuming."""
    path = out / JOB_FILE
    want = json.loads(json.dumps(identity))  # as it reads back
    if path.is_file():
        try:
            have = json.loads(path.read_text())
        except (ValueError, OSError, RecursionError):
            raise InputError(f"{path} is not readable JSON: delete it or pass another output folder") from None
        if have == want:
            return True
        key = next((k for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)), "?")
        raise InputError(
            f"{out} holds another job ({key}: {str(have.get(key))[:80]} there, {str(want.get(key))[:80]} now): "
            "pass another output folder, or delete it to start over"
        )
    if path.exists() or path.is_symlink():
        raise InputError(f"{path} is not a regular file: delete it or pass another output folder")
    if out.is_dir() and any(out.iterdir()):  # the user's files: a job never writes over them
        raise InputError(
            f"{out} holds files but no {JOB_FILE}, so it is not a job's folder: pass a new or empty output folder"
        )
    if write:
        atomic_write(path, (json.dumps(want, indent=1) + "\n").encode(), parents=True)
    return False


def run_shards(
    pool: Pool,
    tasks: Iterable[tuple[int, Any]],
    out: Path,
    *,
    total: int,
    skipped: int = 0,
    progress: ProgressFn | None = None,
) -> int:
    """Process `tasks` ((index, payload), unfinished shards only) on `pool`, writing each result's files
    under `out` as it arrives (marker last). Returns the tokens processed."""
    t0, tokens, done = time.perf_counter(), 0, skipped
    if progress is not None:
        progress(Progress(done, total, skipped, 0, 0.0))
    for _, result in pool.map(tasks):
        for name, data in result.files.items():  # dicts keep insertion order: the marker is the last file
            atomic_write(out / name, data, parents=True)
        tokens += result.tokens
        done += 1
        if progress is not None:
            progress(Progress(done, total, skipped, tokens, time.perf_counter() - t0))
    return tokens
