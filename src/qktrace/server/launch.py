"""`serve(paths, model, saes)`: run the web app with uvicorn on 127.0.0.1 (also `python -m qktrace.server`)."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import socket
import tempfile
import threading
import webbrowser
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import LIMITS, parse_bytes, parse_device, parse_dtype, resolve_coders, resolve_model, resolve_saes
from ..errors import InputError, QKTraceError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def split_paths(paths: Sequence[str]) -> tuple[Path, list[Path]]:
    """(data directory, explicit graph files). One directory at most; without one, computed graphs go
    into a fresh temporary directory."""
    dirs, files = [], []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            dirs.append(p)
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"{raw} does not exist: pass graph JSON files or one directory of them")
    if len(dirs) > 1:
        raise InputError(f"{len(dirs)} directories given ({', '.join(map(str, dirs))}): serve one data directory")
    if dirs:
        return dirs[0], files
    tmp = Path(tempfile.mkdtemp(prefix="qktrace-graphs-"))
    log.warning("no data directory given: graphs built in the page are saved to %s", tmp)
    return tmp, files


def check_port(host: str, port: int) -> None:
    """Refuse, before anything is loaded, a port out of range, a host that is not an address here, or an
    address that cannot be listened on (in use, not permitted)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InputError(f"port {port!r} is out of range: give 1..65535, e.g. 8000")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        reason = getattr(e, "strerror", None) or type(e).__name__
        raise InputError(
            f"host '{host[:80]}' is not understood ({reason}): give an address such as 127.0.0.1"
        ) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind(address)
        except OSError as e:
            raise InputError(
                f"cannot listen on {host}:{port} ({e.strerror or type(e).__name__}): pick another --port"
            ) from None


def serve(
    paths: Sequence[str],
    model: str | None = None,
    saes: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    open_browser: bool = False,
    *,
    tracer: object | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "float32",
    max_memory: int | str | None = None,
    max_tokens: int | None = None,
    queue: int | None = None,
    labels: str | Sequence[str] | None = None,
    transcoders: str | None = None,
    attention_saes: str | None = None,
) -> None:
    """Serve graph files (a directory and/or files) and, with a model (a path, hub id or 'demo'; or an
    already loaded `tracer`), compute graphs, QK attributions and sweeps. Blocks until interrupted.

    `device`, `dtype`: where and how the model is loaded (`config.parse_device` / `parse_dtype`).
    `max_memory`: byte budget of graph builds ("8GB": full-mode SAE graphs, transcoder and checkpointed
    graphs). `max_tokens`: the longest prompt the server traces (default `LIMITS.server_max_tokens`).
    `queue`: requests and jobs that run the model,
    queued or running at once (default `LIMITS.max_queued_jobs`; one more is answered 429). `labels`:
    Neuronpedia explanation exports that label the model's SAEs (needs `model`). `transcoders`: a
    transcoder set for the model (needs `model`); without SAEs, POST /api/graph then builds plain
    transcoder graphs. `attention_saes`: SAEs on every layer's attention output (needs `transcoders`): POST
    /api/graph then builds checkpointed graphs with head loadings. Every argument is checked before any loading."""
    try:
        import uvicorn
    except ImportError:
        raise QKTraceError("the web UI needs uvicorn: pip install 'qktrace[server]'") from None
    from ..tracer import Tracer
    from .app import create_app

    dev, dt = parse_device(device), parse_dtype(dtype)
    budget = parse_bytes(max_memory) if max_memory is not None else None
    limits = LIMITS
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InputError(f"max_tokens {max_tokens!r} is not a positive number of tokens")
        limits = dataclasses.replace(limits, server_max_tokens=max_tokens)
    if queue is not None:
        if isinstance(queue, bool) or not isinstance(queue, int) or not 1 <= queue <= 1024:
            raise InputError(f"queue {queue!r} is not a number of requests in 1..1024, e.g. 8")
        limits = dataclasses.replace(limits, max_queued_jobs=queue)
    if labels is not None and (model is None or tracer is not None):
        raise InputError("--labels label the SAEs of the model serve loads: add --model (and --saes)")
    if transcoders is not None and (model is None or tracer is not None):
        raise InputError("--transcoders are loaded with the model serve loads: add --model")
    transcoders, attention_saes = resolve_coders(transcoders, attention_saes)
    if transcoders is not None and not Path(transcoders).expanduser().exists():
        raise InputError(f"transcoders {str(transcoders)[:80]!r} do not exist: pass a transcoder set folder or file")
    if attention_saes is not None and transcoders is None:
        raise InputError("--attention-saes go with --transcoders (a checkpointed graph needs both): add --transcoders")
    check_port(host, port)
    data_dir, files = split_paths(paths)
    if tracer is None and model is not None:
        tracer = Tracer.load(
            resolve_model(model),
            resolve_saes(model, saes, transcoders),
            device=dev,
            dtype=dt,
            labels=labels,
            transcoders=transcoders,
            attention_saes=attention_saes,
        )
    if tracer is not None and not isinstance(tracer, Tracer):
        raise InputError(f"tracer must be a qktrace Tracer, got {type(tracer).__name__}")
    saes_dir = resolve_saes(model, saes, transcoders)
    loopback = _is_loopback(host)
    if not loopback:
        log.warning("serving on %s: anyone who can reach this address can read the graphs and run the model", host)
    app = create_app(
        data_dir,
        tracer,
        files=files,
        saes_dir=saes_dir,
        allowed_hosts=LOOPBACK_NAMES if loopback else None,
        limits=limits,
        max_memory=budget,
    )
    shown = f"[{host}]" if ":" in host else host
    log.info("graphs from %s; model %s", data_dir, tracer.model.name if tracer is not None else "none (view only)")
    if open_browser:
        threading.Timer(1.0, webbrowser.open, args=(f"http://{shown}:{port}/",)).start()
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)  # prints the URL
