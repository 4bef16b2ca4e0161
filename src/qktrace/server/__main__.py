"""`serve(paths, model, saes)`: run the web app with uvicorn on 127.0.0.1 (also `python -m qktrace.server`)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import tempfile
import threading
import webbrowser
from collections.abc import Sequence
from pathlib import Path

from ..config import resolve_model, resolve_saes
from ..errors import InputError, QKTraceError

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


def serve(
    paths: Sequence[str],
    model: str | None = None,
    saes: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    open_browser: bool = False,
    *,
    tracer: object | None = None,
) -> None:
    """Serve graph files (a directory and/or files) and, with a model (a path, hub id or 'demo'; or an
    already loaded `tracer`), compute graphs, QK attributions and sweeps. Blocks until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise QKTraceError("the web UI needs uvicorn: pip install 'qktrace[server]'") from None
    from ..tracer import Tracer
    from .app import create_app

    data_dir, files = split_paths(paths)
    if tracer is None and model is not None:
        tracer = Tracer.load(resolve_model(model), resolve_saes(model, saes))
    if tracer is not None and not isinstance(tracer, Tracer):
        raise InputError(f"tracer must be a qktrace Tracer, got {type(tracer).__name__}")
    saes_dir = resolve_saes(model, saes)
    loopback = _is_loopback(host)
    if not loopback:
        log.warning("serving on %s: anyone who can reach this address can read the graphs and run the model", host)
    app = create_app(
        data_dir,
        tracer,
        files=files,
        saes_dir=saes_dir,  # type: ignore[arg-type]
        allowed_hosts=LOOPBACK_NAMES if loopback else None,
    )
    shown = f"[{host}]" if ":" in host else host
    log.info("graphs from %s; model %s", data_dir, tracer.model.name if tracer is not None else "none (view only)")
    if open_browser:
        threading.Timer(1.0, webbrowser.open, args=(f"http://{shown}:{port}/",)).start()
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)  # prints the URL


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qktrace.server", description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="*", help="graph JSON files and/or one directory of them")
    ap.add_argument("--model", help="a save_pretrained directory, a hub id, or 'demo'")
    ap.add_argument("--saes", help="SAE directory (labels.json, dashboards.json are shown)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--open", action="store_true", help="open the page in a browser")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        serve(args.paths, args.model, args.saes, args.host, args.port, args.open)
    except QKTraceError as e:
        log.error("error: %s", e)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
