"""Request limits for `allocmoe serve`: body size, concurrency, time, disconnects and shutdown.

- `ServeLimits`: the limits (each an `allocmoe serve` flag; defaults in the README's Serve section).
- `LimitsMiddleware`: a plain ASGI middleware in front of transformers' app. It answers 413 for a body over
  `max_body_bytes` (judged from Content-Length when given; the excess is read and dropped, never kept, so a
  client still sending sees the answer, up to 32x the limit or 5 s), 404 for endpoints allocmoe does not serve,
  503 when `max_concurrent_requests` generations are in flight; it reads the body itself, replays it to the
  app and then watches the connection, so a client that goes away (streaming or not) is noticed at once.
- `RequestControl`: one per generation request, reachable from the handler and generation manager through a
  context variable; `ControlCriterion` (a transformers `StoppingCriteria`) ends `generate` at the next token
  when the client is gone, the request ran past `request_timeout`, or the server is shutting down.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import threading
import time
import uuid
from dataclasses import dataclass

from transformers import StoppingCriteria, StoppingCriteriaList

from ..errors import SettingsError

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
SERVED_PATHS = frozenset({"/v1/models", "/v1/allocmoe", "/health"}) | GENERATION_PATHS


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask of the server (each field is an `allocmoe serve` flag of the same name)."""

    max_body_bytes: int = 1 << 20          # 413 above this
    max_context: int | None = None         # prompt + max_tokens; None: the model's max_position_embeddings
    default_max_tokens: int = 256          # when a request names none (cut to what the context leaves)
    request_timeout: float = 120.0         # seconds of generation, then it stops (finish_reason "length")
    max_concurrent_requests: int = 64      # generation requests in flight (queued included); 503 above
    drain_timeout: float = 5.0             # on SIGTERM/SIGINT: seconds in-flight requests may finish

    def check(self) -> "ServeLimits":
        for name in ("max_body_bytes", "default_max_tokens", "max_concurrent_requests"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise SettingsError(f"{name.replace('_', '-')} must be a positive integer", param=name)
        if self.max_context is not None and (not isinstance(self.max_context, int) or self.max_context < 2):
            raise SettingsError("max-context must be an integer of at least 2", param="max_context")
        if not self.request_timeout > 0:
            raise SettingsError("request-timeout must be positive (seconds)", param="request_timeout")
        if not self.drain_timeout >= 0:
            raise SettingsError("drain-timeout must be zero or positive (seconds)", param="drain_timeout")
        return self


class RequestError(Exception):
    """A request the server refuses: answered with `status` and an OpenAI-style error naming `param`."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return error_body(self.message, self.param, self.kind)


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class RequestControl:
    """One generation request's state shared by the event loop and the inference thread."""

    def __init__(self, time_limit: float, shutdown: threading.Event | None = None):
        self.time_limit = time_limit
        self.disconnected = threading.Event()
        self.shutdown = shutdown or threading.Event()
        self.finished = False
        self.started: float | None = None
        self.stopped_by: str | None = None
        self.request = None          # the validated request (validation.CompletionRequest / ChatRequest)
        self.request_id: str | None = None  # unique among the requests in flight (see ControlRegistry.open)

    def start(self) -> None:
        self.started = time.monotonic()

    def should_stop(self) -> bool:
        if self.stopped_by is None:
            if self.disconnected.is_set():
                self.stopped_by = "disconnect"
            elif self.shutdown.is_set():
                self.stopped_by = "shutdown"
            elif self.started is not None and time.monotonic() - self.started > self.time_limit:
                self.stopped_by = "time_limit"
        return self.stopped_by is not None


current_control: contextvars.ContextVar[RequestControl | None] = contextvars.ContextVar(
    "allocmoe_request_control", default=None)


class ControlRegistry:
    """The generation requests in flight: admission (`max_concurrent_requests`) and shutdown."""

    def __init__(self, limits: ServeLimits):
        self.limits = limits
        self.shutdown = threading.Event()
        self.lock = threading.Lock()
        self.active: set[RequestControl] = set()
        self.ids: set[str] = set()

    def open(self, wanted_id: str | None = None) -> RequestControl | None:
        """A control for a new request (None when `max_concurrent_requests` are in flight). Its request_id is
        `wanted_id` (the client's x-request-id) unless that is missing or already in flight: request ids key the
        meters and transformers' continuous-batching requests, so two in flight must never share one."""
        with self.lock:
            if len(self.active) >= self.limits.max_concurrent_requests:
                return None
            c = RequestControl(self.limits.request_timeout, self.shutdown)
            c.request_id = wanted_id if wanted_id and wanted_id not in self.ids else uuid.uuid4().hex
            self.active.add(c)
            self.ids.add(c.request_id)
            return c

    def close(self, c: RequestControl) -> None:
        c.finished = True
        with self.lock:
            self.active.discard(c)
            self.ids.discard(c.request_id)

    def in_flight(self) -> int:
        with self.lock:
            return len(self.active)

    def cancel_all(self) -> None:
        """Stop every generation at its next token (and any started later)."""
        self.shutdown.set()

    def wait_idle(self, timeout: float) -> bool:
        t0 = time.monotonic()
        while self.in_flight() and time.monotonic() - t0 < timeout:
            time.sleep(0.05)
        return not self.in_flight()


class ControlCriterion(StoppingCriteria):
    """A `StoppingCriteria` for `generate`: True (for every row) once the request should stop."""

    def __init__(self, control: RequestControl):
        self.control = control

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.control.should_stop(), dtype=torch.bool,
                          device=input_ids.device)


def stopping_criteria(control: RequestControl) -> StoppingCriteriaList:
    return StoppingCriteriaList([ControlCriterion(control)])


async def send_json(send, status: int, body: dict, close: bool = False) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data, "more_body": False})


class LimitsMiddleware:
    """Plain ASGI middleware: body size, served paths, admission, disconnect watching (see the module doc)."""

    DRAIN_FACTOR, DRAIN_SECONDS = 32, 5.0

    def __init__(self, app, limits: ServeLimits, registry: ControlRegistry, allowed_paths=SERVED_PATHS):
        self.app, self.limits, self.registry, self.allowed_paths = app, limits, registry, allowed_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if self.allowed_paths is not None and path not in self.allowed_paths:
            return await send_json(send, 404, error_body(f"{path} is not served here (allocmoe serve answers "
                                                         f"{', '.join(sorted(self.allowed_paths))})", None,
                                                         "not_found_error"))
        limit = self.limits.max_body_bytes
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            return await self.refuse_body(receive, send, int(declared))
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await self.refuse_body(receive, send, None, more=msg.get("more_body", False))
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        control = None
        if path in GENERATION_PATHS and scope.get("method") == "POST":
            wanted = headers.get(b"x-request-id", b"").decode("latin-1") or None
            control = self.registry.open(wanted)
            if control is None:
                return await send_json(send, 503, error_body(
                    f"server busy: {self.limits.max_concurrent_requests} requests in flight "
                    "(--max-concurrent-requests)", None, "server_busy"))
            if control.request_id != wanted:  # transformers' middleware takes the request id from this header
                scope = dict(scope, headers=[h for h in scope.get("headers") or [] if h[0] != b"x-request-id"]
                             + [(b"x-request-id", control.request_id.encode())])
        await self._run(scope, receive, send, b"".join(chunks), control)

    async def refuse_body(self, receive, send, declared: int | None, more: bool = True) -> None:
        """413. The rest of the body is read and dropped first (kept nowhere; at most DRAIN_FACTOR x the limit
        and DRAIN_SECONDS) so that an ordinary client, still sending, reads the answer instead of a reset."""
        limit = self.limits.max_body_bytes
        if more and (declared is None or declared <= self.DRAIN_FACTOR * limit):
            dropped, t0 = 0, time.monotonic()
            while dropped <= self.DRAIN_FACTOR * limit and time.monotonic() - t0 < self.DRAIN_SECONDS:
                try:
                    msg = await asyncio.wait_for(receive(), max(0.01, self.DRAIN_SECONDS - (time.monotonic() - t0)))
                except asyncio.TimeoutError:  # a client that stalls gets its answer now
                    break
                if msg["type"] == "http.disconnect":
                    return
                dropped += len(msg.get("body", b""))
                if not msg.get("more_body", False):
                    break
        await send_json(send, 413, error_body(f"request body over {limit} bytes (--max-body-bytes)", None,
                                              "request_too_large"), close=True)

    async def _run(self, scope, receive, send, body: bytes, control: RequestControl | None):
        gone = asyncio.Event()
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def watch():
            try:
                while (await receive())["type"] != "http.disconnect":
                    pass
            except Exception:  # a broken connection is a disconnect too
                pass
            if control is not None:
                control.disconnected.set()
            gone.set()

        watcher = asyncio.ensure_future(watch())
        token = current_control.set(control)
        try:
            await self.app(scope, replay, send)
        finally:
            current_control.reset(token)
            watcher.cancel()
            if control is not None:
                self.registry.close(control)
