"""The FastAPI app of `allocmoe serve`: transformers' own server objects, subclassed at module level.

Nothing of transformers' server is forked. `transformers serve` builds its FastAPI app from a `ModelManager`
(loads models by name), a `GenerationState` (sequential `generate` on one inference thread, or continuous
batching with a paged KV cache) and one handler per endpoint. We construct those same objects with:

- `PreloadedModelManager`: its two loading hooks return the model we loaded once and patched with
  `allocmoe.apply`, pinned (`force_model`) under a served name, never unloaded;
- `AllocGenerationState` handing out `MeteredGenerateManager` (sequential: opens the request's meter on the
  inference thread, fits `max_new_tokens` to the context, adds the request's stopping criterion, seeds) or
  `LimitedCBGenerateManager` (continuous batching, CPU-sized config, a watchdog for time and disconnects);
- `Completions` / `ChatCompletions`: validate the body first (`validation.py`), then add the measured
  activations to the usage block (and a header) of the stock handler's response.
`limits.LimitsMiddleware` sits in front (body size, served paths, admission, disconnect watching).
Import this module only after `server.require_serving()` (it imports fastapi).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

import torch
import uvicorn
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers.cli.serving.chat_completion import ChatCompletionHandler
from transformers.cli.serving.completion import CompletionHandler
from transformers.cli.serving.model_manager import ModelManager
from transformers.cli.serving.server import build_server
from transformers.cli.serving.utils import CBGenerateManager, GenerateManager, GenerationState

from ..errors import AllocMoeError, SettingsError
from .limits import (ControlRegistry, LimitsMiddleware, RequestControl, RequestError, ServeLimits, current_control,
                     stopping_criteria)
from .meters import HEADER, SERVER_HEADER, ActivationMeters
from .validation import ValidationContext, validate_request

STOPPED_HEADER = "x-allocmoe-stopped-by"

# a plain prompt format for base models whose tokenizer has no chat template
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

log = logging.getLogger("allocmoe.serve")


@dataclass
class ServeContext:
    """What the handlers and generation managers of one app share."""

    meters: ActivationMeters
    limits: ServeLimits
    registry: ControlRegistry
    context_len: int
    validation: ValidationContext
    continuous_batching: bool = False

    def control(self) -> RequestControl:
        c = current_control.get()
        if c is None:
            raise RuntimeError("generation outside a request")
        return c

    def fit(self, control: RequestControl, input_len: int, gen_config) -> None:
        """Bound the request by the model's context; set max_new_tokens and sampling from the request."""
        req, field, ctx_len = control.request, control.prompt_field, self.context_len
        if input_len == 0:
            raise RequestError(400, f"{field}: empty after tokenization", field)
        if input_len >= ctx_len:
            raise RequestError(400, f"{field}: {input_len} tokens, the model's context is {ctx_len} tokens "
                               "(--max-context), leaving no room to generate", field)
        room = ctx_len - input_len
        asked, name = None, None
        for n in ("max_completion_tokens", "max_tokens"):
            if getattr(req, n, None) is not None:
                asked, name = getattr(req, n), n
                break
        if asked is None and req.generation_config is not None and \
                json.loads(req.generation_config).get("max_new_tokens") is not None:
            asked, name = gen_config.max_new_tokens, "generation_config"
        if asked is not None and asked > room:
            raise RequestError(400, f"{name}: {asked} new tokens after a {input_len}-token prompt exceed the "
                               f"model's context of {ctx_len} tokens (at most {room} here)", name)
        gen_config.max_new_tokens = asked if asked is not None else min(self.limits.default_max_tokens, room)
        if req.temperature is not None and req.temperature > 0:
            gen_config.do_sample = True


class PreloadedModelManager(ModelManager):
    """transformers' model manager, with its loading hooks returning the patched model."""

    def __init__(self, model, tokenizer, **kwargs):
        self.preloaded = (model, tokenizer)
        super().__init__(**kwargs)

    def _load_model(self, model_id_and_revision, tqdm_class=None, progress_callback=None, gguf_file=None):
        return self.preloaded[0]

    def _load_processor(self, model_id_and_revision, gguf_file=None):
        return self.preloaded[1]


class MeteredGenerateManager(GenerateManager):
    """Sequential generation on one inference thread, each call bounded, metered and stoppable."""

    def __init__(self, ctx: ServeContext):
        super().__init__()
        self.ctx = ctx

    def generate_streaming(self, model, processor, inputs, gen_config, request_id, response_parser=None):
        control = self.ctx.control()
        self.ctx.fit(control, inputs["input_ids"].shape[-1], gen_config)
        inputs = {**inputs, "stopping_criteria": stopping_criteria(control)}
        return super().generate_streaming(model, processor, inputs, gen_config, request_id,
                                          response_parser=response_parser)

    async def generate_non_streaming(self, model, processor, inputs, gen_config, request_id):
        control = self.ctx.control()
        self.ctx.fit(control, inputs["input_ids"].shape[-1], gen_config)
        inputs = {**inputs, "stopping_criteria": stopping_criteria(control)}
        return await super().generate_non_streaming(model, processor, inputs, gen_config, request_id)

    def wrap(self, fn, skip_if_stopped: bool):
        control, meters = self.ctx.control(), self.ctx.meters

        def run(*a, **kw):  # on the inference thread
            if skip_if_stopped and control.should_stop():  # the client left (or shutdown) while it queued
                raise RequestError(503, f"request not run: {control.stopped_by}", None, "cancelled")
            control.start()
            seed = getattr(control.request, "seed", None)
            if seed is not None:
                torch.manual_seed(seed)
            meters.set_open(control.request_id, True)
            try:
                return fn(*a, **kw)
            finally:
                meters.set_open(control.request_id, False)
        return run

    def submit(self, fn, *args, **kwargs):  # streaming: a cancelled stream's first put() already skips prefill
        return super().submit(self.wrap(fn, False), *args, **kwargs)

    def async_submit(self, fn, *args, **kwargs):
        return super().async_submit(self.wrap(fn, True), *args, **kwargs)


class LimitedCBGenerateManager(CBGenerateManager):
    """transformers' continuous batching, each request bounded by the context, the time limit and its client."""

    def __init__(self, ctx: ServeContext, cb_config=None):
        super().__init__(cb_config=cb_config)
        self.ctx = ctx

    def generate_streaming(self, model, processor, inputs, gen_config, request_id, response_parser=None):
        control = self.ctx.control()
        self.ctx.fit(control, len(inputs["input_ids"]), gen_config)
        control.start()
        queue, streamer = super().generate_streaming(model, processor, inputs, gen_config, request_id,
                                                     response_parser=response_parser)
        asyncio.ensure_future(self.watchdog(control, streamer, queue))
        return queue, streamer

    @staticmethod
    async def watchdog(control: RequestControl, streamer, queue):
        while not control.finished:
            if control.should_stop():
                streamer.cancel()
                queue.put_nowait(None)
                return
            await asyncio.sleep(0.2)

    async def generate_non_streaming(self, model, processor, inputs, gen_config, request_id):
        control = self.ctx.control()
        self.ctx.fit(control, len(inputs["input_ids"]), gen_config)
        control.start()
        task = asyncio.ensure_future(super().generate_non_streaming(model, processor, inputs, gen_config,
                                                                    request_id))
        while not task.done():
            await asyncio.wait({task}, timeout=0.2)
            if not task.done() and control.should_stop():
                self._cb.cancel_request(request_id)  # our own (inherited) CB manager
                task.cancel()
                raise RequestError(504, f"generation stopped: {control.stopped_by} (--request-timeout "
                                   f"{self.ctx.limits.request_timeout:g} s)", None, "timeout")
        return task.result()


class AllocGenerationState(GenerationState):
    """Hands out our two generation managers (one served model: one of each at most)."""

    def __init__(self, ctx: ServeContext, **kwargs):
        super().__init__(**kwargs)
        self.ctx, self.cb_config = ctx, kwargs.get("cb_config")
        self.sequential: MeteredGenerateManager | None = None
        self.batching: LimitedCBGenerateManager | None = None

    def get_manager(self, model_id, use_cb=False):
        if use_cb:
            if self.batching is None:
                self.batching = LimitedCBGenerateManager(self.ctx, cb_config=self.cb_config)
            return self.batching
        if self.sequential is None:
            self.sequential = MeteredGenerateManager(self.ctx)
        return self.sequential

    def shutdown(self):
        super().shutdown()
        if self.batching is not None:
            self.batching.stop()
            self.batching = None

    def is_cb_alive(self):
        return self.batching is None or self.batching.is_alive()


def fmt(x) -> str:
    return "" if x is None else f"{x:.4f}"


class AllocHandlerMixin:
    """Validates the body, then adds the measured activations to the usage block (and headers) of the stock
    handler's response; a generation stopped by the time limit reports finish_reason "length"."""

    endpoint, prompt_field = "completions", "prompt"

    def __init__(self, *args, ctx: ServeContext, **kwargs):
        super().__init__(*args, **kwargs)
        self.ctx = ctx

    async def handle_request(self, body: dict, request_id: str):
        req = validate_request(self.endpoint, body, self.ctx.validation)
        control = current_control.get()
        token = None
        if control is None:  # called without the middleware (direct use of the handler)
            control = RequestControl(self.ctx.limits.request_timeout, self.ctx.registry.shutdown)
            token = current_control.set(control)
        control.request, control.prompt_field = req, self.prompt_field
        if control.request_id != request_id:  # without the middleware (or a header it did not set)
            control.request_id = request_id
        body = {k: v for k, v in body.items() if k != "seed"}  # seeded on the inference thread, not here
        meters = self.ctx.meters
        meters.create(request_id, open=self.ctx.continuous_batching)
        try:
            resp = await super().handle_request(body, request_id)
        except (RequestError, HTTPException):
            meters.pop(request_id)
            raise
        except Exception as e:  # one line in the log and a JSON 500, never a traceback
            meters.pop(request_id)
            log.error("allocmoe serve: request %s failed: %s: %s", request_id, type(e).__name__, e)
            raise RequestError(500, f"generation failed: {type(e).__name__}: {e}", None, "server_error") from None
        finally:
            if token is not None:
                current_control.reset(token)
        if isinstance(resp, StreamingResponse):
            resp.headers[SERVER_HEADER] = fmt(meters.server()["activations_per_token"])
            resp.body_iterator = self.stream_with_usage(resp.body_iterator, request_id, control)
            return resp
        if isinstance(resp, JSONResponse):
            data = json.loads(resp.body)
            extra = meters.usage_extra(request_id)
            self.mark_stopped(data, extra, control)
            if isinstance(data.get("usage"), dict):
                data["usage"].update(extra)
            out = JSONResponse(data, status_code=resp.status_code)
            out.headers[HEADER] = fmt(extra["activations_per_token"])
            out.headers[SERVER_HEADER] = fmt(extra["server_activations_per_token"])
            if control.stopped_by:
                out.headers[STOPPED_HEADER] = control.stopped_by
            return out
        meters.pop(request_id)
        return resp

    @staticmethod
    def mark_stopped(data: dict, extra: dict, control: RequestControl) -> None:
        if control.stopped_by == "time_limit":
            extra["stopped_by"] = "time_limit"
            for choice in data.get("choices") or []:
                choice["finish_reason"] = "length"

    async def stream_with_usage(self, inner, rid: str, control: RequestControl):
        try:
            async for chunk in inner:
                text = chunk if isinstance(chunk, str) else chunk.decode()
                if '"usage"' in text:
                    text = self.inject(text, self.ctx.meters.usage_extra(rid), control)
                yield text
        finally:
            self.ctx.meters.pop(rid)
            await inner.aclose()

    def inject(self, text: str, extra: dict, control: RequestControl) -> str:
        out = []
        for event in text.split("\n\n"):
            if event.startswith("data: ") and '"usage"' in event:
                try:
                    data = json.loads(event[6:])
                    if isinstance(data.get("usage"), dict):
                        self.mark_stopped(data, extra, control)
                        data["usage"].update(extra)
                        event = "data: " + json.dumps(data)
                except ValueError:
                    pass
            out.append(event)
        return "\n\n".join(out)


class Completions(AllocHandlerMixin, CompletionHandler):
    endpoint, prompt_field = "completions", "prompt"


class ChatCompletions(AllocHandlerMixin, ChatCompletionHandler):
    endpoint, prompt_field = "chat", "messages"


class DrainingServer(uvicorn.Server):
    """uvicorn's server; on shutdown in-flight requests may finish for `drain_timeout` seconds, then their
    generation stops at the next token (uvicorn's graceful-shutdown timeout ends the rest a little later)."""

    def __init__(self, config, registry: ControlRegistry, drain_timeout: float):
        super().__init__(config)
        self.registry, self.drain_timeout = registry, drain_timeout

    async def shutdown(self, sockets=None):
        n = self.registry.in_flight()
        if n:
            log.warning("allocmoe serve: draining %d request(s) for up to %g s", n, self.drain_timeout)
        timer = asyncio.get_running_loop().call_later(self.drain_timeout, self.registry.cancel_all)
        try:
            await super().shutdown(sockets=sockets)
        finally:
            timer.cancel()
            self.registry.cancel_all()


async def request_error_response(request: Request, exc: RequestError):
    return JSONResponse(exc.body(), status_code=exc.status)


def context_length(model, limits: ServeLimits) -> int:
    n = limits.max_context or getattr(model.config, "max_position_embeddings", None)
    if not n:
        raise SettingsError("the model's config has no max_position_embeddings: give --max-context",
                            param="max_context")
    return int(n)


def create_app(model, tokenizer, handle, *, served_name: str, continuous_batching: bool = False,
               cb_settings: dict | None = None, quiet: bool = True, limits: ServeLimits | None = None):
    """(app, shutdown): transformers' FastAPI app serving `model` (already patched; `handle` its AppliedPlan)."""
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.systemone import SystemOneHandler
    from transformers.cli.serving.transcription import TranscriptionHandler

    limits = (limits or ServeLimits()).check()
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
    registry = ControlRegistry(limits)
    ctx = ServeContext(ActivationMeters(handle, scope="batch" if continuous_batching else "request"), limits,
                       registry, context_length(model, limits),
                       ValidationContext(getattr(model.config, "vocab_size", None), continuous_batching),
                       continuous_batching)
    hook = ctx.meters.install(model)
    manager = PreloadedModelManager(model, tokenizer, force_model=served_name,
                                    continuous_batching=continuous_batching)
    cb_config = None
    if continuous_batching:
        from transformers import ContinuousBatchingConfig

        cb_config = ContinuousBatchingConfig(use_cuda_graph=False, **(cb_settings or {}))
    state = AllocGenerationState(ctx, continuous_batching=continuous_batching, cb_config=cb_config)
    kw = dict(model_manager=manager, generation_state=state)
    app = build_server(
        manager, ChatCompletions(ctx=ctx, **kw), completion_handler=Completions(ctx=ctx, **kw),
        response_handler=ResponseHandler(**kw), transcription_handler=TranscriptionHandler(manager, state),
        systemone_handler=SystemOneHandler(**kw), generation_state=state)
    app.add_exception_handler(RequestError, request_error_response)
    app.add_middleware(LimitsMiddleware, limits=limits, registry=registry)
    app.state.allocmoe_registry = registry

    @app.get("/v1/allocmoe")
    def allocmoe_info():
        return JSONResponse({"model": served_name, "plan": {"token_policy": handle.plan.token_policy,
                                                             "ks": handle.plan.ks, "budget": handle.plan.budget},
                             "continuous_batching": continuous_batching, "counts": handle.counts(),
                             "limits": {**limits.__dict__, "context": ctx.context_len}})

    def shutdown():
        registry.cancel_all()
        state.shutdown()
        hook.remove()

    return app, shutdown
