"""Running the app: settings, the listening socket, the model load, the foreground server (`allocmoe serve`,
SIGTERM/SIGINT drain then exit) and `BackgroundServer` (tests and benchmarks)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass, fields

from ..errors import AllocMoeError, DependencyError, SettingsError
from .limits import ServeLimits


def require_serving():
    try:
        import fastapi  # noqa: F401
        import openai  # noqa: F401
        import pydantic  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise DependencyError(f"serving needs fastapi, uvicorn, pydantic and openai ({e.name} is missing): "
                              "pip install 'allocmoe[serve]'") from None


@dataclass
class ServeSettings:
    model: str | None = None
    plan: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    continuous_batching: bool = False
    served_model_name: str | None = None
    max_batch_tokens: int = 512
    num_blocks: int = 64
    page_size: int = 64
    threads: int | None = None
    log_level: str = "warning"
    # request limits (ServeLimits; defaults there)
    max_body_bytes: int = ServeLimits.max_body_bytes
    max_context: int | None = ServeLimits.max_context
    default_max_tokens: int = ServeLimits.default_max_tokens
    request_timeout: float = ServeLimits.request_timeout
    max_concurrent_requests: int = ServeLimits.max_concurrent_requests
    drain_timeout: float = ServeLimits.drain_timeout

    def limits(self) -> ServeLimits:
        return ServeLimits(**{f.name: getattr(self, f.name) for f in fields(ServeLimits)}).check()


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind (before the slow model load) so a port in use is a one-line error, not a traceback later."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SettingsError(f"cannot listen on {host}:{port}: {e.strerror or e}", param="port") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def build_app(model, tokenizer, handle, *, served_name: str, continuous_batching: bool = False,
              cb_settings: dict | None = None, quiet: bool = True, limits: ServeLimits | None = None):
    """transformers' FastAPI app serving `model` (already patched; `handle` is its AppliedPlan).

    Returns (app, shutdown) where shutdown() stops the generation workers.
    """
    require_serving()
    from .app import create_app

    return create_app(model, tokenizer, handle, served_name=served_name, continuous_batching=continuous_batching,
                      cb_settings=cb_settings, quiet=quiet, limits=limits)


def make_server(app, limits: ServeLimits, log_level: str = "warning"):
    """A uvicorn server that, on shutdown, lets in-flight requests finish for `drain_timeout` seconds and then
    stops their generation at the next token."""
    import uvicorn

    from .app import DrainingServer

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=limits.drain_timeout + 3)
    return DrainingServer(config, app.state.allocmoe_registry, limits.drain_timeout)


def prepare(settings: ServeSettings):
    """Load the plan (cheap checks first), the model, apply the plan: (model, tokenizer, handle, served name)."""
    import torch

    from ..models import load_model
    from ..patching import apply
    from ..plan import Plan, full_plan

    plan = Plan.load(settings.plan) if settings.plan else None
    if plan is not None:  # refuse a plan made for another model before reading any weights
        from ..adapters import find_moe_layers
        from ..models import load_skeleton

        skeleton, _ = load_skeleton(settings.model)
        plan.check_model(find_moe_layers(skeleton), skeleton)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    model, tok, path = load_model(settings.model)
    if tok is None:
        raise AllocMoeError("the model has no tokenizer: serving needs one", param="model")
    handle = apply(model, plan if plan is not None else full_plan(model), count_experts=False)
    name = settings.served_model_name or (settings.model if settings.model else "allocmoe/default")
    return model, tok, handle, name


def serve(settings: ServeSettings, log=print) -> None:
    """Run the server in the foreground until SIGTERM/SIGINT (what `allocmoe serve` does)."""
    require_serving()
    limits = settings.limits()
    sock = bind_socket(settings.host, settings.port)
    try:
        model, tok, handle, name = prepare(settings)
        app, shutdown = build_app(model, tok, handle, served_name=name,
                                  continuous_batching=settings.continuous_batching,
                                  cb_settings=cb_settings(settings), limits=limits,
                                  quiet=settings.log_level not in ("info", "debug", "trace"))
        c = handle.counts()
        log(f"serving {name} on http://{settings.host}:{sock.getsockname()[1]}/v1 "
            f"(plan: {settings.plan or 'full model'}, {sum(handle.plan.ks)} of "
            f"{c['original_activations_per_token']} activations per token, token policy "
            f"{handle.plan.token_policy['name']}, continuous batching {'on' if settings.continuous_batching else 'off'})")
        server = make_server(app, limits, settings.log_level)
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises SIGINT once its graceful shutdown is done
            log("stopped")
        finally:
            shutdown()
            app.state.allocmoe_registry.wait_idle(2.0)
            handle.remove()
    finally:
        sock.close()


def cb_settings(s: ServeSettings) -> dict:
    return {"max_batch_tokens": s.max_batch_tokens, "num_blocks": s.num_blocks, "page_size": s.page_size}


class BackgroundServer:
    """The server on a free (or given) local port in a background thread: tests and benchmarks.

    with BackgroundServer(model, tok, plan) as srv: ... srv.base_url ...   # stops by itself on exit
    """

    def __init__(self, model, tokenizer, plan=None, *, host: str = "127.0.0.1", port: int = 0,
                 continuous_batching: bool = False, served_name: str = "allocmoe/test",
                 cb_settings: dict | None = None, handle=None, limits: ServeLimits | None = None):
        from ..patching import apply
        from ..plan import full_plan

        self.limits = (limits or ServeLimits()).check()
        self.sock = bind_socket(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.base_url = f"http://{host}:{self.port}/v1"
        self.model_name = served_name
        self.own_handle = handle is None
        self.handle = handle or apply(model, plan if plan is not None else full_plan(model), count_experts=False)
        try:
            self.app, self.shutdown_workers = build_app(
                model, tokenizer, self.handle, served_name=served_name, continuous_batching=continuous_batching,
                cb_settings=cb_settings or {"max_batch_tokens": 256, "num_blocks": 32, "page_size": 64},
                limits=self.limits)
        except BaseException:
            self.cleanup()
            raise
        self.server = make_server(self.app, self.limits)
        self.thread = threading.Thread(target=self.run, name="allocmoe-serve", daemon=True)

    def run(self):
        asyncio.run(self.server.serve(sockets=[self.sock]))

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def cleanup(self):
        if self.own_handle:
            self.handle.remove()
        self.sock.close()

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.shutdown_workers()
        self.app.state.allocmoe_registry.wait_idle(2.0)
        self.cleanup()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
