"""The local web app: `create_app(data_dir, tracer=None)` (FastAPI) and `serve(...)`, which runs it.

Needs the `server` extra (fastapi, uvicorn, pydantic); importing this package without them raises
ImportError. The JSON contract with the page is `qktrace.server.schemas`; `serve` lives in
`__main__` (`python -m qktrace.server`) and is imported on first use.
"""

from __future__ import annotations

from typing import Any

from .app import create_app
from .schemas import API_VERSION

__all__ = ["API_VERSION", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name == "serve":  # lazily, so that `python -m qktrace.server` runs __main__ exactly once
        from .__main__ import serve

        return serve
    raise AttributeError(f"module 'qktrace.server' has no attribute '{name}'")
