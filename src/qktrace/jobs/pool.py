"""Workers for jobs that outgrow one process (`runner.run_job` runs the jobs): here or on Ray.

1. Each worker holds one replica of the model (`Worker`, built by a picklable factory from a `TracerSpec`,
   what `Tracer.load` takes, or from a loaded Tracer in this process) and turns a shard's payload into
   files (`ShardResult`).
2. The pool is this process, or Ray actors: a local Ray runtime, or an existing cluster given its
   address; one GPU per worker where the cluster has GPUs.
3. Progress (shards done, tokens, tokens/s) goes to a callback; `progress_bar()` draws it with rich.

Ray is the optional `qktrace[scale]` extra: without it the same job runs in this process, with the same
output (`workers > 1` then logs a warning; a `ray_address` is an error).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import InputError, QKTraceError
from ..models import public_name

if TYPE_CHECKING:
    from ..tracer import Tracer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TracerSpec:
    """What `Tracer.load` takes, as plain values that pickle: how each worker loads its own replica."""

    model: str
    saes: str | None = None
    sae_ids: tuple[str, ...] | None = None
    device: str = "auto"
    dtype: str = "float32"
    full_path: bool = False  # ModelOptions.full_path: files name a local model by its full path
    transcoders: str | None = None  # a transcoder set (`Tracer.load(..., transcoders=)`)

    def load(self) -> Tracer:
        from ..tracer import Tracer

        return Tracer.load(
            self.model, self.saes, sae_ids=self.sae_ids, device=self.device, dtype=self.dtype, full_path=self.full_path,
            transcoders=self.transcoders,
        )  # fmt: skip


def tracer_source(
    model: str | os.PathLike[str] | Tracer,
    saes: str | os.PathLike[str] | None,
    *,
    sae_ids: Iterable[str] | None = None,
    device: str = "auto",
    dtype: str = "float32",
    distributed: bool = False,
    full_path: bool | None = None,
    transcoders: str | os.PathLike[str] | None = None,
) -> TracerSpec | Tracer:
    """A loaded Tracer as given (in this process only), or the spec each worker loads its replica from."""
    from ..tracer import Tracer

    if isinstance(model, Tracer):
        if saes is not None or transcoders is not None:
            raise InputError("a loaded Tracer carries its SAEs and transcoders: pass saes=None, transcoders=None")
        if distributed:
            raise InputError("Ray workers load their own replica: pass the model as a path or hub id, not a Tracer")
        return model
    return TracerSpec(
        str(model), None if saes is None else str(saes), tuple(sae_ids) if sae_ids else None, device, dtype,
        bool(full_path), None if transcoders is None else str(transcoders),
    )  # fmt: skip


def replica(source: TracerSpec | Tracer) -> Tracer:
    """The Tracer a worker uses: its own replica loaded from a spec, or the loaded one it was given."""
    return source.load() if isinstance(source, TracerSpec) else source


def describe_source(source: TracerSpec | Tracer) -> dict[str, Any]:
    """What a job's identity records about its model and SAEs."""
    if isinstance(source, TracerSpec):
        model = public_name(source.model, source.full_path)  # hub ids or folder names: job files travel
        named = None if source.saes is None else public_name(source.saes, source.full_path)
        out: dict[str, Any] = {"model": model, "saes": named, "sae_ids": source.sae_ids, "dtype": source.dtype}
        if source.transcoders is not None:  # absent otherwise: jobs of SAEs keep their identity
            out["transcoders"] = public_name(source.transcoders, source.full_path)
        return out
    saes = {str(c): public_name(s.source) if s.source else s.hook_name for c, s in source.saes.items()}
    loaded: dict[str, Any] = {"model": source.model.name, "saes": saes, "dtype": str(source.model.anatomy.dtype)}
    if source.transcoders is not None:
        rows = source.transcoders.describe()
        loaded["transcoders"] = [
            {k: public_name(v) if k == "source" and v else str(v) for k, v in r.items()} for r in rows
        ]
    return loaded


@dataclass(frozen=True)
class ShardResult:
    """What a worker made of one shard: files (path relative to the output folder -> bytes), the marker last."""

    files: Mapping[str, bytes]
    tokens: int = 0


@dataclass(frozen=True)
class Progress:
    """Where a job stands: `done` of `total` shards (`skipped` of them finished by an earlier run)."""

    done: int
    total: int
    skipped: int
    tokens: int  # processed by this run
    seconds: float  # since this run started

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


ProgressFn = Callable[[Progress], None]


class Worker(Protocol):
    def process(self, index: int, payload: Any) -> ShardResult: ...


# ---------------------------------------------------------------------------------------------- pools


class Pool:
    """Workers that process shards. `call` runs a method on one worker; `map` yields (index, result) as
    shards finish, in any order."""

    size: int = 1

    def call(self, method: str, *args: Any) -> Any:
        raise NotImplementedError

    def map(self, tasks: Iterable[tuple[int, Any]]) -> Iterator[tuple[int, ShardResult]]:
        raise NotImplementedError


class LocalPool(Pool):
    def __init__(self, factory: Callable[[], Worker]) -> None:
        self.worker = factory()

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.worker, method)(*args)

    def map(self, tasks: Iterable[tuple[int, Any]]) -> Iterator[tuple[int, ShardResult]]:
        for index, payload in tasks:
            yield index, self.worker.process(index, payload)


class _RayWorker:
    """A Ray actor around one worker (one model replica); its torch threads are its CPU share."""

    def __init__(self, factory: Callable[[], Worker], threads: int | None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.error: QKTraceError | None = None
        try:
            self.worker = factory()
        except QKTraceError as e:  # raised again by the first call, so the driver sees the one line
            self.error = e

    def _ready(self) -> Worker:
        if self.error is not None:
            raise self.error
        return self.worker

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self._ready(), method)(*args)

    def process(self, index: int, payload: Any) -> tuple[int, ShardResult]:
        return index, self._ready().process(index, payload)


def _unwrap(e: Exception) -> BaseException:
    """A worker's QKTraceError, as raised there (Ray wraps it with the remote traceback)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, QKTraceError) else e


class RayPool(Pool):
    def __init__(self, ray: Any, factory: Callable[[], Worker], workers: int, gpu: bool, in_flight: int = 2) -> None:
        self.ray = ray
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        per_gpu = 1 if gpu and gpus > 0 else 0
        if per_gpu and workers > gpus:
            log.warning("%d workers asked for but the cluster has %d GPUs: running %d", workers, gpus, gpus)
            workers = gpus
        self.size, self.in_flight = workers, in_flight
        node_cpus = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=cpus)
        threads = max(1, min(cpus // workers, node_cpus))  # an equal share, that one node can give
        actor = ray.remote(_RayWorker).options(num_cpus=threads if not per_gpu else 1, num_gpus=per_gpu)
        self.actors = [actor.remote(factory, None if per_gpu else threads) for _ in range(workers)]
        log.info("%d Ray workers (%s each)", workers, "1 GPU" if per_gpu else f"{threads} CPUs")

    def _get(self, ref: Any) -> Any:
        try:
            return self.ray.get(ref)
        except Exception as e:
            raise _unwrap(e) from None

    def call(self, method: str, *args: Any) -> Any:
        return self._get(self.actors[0].call.remote(method, *args))

    def map(self, tasks: Iterable[tuple[int, Any]]) -> Iterator[tuple[int, ShardResult]]:
        it = iter(tasks)
        pending: dict[Any, int] = {}  # ref -> actor
        free = [a for a in range(self.size) for _ in range(self.in_flight)]
        while True:
            while free:
                nxt = next(it, None)
                if nxt is None:
                    break
                a = free.pop(0)
                pending[self.actors[a].process.remote(*nxt)] = a
            if not pending:
                return
            (ref,), _ = self.ray.wait(list(pending), num_returns=1)
            free.append(pending.pop(ref))
            yield self._get(ref)

    def close(self) -> None:
        for a in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(a)


def import_ray(required: bool) -> Any:
    """The `ray` module, or None when it is not installed and not `required` (InputError when it is)."""
    try:
        import ray
    except ImportError:
        if required:
            raise InputError("--ray-address needs Ray: pip install 'qktrace[scale]' (or pip install ray)") from None
        return None
    return ray


RAY_CONNECT_TIMEOUT_S = 10.0  # how long a Ray address may take to accept a connection


def check_reachable(address: str, timeout: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Refuse, within `timeout` seconds, a `HOST:PORT` or `ray://HOST:PORT` where nothing accepts a
    connection (Ray itself would wait without bound); `auto` and other forms are left to Ray."""
    m = re.fullmatch(r"(?:ray://)?\[?([A-Za-z0-9.:-]+?)\]?:([0-9]{1,5})", address.strip())
    if m is None:
        return
    host, port = m[1], int(m[2])
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
        raise InputError(
            f"nothing answers at Ray address {address[:100]} ({reason}, waited at most {timeout:g} s): start the "
            "head node (ray start --head), or check the host and port (ray://HOST:10001, HOST:6379, or auto)"
        ) from None


@contextlib.contextmanager
def worker_pool(
    factory: Callable[[], Worker], *, workers: int = 1, ray_address: str | None = None, gpu: bool = False
) -> Iterator[Pool]:
    """This process (workers == 1 and no `ray_address`), or `workers` Ray actors: on the cluster at
    `ray_address`, on a Ray runtime already started in this process, or on a local one started here
    (and shut down after). `gpu`: give each actor a GPU when the cluster has any. `factory` must pickle
    for Ray (a class and a frozen dataclass, e.g. `functools.partial(Worker, spec)`)."""
    if workers < 1:
        raise InputError(f"workers={workers} must be at least 1")
    ray = import_ray(required=ray_address is not None) if workers > 1 or ray_address else None
    if ray is None:
        if workers > 1:
            log.warning("Ray is not installed (pip install 'qktrace[scale]'): running in one process")
        yield LocalPool(factory)
        return
    started = False
    if not ray.is_initialized():
        if ray_address:
            check_reachable(ray_address)
        try:
            if ray_address:
                ray.init(address=ray_address, log_to_driver=False)
            else:
                ray.init(include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"the Ray cluster at {ray_address}" if ray_address else "a local Ray runtime"
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise InputError(
                f"could not start or reach {where} ({first}): check the address (ray://HOST:10001, or auto on a node)"
            ) from None
        started = True
    pool = RayPool(ray, factory, workers, gpu)
    try:
        yield pool
    finally:
        pool.close()
        if started:
            ray.shutdown()


# ------------------------------------------------------------------------------------------- progress


@contextlib.contextmanager
def progress_bar(
    description: str, unit: str = "shards", *, transient: bool = False, console: Any = None
) -> Iterator[ProgressFn]:
    """A rich progress bar (shards done, tokens/s, elapsed, remaining) as a progress callback; for front ends.
    The bar appears with the job's first report, so an input the job refuses leaves one line, no bar.
    `console`: a rich Console (default: rich's)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.progress import Progress as RichProgress

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    bar = RichProgress(*columns, transient=transient, console=console)
    task = bar.add_task(description, total=None, rate="")

    def update(p: Progress) -> None:
        if not bar.live.is_started:  # drawn from the first report on: a refused job shows no bar
            bar.start()
        rate = f"{p.tokens_per_s:,.0f} tokens/s" if p.tokens else ("resumed" if p.skipped else "")
        bar.update(task, total=p.total, completed=p.done, rate=rate)

    try:
        yield update
    finally:
        if bar.live.is_started:
            bar.stop()
