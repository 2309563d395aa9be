"""`allocmoe serve`: an OpenAI-compatible server with a plan applied (serving.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import ModelOpt, app, err


@app.command()
def serve(
    model: Optional[str] = ModelOpt,
    plan: Optional[Path] = typer.Option(None, "--plan", "-p", help="Plan JSON to apply (default: the full model)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (default: this machine only)."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port to listen on (0-65535; 0: any free port)."),
    continuous_batching: bool = typer.Option(
        False, "--continuous-batching", help="Pack concurrent requests into shared forward calls (transformers' "
        "continuous batching, paged KV cache; not for multi-head-latent-attention models such as DeepSeek-V2)."),
    served_model_name: Optional[str] = typer.Option(
        None, help="Model name clients send (default: the --model value, or allocmoe/default)."),
    max_batch_tokens: int = typer.Option(512, help="Continuous batching: most tokens in one forward call."),
    num_blocks: int = typer.Option(64, help="Continuous batching: KV cache blocks (of --page-size tokens)."),
    page_size: int = typer.Option(64, help="Continuous batching: tokens per KV cache page."),
    threads: Optional[int] = typer.Option(None, help="torch threads (default: torch's choice)."),
    log_level: str = typer.Option("warning", help="uvicorn log level."),
    max_body_bytes: int = typer.Option(
        1 << 20, min=1, help="Largest request body in bytes; larger ones get 413 (default 1 MiB)."),
    max_context: Optional[int] = typer.Option(
        None, min=2, help="Most tokens of prompt + max_tokens; more get 400 (default: the model's "
        "max_position_embeddings)."),
    default_max_tokens: int = typer.Option(
        256, min=1, help="max_tokens of a request that names none (cut to what the context leaves)."),
    request_timeout: float = typer.Option(
        120.0, min=0.001, help="Seconds one generation may run; then it stops (finish_reason \"length\", "
        "usage.stopped_by \"time_limit\")."),
    max_concurrent_requests: int = typer.Option(
        64, min=1, help="Generation requests in flight (queued included); more get 503."),
    drain_timeout: float = typer.Option(
        5.0, min=0, help="On SIGTERM/SIGINT: seconds in-flight requests may finish before they are stopped."),
    engine: str = typer.Option(
        "transformers", help="transformers (default) or vllm: vLLM's OpenAI server with allocmoe's plugin applying "
        "the plan (needs --plan and vLLM installed; README: vLLM)."),
    dtype: Optional[str] = typer.Option(None, help="--engine vllm: weights dtype (auto, float32, bfloat16, float16)."),
):
    """Serve the model with a plan applied: OpenAI-compatible /v1/models, /v1/completions, /v1/chat/completions.

    transformers' own server (`transformers serve`) with the patched model preloaded. Each completion's usage
    block carries the measured activations per token (`activations_per_token`, and the server's so far);
    non-streaming responses also carry them in the x-allocmoe-activations-per-token header.

    Every request is checked first (OpenAI schema types and ranges: 400 naming the field; body size: 413;
    prompt + max_tokens within the context: 400); a generation stops when its client disconnects or after
    --request-timeout; SIGTERM/SIGINT let in-flight requests finish for --drain-timeout seconds, then exit.
    """
    from ..errors import SettingsError

    if engine not in ("transformers", "vllm"):
        raise SettingsError(f"unknown engine {engine!r} (choose transformers or vllm)", param="engine")
    if engine == "vllm":
        from ..engines import vllm_serve

        rc = vllm_serve(model, str(plan) if plan else None, host=host, port=port, dtype=dtype or "auto",
                        served_model_name=served_model_name,
                        log=lambda s: err.print(s, highlight=False, markup=False, soft_wrap=True))
        raise typer.Exit(rc)
    if dtype is not None:
        raise SettingsError("--dtype is for --engine vllm (the transformers server loads the model in float32)",
                            param="dtype")
    from ..serving import ServeSettings, serve as run_server

    run_server(ServeSettings(model=model, plan=str(plan) if plan else None, host=host, port=port,
                             continuous_batching=continuous_batching, served_model_name=served_model_name,
                             max_batch_tokens=max_batch_tokens, num_blocks=num_blocks, page_size=page_size,
                             threads=threads, log_level=log_level, max_body_bytes=max_body_bytes,
                             max_context=max_context, default_max_tokens=default_max_tokens,
                             request_timeout=request_timeout, max_concurrent_requests=max_concurrent_requests,
                             drain_timeout=drain_timeout),
               log=lambda s: err.print(s, highlight=False, markup=False, soft_wrap=True))

