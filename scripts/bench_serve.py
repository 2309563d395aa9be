#!/usr/bin/env python
"""Serving throughput: the full and the budgeted `allocmoe serve`, N concurrent streaming clients, interleaved.

Two server processes (`allocmoe serve`, same model, one with the plan) run side by side; for each round and
each concurrency N (e.g. 1, 4, 16) the same requests go to the full and then the budgeted server (order
alternating per round), so slow drift of the machine hits both alike. Each request streams exactly
`--max-tokens` tokens (min_new_tokens = max_new_tokens, greedy) from a different prompt of the validation
text. Reported per server and N: output tokens/s (all tokens of the phase / its wall time), time to first
token and inter-token latency (gaps between streamed chunks), median and p90; then the ratio budget/full of
tokens/s beside the Amdahl limit 1 / ((1 - f) + f * A_plan / A_full), where f is the routed-expert share of
time, measured with hooks on every routed `experts` module of the unpatched model while it generates the same
request shape (batch 1, as the server runs it without continuous batching), and f_serve the same expert time
over the full server's time per token at N=1 (serving overhead included, so its limit is the tighter one).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_serve.py --out runs/bench_serve.json

`--shape deepseek-v2-lite[:LAYERS]` serves a random-weight model with the real DeepSeek-V2-Lite dimensions
(`allocmoe.shapes.build_shape`, seed 0, `--dtype`, bfloat16 recommended: 4 layers are ~2.2 B parameters).
`allocmoe serve --model DIR` loads checkpoints in float32 only (two fp32 servers of the 4-layer shape would
need ~18 GB), so for a shape each server process is this script in `--serve-shape` mode: it builds the same
seeded model in `--dtype`, applies the plan and serves it with exactly the app `allocmoe serve` runs
(`allocmoe.serving.build_app` + uvicorn); only the loading differs. Tokenizer: the built-in model's byte-level
BPE (8192 ids) extended to the shape's 102400 ids with tokens "Ġx<id>" (unreachable by encoding, each
decodes to " x<id>"), so prompts encode exactly as with the built-in tokenizer and every generated id
streams as non-empty text. DeepSeek-V2 (multi-head latent attention) cannot use transformers' continuous
batching (its paged cache holds K/V of one head size), so these servers run one `generate` at a time.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_serve.py --shape deepseek-v2-lite:4 --dtype bfloat16 \\
        --concurrency 1,4,16 --requests 16 --max-tokens 8 --rounds 2 --out docs/bench_serve_deepseek_v2_lite.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = (len(xs) - 1) * q
    lo, hi = int(i), min(int(i) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, plan: str | None, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    if args.shape:
        cmd = [sys.executable, os.path.abspath(__file__), "--serve-shape", args.shape, "--dtype", args.dtype,
               "--port", str(port), "--threads", str(args.threads)]
    else:
        cmd = [sys.executable, "-m", "allocmoe.cli", "serve", "--port", str(port), "--served-model-name", "bench",
               "--threads", str(args.threads)]
    if args.model:
        cmd += ["--model", args.model]
    if plan:
        cmd += ["--plan", plan]
    if args.continuous_batching:
        cmd += ["--continuous-batching"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log_path, "w"), env=env)
    return proc, f"http://127.0.0.1:{port}/v1"


def shape_tokenizer(vocab_size: int):
    """The built-in model's byte-level BPE tokenizer, extended to `vocab_size` ids.

    Ids 8192.. are added to the BPE vocabulary as "Ġx<id>" (no merge produces them, so text encodes exactly
    as with the built-in tokenizer); each decodes to " x<id>", so every id a random-weight model generates
    streams as one non-empty chunk.
    """
    import transformers as tf

    from allocmoe.models import default_model_dir

    base = tf.AutoTokenizer.from_pretrained(default_model_dir())
    j = json.loads(base.backend_tokenizer.to_str())
    vocab = j["model"]["vocab"]
    n0 = len(vocab)
    if vocab_size < n0:
        raise SystemExit(f"shape vocabulary {vocab_size} is smaller than the built-in tokenizer's {n0}")
    for i in range(n0, vocab_size):
        vocab[f"\u0120x{i}"] = i
    with tempfile.TemporaryDirectory(prefix="shape_tok_") as d:
        base.save_pretrained(d)
        (Path(d) / "tokenizer.json").write_text(json.dumps(j))
        tok = tf.AutoTokenizer.from_pretrained(d)
    assert len(tok) == vocab_size, (len(tok), vocab_size)
    return tok


def load_shape(spec: str, dtype: str):
    import torch

    from allocmoe.shapes import build_shape

    model = build_shape(spec, dtype=getattr(torch, dtype))
    return model, shape_tokenizer(model.config.vocab_size)


def serve_shape(args):
    """Server process for a shape: `allocmoe serve`'s app (build_app + uvicorn) on a seeded shape model."""
    import torch

    import allocmoe
    from allocmoe.serving import ServeLimits, bind_socket, build_app, make_server

    torch.set_num_threads(args.threads)
    sock = bind_socket("127.0.0.1", args.port)
    model, tok = load_shape(args.serve_shape, args.dtype)
    plan = allocmoe.Plan.load(args.plan) if args.plan else allocmoe.full_plan(model)
    handle = allocmoe.apply(model, plan, count_experts=False)
    limits = ServeLimits()
    app, shutdown = build_app(model, tok, handle, served_name="bench", limits=limits)
    try:
        make_server(app, limits).run(sockets=[sock])  # what `allocmoe serve` runs (SIGTERM drains, then exits)
    finally:
        shutdown()
        handle.remove()


def wait_ready(proc, url, timeout=600):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url + "/models", timeout=2).read()
            return
        except OSError:
            time.sleep(0.3)
    raise SystemExit("server did not start")


async def one_request(client, prompt, max_tokens, pin_length=True):
    # exactly max_tokens per request (no early EOS); continuous batching refuses per-request generation configs
    gen = json.dumps({"max_new_tokens": max_tokens, "min_new_tokens": max_tokens, "do_sample": False})
    t0 = time.perf_counter()
    stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, stream=True,
                                             temperature=0,
                                             extra_body={"generation_config": gen} if pin_length else None)
    times, usage = [], None
    async for ch in stream:
        if ch.choices and ch.choices[0].text:
            times.append(time.perf_counter())
        if ch.usage is not None:
            usage = ch.usage
    return {"ttft": times[0] - t0 if times else None, "gaps": [b - a for a, b in zip(times, times[1:])],
            "tokens": usage.completion_tokens if usage else 0,
            "activations_per_token": getattr(usage, "activations_per_token", None) if usage else None}


async def run_phase(url, n_clients, prompts, max_tokens, pin_length=True):
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="-", max_retries=0, timeout=600)
    queue = list(prompts)

    async def worker():
        out = []
        while queue:
            out.append(await one_request(client, queue.pop(0), max_tokens, pin_length))
        return out

    t0 = time.perf_counter()
    res = await asyncio.gather(*[worker() for _ in range(n_clients)])
    wall = time.perf_counter() - t0
    await client.close()
    reqs = [r for w in res for r in w]
    return {"wall_s": wall, "tokens": sum(r["tokens"] for r in reqs), "requests": len(reqs),
            "ttft": [r["ttft"] for r in reqs if r["ttft"] is not None], "gaps": [g for r in reqs for g in r["gaps"]],
            "activations_per_token": [r["activations_per_token"] for r in reqs]}


def expert_share(model, tok, prompt, max_tokens, repeats=3):
    """Share of bare `generate` time (batch 1) spent in routed experts modules, full model."""
    import torch

    from allocmoe import find_moe_layers

    acc = {"s": 0.0, "t0": 0.0}

    def pre(*_):
        acc["t0"] = time.perf_counter()

    def post(*_):
        acc["s"] += time.perf_counter() - acc["t0"]

    hooks = [h for l in find_moe_layers(model) for h in (l.experts.register_forward_pre_hook(pre),
                                                         l.experts.register_forward_hook(post))]
    enc = tok(prompt, return_tensors="pt")
    fs, per_tok = [], []
    try:
        for i in range(repeats + 1):
            acc["s"] = 0.0
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                               pad_token_id=tok.pad_token_id)
            t = time.perf_counter() - t0
            if i:  # first run is warm-up
                fs.append(acc["s"] / t)
                per_tok.append(acc["s"] / max_tokens)
    finally:
        for h in hooks:
            h.remove()
    return statistics.median(fs), statistics.median(per_tok)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model (default: the built-in one)")
    ap.add_argument("--shape", default=None, help="random-weight model with real dimensions, e.g. deepseek-v2-lite:4")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="with --shape")
    ap.add_argument("--serve-shape", default=None, help=argparse.SUPPRESS)  # internal: server process for a shape
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--plan", default=None, help="plan JSON (default: uniform --budget with --policy)")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--policy", default="fixed")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=16, help="requests per phase (shared by the N clients)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--continuous-batching", action="store_true")
    ap.add_argument("--out", default=None, help="JSON to write")
    args = ap.parse_args()
    if args.serve_shape:
        return serve_shape(args)
    if args.shape and args.model:
        raise SystemExit("pass either --model or --shape, not both")
    if args.shape and args.continuous_batching:
        raise SystemExit("DeepSeek-V2 shapes cannot use continuous batching (multi-head latent attention)")
    if args.dtype != "float32" and not args.shape:
        raise SystemExit("--dtype applies to --shape only (allocmoe serve loads checkpoints in float32)")
    with open("/proc/loadavg") as fh:
        load_start = fh.read().split()[:3]
    t_start = time.time()

    import torch

    torch.set_num_threads(args.threads)
    import allocmoe
    from allocmoe.data import builtin_text

    if args.shape:
        model, tok = load_shape(args.shape, args.dtype)
    else:
        model, tok, _ = allocmoe.load_model(args.model)
    plan = allocmoe.Plan.load(args.plan) if args.plan else allocmoe.allocate(
        model, budget=args.budget, method="uniform", token_policy=args.policy, tokenizer=tok)
    a_full, a_plan = sum(plan.original_ks), sum(plan.ks)
    words = builtin_text("validation").read_text().split()
    ids = tok(" ".join(words[:6000]))["input_ids"]
    n_prompts = args.requests
    prompts = [tok.decode(ids[i * args.prompt_tokens:(i + 1) * args.prompt_tokens]) for i in range(n_prompts)]
    f, expert_s_per_tok = expert_share(model, tok, prompts[0], args.max_tokens)
    print(f"routed-expert share of bare generate (batch 1): f = {f:.3f}", file=sys.stderr)
    del model

    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    plan_path = tmp / "plan.json"
    plan.save(plan_path)
    servers = {"full": start_server(args, None, tmp / "full.log"),
               "budget": start_server(args, str(plan_path), tmp / "budget.log")}
    conc = [int(x) for x in args.concurrency.split(",")]
    results = {name: {n: [] for n in conc} for name in servers}
    try:
        for name, (proc, url) in servers.items():
            wait_ready(proc, url)
            asyncio.run(run_phase(url, 2, prompts[:2], args.max_tokens, not args.continuous_batching))  # warm-up
        for rnd in range(args.rounds):
            order = ["full", "budget"] if rnd % 2 == 0 else ["budget", "full"]
            for n in conc:
                for name in order:
                    r = asyncio.run(run_phase(servers[name][1], n, prompts, args.max_tokens,
                                              not args.continuous_batching))
                    results[name][n].append(r)
                    print(f"round {rnd} N={n:>2} {name:>6}: {r['tokens'] / r['wall_s']:.1f} tok/s", file=sys.stderr)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()

    def summary(runs):
        tps = [r["tokens"] / r["wall_s"] for r in runs]
        ttft = [x for r in runs for x in r["ttft"]]
        gaps = [x for r in runs for x in r["gaps"]]
        acts = [x for r in runs for x in r["activations_per_token"] if x is not None]
        return {"tokens_per_s": statistics.median(tps), "tokens_per_s_best": max(tps), "tokens_per_s_runs": tps,
                "ttft_median_ms": 1e3 * pct(ttft, 0.5), "ttft_p90_ms": 1e3 * pct(ttft, 0.9),
                "itl_median_ms": 1e3 * pct(gaps, 0.5), "itl_p90_ms": 1e3 * pct(gaps, 0.9),
                "activations_per_token": statistics.mean(acts) if acts else None}

    table = {n: {name: summary(results[name][n]) for name in servers} for n in conc}
    serve_s_per_tok = 1.0 / table[conc[0]]["full"]["tokens_per_s"]
    f_serve = min(1.0, expert_s_per_tok / serve_s_per_tok)
    measured_plan = table[conc[0]]["budget"]["activations_per_token"] or a_plan
    limit = 1.0 / ((1 - f) + f * measured_plan / a_full)
    limit_serve = 1.0 / ((1 - f_serve) + f_serve * measured_plan / a_full)
    with open("/proc/loadavg") as fh:
        load_end = fh.read().split()[:3]
    wall_min = (time.time() - t_start) / 60
    lines = [f"model {args.shape and f'shape {args.shape} ({args.dtype}, random weights)' or args.model or 'built-in'}, plan {args.plan or f'uniform {args.budget} {args.policy}'}: "
             f"{measured_plan:.2f} of {a_full} activations/token (measured); {args.threads} thread(s); "
             f"continuous batching {'on' if args.continuous_batching else 'off'}; {args.requests} requests x "
             f"{args.max_tokens} tokens per phase, {args.rounds} rounds, medians (best round)",
             f"routed-expert share f = {f:.3f} (bare generate) -> Amdahl limit {limit:.3f}; "
             f"f_serve = {f_serve:.3f} (expert time / full server time per token at N={conc[0]}) -> limit "
             f"{limit_serve:.3f}",
             f"load average (1/5/15 min) at start {' '.join(load_start)}, at end {' '.join(load_end)} on "
             f"{os.cpu_count()} logical CPUs; wall time {wall_min:.1f} min", "",
             "| N | server | tok/s median (best) | TTFT med / p90 (ms) | ITL med / p90 (ms) | act/tok | "
             "ratio budget/full median (best) | limit f / f_serve |", "|---|---|---|---|---|---|---|---|"]
    for n in conc:
        ratio = table[n]["budget"]["tokens_per_s"] / table[n]["full"]["tokens_per_s"]
        ratio_best = table[n]["budget"]["tokens_per_s_best"] / table[n]["full"]["tokens_per_s_best"]
        table[n]["ratio"], table[n]["ratio_best"] = ratio, ratio_best
        for name in servers:
            s = table[n][name]
            lines.append(f"| {n} | {name} | {s['tokens_per_s']:.1f} ({s['tokens_per_s_best']:.1f}) | "
                         f"{s['ttft_median_ms']:.0f} / {s['ttft_p90_ms']:.0f} | {s['itl_median_ms']:.1f} / "
                         f"{s['itl_p90_ms']:.1f} | {s['activations_per_token']:.2f} | "
                         + (f"{ratio:.3f} ({ratio_best:.3f}) | {limit:.3f} / {limit_serve:.3f} |"
                            if name == "budget" else " | |"))
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "command": " ".join([sys.executable] + sys.argv), "settings": vars(args), "a_full": a_full,
            "loadavg_start": load_start, "loadavg_end": load_end, "wall_min": wall_min,
            "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
            "a_plan": a_plan, "f": f, "f_serve": f_serve, "amdahl_limit": limit, "amdahl_limit_serve": limit_serve,
            "table": {str(n): v for n, v in table.items()},
            "raw": {name: {str(n): v for n, v in d.items()} for name, d in results.items()},
            "markdown": text}, indent=1))


if __name__ == "__main__":
    main()
