"""`allocmoe serve`: transformers' OpenAI-compatible server with a plan applied to the model it serves.

- `server`: settings, socket, model load, the foreground server and `BackgroundServer` (tests, benchmarks);
- `app`: the FastAPI app, built from transformers' own server objects subclassed at module level;
- `limits`: request limits (body size, concurrency, time, disconnects, shutdown) and the ASGI middleware;
- `validation`: request bodies checked against the OpenAI schema (pydantic) before any generation;
- `meters`: the measured activations per request.

Measurement: a forward hook on the model adds each forward call's measured (token, expert) pairs and real
tokens (`handle.counts()["last"]`) to every open meter (see `meters`).
"""

from __future__ import annotations

from .limits import RequestError, ServeLimits
from .meters import HEADER, SERVER_HEADER
from .server import (BackgroundServer, ServeSettings, bind_socket, build_app, make_server, prepare, require_serving,
                     serve)

__all__ = ["HEADER", "SERVER_HEADER", "BackgroundServer", "RequestError", "ServeLimits", "ServeSettings",
           "bind_socket", "build_app", "make_server", "prepare", "require_serving", "serve"]
