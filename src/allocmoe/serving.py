"""`allocmoe serve`: transformers' OpenAI-compatible server with a plan applied to the model it serves.

Nothing of transformers' server is forked. `transformers serve` builds its FastAPI app from a `ModelManager`
(loads models by name), a `GenerationState` (sequential `generate` on one inference thread, or continuous
batching with a paged KV cache) and one handler per endpoint. We construct those same objects with:

- a `ModelManager` whose two loading hooks (`_load_model`, `_load_processor`) return the model we loaded
  once and patched with `allocmoe.apply`, pinned (`force_model`) under a served name, never unloaded;
- a `GenerationState` whose sequential manager tells us which request each `generate` call serves, and a
  CPU-sized continuous-batching config (transformers sizes the paged cache from free *GPU* memory);
- completion / chat handlers that add the measured activations to the usage block (and a header).

Measurement: a forward hook on the model adds each forward call's measured (token, expert) pairs and real
tokens (`handle.counts()["last"]`) to every open meter. Sequentially one `generate` runs at a time, so a
request's meter holds exactly its own prompt and generated tokens ("scope": "request"). Under continuous
batching a forward call packs tokens of several requests; a request's meter then holds every call made
while it was in flight ("scope": "batch"): for `fixed`/`threshold` plans that is the same figure, for
`global` it is the budget the batch shared. The server-wide figure since start is always given too.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import socket
import threading
import time
from dataclasses import dataclass, field

from .errors import AllocMoeError, DependencyError, SettingsError

HEADER = "x-allocmoe-activations-per-token"
SERVER_HEADER = "x-allocmoe-server-activations-per-token"

# a plain prompt format for base models whose tokenizer has no chat template
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("allocmoe_request_id", default=None)


def _require_serving():
    try:
        import fastapi  # noqa: F401
        import openai  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise DependencyError(f"serving needs fastapi, uvicorn and openai ({e.name} is missing): "
                              "pip install 'allocmoe[serve]'") from None


@dataclass
class Meter:
    """Measured pairs and real tokens of the forward calls made while it was open."""

    pairs: int = 0
    tokens: int = 0
    open: bool = False

    @property
    def activations_per_token(self) -> float | None:
        return self.pairs / self.tokens if self.tokens else None


@dataclass
class ActivationMeters:
    """Per-request meters fed by a forward hook on the served model (thread-safe)."""

    handle: object
    scope: str = "request"
    meters: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    total: Meter = field(default_factory=Meter)  # whole forward calls since start (read under the lock)

    def install(self, model):
        return model.register_forward_hook(self._after_forward)

    def _after_forward(self, module, args, output):
        last = self.handle.counts()["last"]
        pairs, tokens = sum(last["pairs_per_layer"]), last["tokens"]
        with self.lock:
            self.total.pairs += pairs
            self.total.tokens += tokens
            for m in self.meters.values():
                if m.open:
                    m.pairs += pairs
                    m.tokens += tokens

    def create(self, rid: str, open: bool) -> Meter:
        with self.lock:
            m = self.meters[rid] = Meter(open=open)
        return m

    def set_open(self, rid: str | None, value: bool) -> None:
        with self.lock:
            m = self.meters.get(rid)
            if m is not None:
                m.open = value

    def pop(self, rid: str) -> Meter | None:
        with self.lock:
            return self.meters.pop(rid, None)

    def server(self) -> dict:
        with self.lock:  # not handle.counts(): another thread may be half-way through a forward call
            apt, tokens = self.total.activations_per_token, self.total.tokens
        return {"activations_per_token": apt, "tokens": tokens,
                "full_activations_per_token": sum(l.top_k for l in self.handle.layers)}


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
              cb_settings: dict | None = None, quiet: bool = True):
    """transformers' FastAPI app serving `model` (already patched; `handle` is its AppliedPlan).

    Returns (app, shutdown) where shutdown() stops the generation workers.
    """
    _require_serving()
    from fastapi import HTTPException
    from fastapi.responses import JSONResponse, StreamingResponse
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.systemone import SystemOneHandler
    from transformers.cli.serving.transcription import TranscriptionHandler
    from transformers.cli.serving.utils import GenerateManager, GenerationState

    if tokenizer is None:
        raise AllocMoeError("the model has no tokenizer: serving needs one")
    if continuous_batching and getattr(model.config, "kv_lora_rank", None):
        raise SettingsError(
            f"continuous batching does not support {model.config.model_type} (multi-head latent attention): "
            "transformers' paged KV cache holds K and V of one head size; serve with continuous_batching off",
            param="continuous_batching")
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    if quiet:  # transformers' server logs every request at warning level
        from transformers.utils import logging as hf_logging

        hf_logging.get_logger("transformers.cli.serving").setLevel(hf_logging.ERROR)
    meters = ActivationMeters(handle, scope="batch" if continuous_batching else "request")
    hook = meters.install(model)

    class PreloadedModelManager(ModelManager):
        """transformers' model manager, with its loading hooks returning the patched model."""

        def _load_model(self, model_id_and_revision, tqdm_class=None, progress_callback=None, gguf_file=None):
            return model

        def _load_processor(self, model_id_and_revision, gguf_file=None):
            return tokenizer

    class MeteredGenerateManager(GenerateManager):
        """Sequential generation; each submitted call opens its request's meter on the inference thread."""

        def _wrap(self, fn):
            rid = _request_id.get()

            def run(*a, **kw):
                meters.set_open(rid, True)
                try:
                    return fn(*a, **kw)
                finally:
                    meters.set_open(rid, False)
            return run

        def submit(self, fn, *args, **kwargs):
            return super().submit(self._wrap(fn), *args, **kwargs)

        def async_submit(self, fn, *args, **kwargs):
            return super().async_submit(self._wrap(fn), *args, **kwargs)

    class AllocGenerationState(GenerationState):
        def get_manager(self, model_id, use_cb=False):
            if not use_cb and model_id not in self._generate_managers:
                self._generate_managers[model_id] = MeteredGenerateManager()
            return super().get_manager(model_id, use_cb=use_cb)

    def usage_extra(rid: str) -> dict:
        m = meters.pop(rid)
        srv = meters.server()
        return {"activations_per_token": m.activations_per_token if m else None,
                "activations_scope": meters.scope,
                "routed_tokens": m.tokens if m else 0,
                "server_activations_per_token": srv["activations_per_token"],
                "full_activations_per_token": srv["full_activations_per_token"]}

    def fmt(x) -> str:
        return "" if x is None else f"{x:.4f}"

    class MeteredMixin:
        """Adds the measured activations to the usage block (and headers) of the stock handler's response."""

        def _check(self, body: dict) -> None:  # requests the stock handlers would answer with a 500
            if "max_tokens" in body and body["max_tokens"] is not None:
                if not isinstance(body["max_tokens"], int) or isinstance(body["max_tokens"], bool) \
                        or body["max_tokens"] < 1:
                    raise HTTPException(status_code=400, detail="max_tokens must be a positive integer")
            for key in ("temperature", "top_p"):
                v = body.get(key)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    raise HTTPException(status_code=400, detail=f"{key} must be a number")

        async def handle_request(self, body: dict, request_id: str):
            if not isinstance(body, dict):
                raise HTTPException(status_code=400, detail="the request body must be a JSON object")
            self._check(body)
            token = _request_id.set(request_id)
            meters.create(request_id, open=continuous_batching)
            try:
                resp = await super().handle_request(body, request_id)
            except BaseException:
                meters.pop(request_id)
                raise
            finally:
                _request_id.reset(token)
            if isinstance(resp, StreamingResponse):
                resp.headers[SERVER_HEADER] = fmt(meters.server()["activations_per_token"])
                resp.body_iterator = self._stream_with_usage(resp.body_iterator, request_id)
                return resp
            if isinstance(resp, JSONResponse):
                data = json.loads(resp.body)
                extra = usage_extra(request_id)
                if isinstance(data.get("usage"), dict):
                    data["usage"].update(extra)
                out = JSONResponse(data, status_code=resp.status_code)
                out.headers[HEADER] = fmt(extra["activations_per_token"])
                out.headers[SERVER_HEADER] = fmt(extra["server_activations_per_token"])
                return out
            meters.pop(request_id)
            return resp

        async def _stream_with_usage(self, inner, rid: str):
            try:
                async for chunk in inner:
                    text = chunk if isinstance(chunk, str) else chunk.decode()
                    if '"usage"' in text:
                        text = self._inject(text, usage_extra(rid))
                    yield text
            finally:
                meters.pop(rid)
                await inner.aclose()

        @staticmethod
        def _inject(text: str, extra: dict) -> str:
            out = []
            for event in text.split("\n\n"):
                if event.startswith("data: ") and '"usage"' in event:
                    try:
                        data = json.loads(event[6:])
                        if isinstance(data.get("usage"), dict):
                            data["usage"].update(extra)
                            event = "data: " + json.dumps(data)
                    except ValueError:
                        pass
                out.append(event)
            return "\n\n".join(out)

    class Completions(MeteredMixin, CompletionHandler):
        pass

    class ChatCompletions(MeteredMixin, ChatCompletionHandler):
        def _check(self, body):
            super()._check(body)
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), (str, list, type(None))) for m in msgs):
                raise HTTPException(status_code=400,
                                    detail="messages must be a non-empty list of {role, content} objects")

    manager = PreloadedModelManager(force_model=served_name, continuous_batching=continuous_batching)
    cb_config = None
    if continuous_batching:
        from transformers import ContinuousBatchingConfig

        cb_config = ContinuousBatchingConfig(use_cuda_graph=False, **(cb_settings or {}))
    state = AllocGenerationState(continuous_batching=continuous_batching, cb_config=cb_config)
    kw = dict(model_manager=manager, generation_state=state)
    app = build_server(
        manager, ChatCompletions(**kw), completion_handler=Completions(**kw),
        response_handler=ResponseHandler(**kw), transcription_handler=TranscriptionHandler(manager, state),
        systemone_handler=SystemOneHandler(**kw), generation_state=state)

    @app.get("/v1/allocmoe")
    def allocmoe_info():
        c = handle.counts()
        return JSONResponse({"model": served_name, "plan": {"token_policy": handle.plan.token_policy,
                                                             "ks": handle.plan.ks, "budget": handle.plan.budget},
                             "continuous_batching": continuous_batching, "counts": c})

    def shutdown():
        state.shutdown()
        hook.remove()

    return app, shutdown


def prepare(settings: ServeSettings):
    """Load the plan (cheap checks first), the model, apply the plan: (model, tokenizer, handle, served name)."""
    import torch

    from .models import load_model
    from .patching import apply
    from .plan import Plan, full_plan

    plan = Plan.load(settings.plan) if settings.plan else None
    if plan is not None:  # refuse a plan made for another model before reading any weights
        from .adapters import find_moe_layers
        from .models import load_skeleton

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
    """Run the server in the foreground until interrupted (what `allocmoe serve` does)."""
    _require_serving()
    import uvicorn

    sock = bind_socket(settings.host, settings.port)
    try:
        model, tok, handle, name = prepare(settings)
        app, shutdown = build_app(model, tok, handle, served_name=name,
                                  continuous_batching=settings.continuous_batching,
                                  cb_settings=_cb_settings(settings),
                                  quiet=settings.log_level not in ("info", "debug", "trace"))
        c = handle.counts()
        log(f"serving {name} on http://{settings.host}:{sock.getsockname()[1]}/v1 "
            f"(plan: {settings.plan or 'full model'}, {sum(handle.plan.ks)} of "
            f"{c['original_activations_per_token']} activations per token, token policy "
            f"{handle.plan.token_policy['name']}, continuous batching {'on' if settings.continuous_batching else 'off'})")
        server = uvicorn.Server(uvicorn.Config(app, log_level=settings.log_level))
        try:
            server.run(sockets=[sock])
        finally:
            shutdown()
            handle.remove()
    finally:
        sock.close()


def _cb_settings(s: ServeSettings) -> dict:
    return {"max_batch_tokens": s.max_batch_tokens, "num_blocks": s.num_blocks, "page_size": s.page_size}


class BackgroundServer:
    """The server on a free (or given) local port in a background thread: tests and benchmarks.

    with BackgroundServer(model, tok, plan) as srv: ... srv.base_url ...   # stops by itself on exit
    """

    def __init__(self, model, tokenizer, plan=None, *, host: str = "127.0.0.1", port: int = 0,
                 continuous_batching: bool = False, served_name: str = "allocmoe/test",
                 cb_settings: dict | None = None, handle=None):
        from .patching import apply
        from .plan import full_plan

        self.sock = bind_socket(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.base_url = f"http://{host}:{self.port}/v1"
        self.model_name = served_name
        self._own_handle = handle is None
        self.handle = handle or apply(model, plan if plan is not None else full_plan(model), count_experts=False)
        try:
            self.app, self._shutdown = build_app(
                model, tokenizer, self.handle, served_name=served_name, continuous_batching=continuous_batching,
                cb_settings=cb_settings or {"max_batch_tokens": 256, "num_blocks": 32, "page_size": 64})
        except BaseException:
            self._cleanup()
            raise
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self._run, name="allocmoe-serve", daemon=True)

    def _run(self):
        asyncio.run(self.server.serve(sockets=[self.sock]))

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def _cleanup(self):
        if self._own_handle:
            self.handle.remove()
        self.sock.close()

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self._shutdown()
        self._cleanup()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
