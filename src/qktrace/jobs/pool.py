"""Workers for jobs that outgrow one process (`runner.run_job` runs the jobs): here or on Ray.

1. Each worker holds one replica of the model (`Worker`, built by a picklable factory from a `TracerSpec`,
   what `Tracer.load` takes, or from a loaded Tracer in this process) and turns a shard's payload into
   files (`ShardResult`).
2. The pool is this process, or Ray actors: a fresh local Ray runtime on 127.0.0.1 only, or an existing
   cluster given its address (checked first: something must answer there as Ray does, within
   `RAY_CONNECT_TIMEOUT_S`; a token-authenticated cluster gets this process's token, as Ray expects it;
   a loopback address stays on loopback); one GPU per worker where the cluster has GPUs.
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
import time
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
    attention_saes: str | None = None  # attention-output SAEs, with transcoders (`Tracer.load(..., attention_saes=)`)

    def load(self) -> Tracer:
        from ..tracer import Tracer

        return Tracer.load(
            self.model, self.saes, sae_ids=self.sae_ids, device=self.device, dtype=self.dtype, full_path=self.full_path,
            transcoders=self.transcoders, attention_saes=self.attention_saes,
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
    attention_saes: str | os.PathLike[str] | None = None,
) -> TracerSpec | Tracer:
    """A loaded Tracer as given (in this process only), or the spec each worker loads its replica from."""
    from ..tracer import Tracer

    if isinstance(model, Tracer):
        if saes is not None or transcoders is not None or attention_saes is not None:
            raise InputError(
                "a loaded Tracer carries its SAEs, transcoders and attention SAEs: pass saes=None, transcoders=None, "
                "attention_saes=None"
            )
        if distributed:
            raise InputError("Ray workers load their own replica: pass the model as a path or hub id, not a Tracer")
        return model
    return TracerSpec(
        str(model), None if saes is None else str(saes), tuple(sae_ids) if sae_ids else None, device, dtype,
        bool(full_path), None if transcoders is None else str(transcoders),
        None if attention_saes is None else str(attention_saes),
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
        if source.attention_saes is not None:
            out["attention_saes"] = public_name(source.attention_saes, source.full_path)
        return out
    saes = {str(c): public_name(s.source) if s.source else s.hook_name for c, s in source.saes.items()}
    loaded: dict[str, Any] = {"model": source.model.name, "saes": saes, "dtype": str(source.model.anatomy.dtype)}
    for name, held in (("transcoders", source.transcoders), ("attention_saes", source.attention_saes)):
        if held is not None:
            rows = held.describe()
            loaded[name] = [{k: public_name(v) if k == "source" and v else str(v) for k, v in r.items()} for r in rows]
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


RAY_CONNECT_TIMEOUT_S = 10.0  # how long a Ray address may take to accept a connection and greet as Ray does
# HTTP/2's client preface and an empty SETTINGS frame: every Ray endpoint an address names (the GCS at
# HOST:6379, the client server at ray://HOST:10001) speaks gRPC, and answers with a SETTINGS frame of its own
_HTTP2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_SETTINGS = 4
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray keeps 127.0.0.1 as the node's address


def _host_port(address: str) -> tuple[str, int] | None:
    m = re.fullmatch(r"(?:ray://)?\[?([A-Za-z0-9.:-]+?)\]?:([0-9]{1,5})", address.strip())
    return None if m is None else (m[1], int(m[2]))


def _greeting(sock: socket.socket, deadline: float) -> bytes:
    """The first 9 bytes (a frame header) the peer sends after our HTTP/2 hello, or fewer at the deadline."""
    sock.sendall(_HTTP2_HELLO)
    got = b""
    while len(got) < 9:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(9 - len(got))
        if not chunk:
            break
        got += chunk
    return got


def check_reachable(address: str, timeout: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Refuse, within `timeout` seconds, a `HOST:PORT` or `ray://HOST:PORT` where nothing accepts a
    connection, or where what accepts does not answer as Ray's gRPC endpoints do (Ray itself would wait
    without bound); `auto` and other forms are left to Ray."""
    where = _host_port(address)
    if where is None:
        return
    deadline = time.monotonic() + timeout
    usage = "start the head node (ray start --head), or check the host and port (ray://HOST:10001, HOST:6379, or auto)"
    try:
        with socket.create_connection(where, timeout=timeout) as sock:
            try:
                hello = _greeting(sock, deadline)
            except OSError:  # timed out, or reset: either way not Ray
                hello = b""
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
        raise InputError(
            f"nothing answers at Ray address {address[:100]} ({reason}, waited at most {timeout:g} s): {usage}"
        ) from None
    if len(hello) < 9 or hello[3] != _SETTINGS:
        raise InputError(
            f"the Ray address {address[:100]} accepts connections but does not answer as Ray does (no gRPC greeting "
            f"within {timeout:g} s): it is another service; {usage}"
        )


def _is_loopback(address: str | None) -> bool:
    """A local runtime (no address), or a `HOST:PORT` / `ray://HOST:PORT` on this machine's loopback."""
    if address is None:
        return True
    where = _host_port(address)
    return where is not None and where[0] in LOOPBACK_HOSTS


def resolve_auto(address: str) -> str:
    """What `auto` names, read as Ray reads it (RAY_ADDRESS, else this machine's Ray address file), so that
    it is checked and kept on loopback like an address given; `auto` itself when there is none."""
    if address.strip() != "auto":
        return address
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        from ray._private.utils import read_ray_address
    except ImportError:  # another Ray: leave `auto` to it
        return address
    return read_ray_address() or address


@contextlib.contextmanager
def loopback(ray: Any) -> Iterator[None]:
    """While inside, Ray keeps 127.0.0.1 as the node's address: a local runtime (and the workers it starts)
    binds and dials loopback only. By default Ray rewrites 127.0.0.1 to the machine's network address
    (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`, read at import, hence the constant set here too)."""
    constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
    old_env, old_flag = os.environ.get(LOOPBACK_ENV), getattr(constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[LOOPBACK_ENV] = "0"
    if old_flag is not None:
        constants.ENABLE_RAY_CLUSTER = False  # type: ignore[union-attr]
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = old_env
        if old_flag is not None:
            constants.ENABLE_RAY_CLUSTER = old_flag  # type: ignore[union-attr]


def _use_token_if_any() -> None:
    """Ray sends its authentication token to an address given explicitly only when RAY_AUTH_MODE=token (it
    turns that on by itself for `auto` alone): turn it on, as Ray does, when this process has a token
    (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) and the mode is not set."""
    if os.environ.get("RAY_AUTH_MODE") is not None:
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available as enable,
        )
    except ImportError:  # a Ray without token authentication
        return
    enable(warn_if_disabled=False)


def _connect_error(e: BaseException, ray_address: str | None) -> InputError:
    """One line for a failed `ray.init`, saying so when the cluster refused this client's authentication."""
    where = f"the Ray cluster at {ray_address}" if ray_address else "a local Ray runtime"
    chain: list[BaseException] = []  # the exception and its causes
    cause: BaseException | None = e
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any("Authentication" in type(c).__name__ or "InvalidAuthToken" in str(c) for c in chain):
        return InputError(
            f"{where} refused this client's authentication (token authentication is on there): give this process "
            "the cluster's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; ray get-auth-token on "
            "the head) and set RAY_AUTH_MODE=token"
        )
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return InputError(
        f"could not start or reach {where} ({first}): check the address (ray://HOST:10001, or auto on a node)"
    )


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
    if ray_address is not None:
        ray_address = resolve_auto(ray_address)
    with loopback(ray) if _is_loopback(ray_address) else contextlib.nullcontext():
        started = _start(ray, ray_address)
        pool = RayPool(ray, factory, workers, gpu)
        try:
            yield pool
        finally:
            pool.close()
            if started:
                ray.shutdown()


def _start(ray: Any, ray_address: str | None) -> bool:
    """Connect to `ray_address` (a token-authenticated cluster included), or start a local runtime on
    127.0.0.1 (a fresh one, never a cluster found on this machine); False when Ray already runs in this process."""
    if ray.is_initialized():
        return False
    if ray_address:
        check_reachable(ray_address)
        _use_token_if_any()
    try:
        if ray_address:
            ray.init(address=ray_address, log_to_driver=False)
        else:
            ray.init(address="local", include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    except Exception as e:  # ConnectionError, RuntimeError, ValueError, Ray's own authentication errors
        raise _connect_error(e, ray_address) from None
    return True


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
