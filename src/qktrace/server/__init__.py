"""The local web app: `create_app(data_dir, tracer=None)` (FastAPI) and `serve(...)`, which runs it.

Needs the `server` extra (fastapi, uvicorn, pydantic); importing this package without them raises
ImportError. The JSON contract with the page is `qktrace.server.schemas`; `serve` lives in
`launch.py` (`python -m qktrace.server` is `qktrace serve`).
"""

from __future__ import annotations

from .app import create_app
from .launch import serve
from .schemas import API_VERSION

__all__ = ["API_VERSION", "create_app", "serve"]
