"""vLLM throughput: full model vs a global top-k override vs an allocmoe per-layer plan, interleaved.

Run in the vLLM environment (README: vLLM):

    .venv-vllm/bin/python scripts/bench_vllm.py --shape qwen3-30b-a3b:2 --out docs/bench_vllm.json
    .venv-vllm/bin/python scripts/bench_vllm.py --model DIR [--plan plan.json] --out bench.json

Three engines are started in one process and kept alive: `full` (stock), `global` (every layer at top-k via
`hf_overrides={"num_experts_per_tok": k}`) and `plan` (allocmoe's plugin, the plan named by
`hf_overrides={"allocmoe_plan": ...}`). Without --plan, the per-layer plan has the same total as `global`
(k+1 and k-1 alternating, so it cannot be faster by spending less). For each concurrency (default 1, 4, 16
requests submitted together) the three engines are timed in rotating order for --repeats rounds. `--shape`
builds a config-only model directory with the real dimensions of a checkpoint (allocmoe.shapes; few layers)
and loads it with random (dummy) weights: what matters for speed is the shape of the compute, and a fixed-k
plan runs exactly k pairs per token whatever the weights are.

Timing: each round submits the N requests to the engine (`LLMEngine.add_request`) and steps it to the end,
timestamping every streamed output in this (front-end) process: TTFT = first token's arrival - submission,
ITL = the gaps between a request's successive token arrivals (per token), output tokens/s = N x max_tokens
/ round wall time. The round's prefill phase is submission -> the last request's first token, its decode
phase the rest. Reported: medians of tok/s over rounds, median and p90 of TTFT and ITL pooled over rounds and
requests, ratios to `full` and to `global`.

Amdahl limit (unless --no-profile): before the timed engines, one profiling engine per variant (`full` as
the identity plan, `global` as the uniform plan k, `plan`), eager, with ALLOCMOE_VLLM_PROFILE=1, runs each
workload once: the plugin times the routed-experts kernel call of every MoE layer (device-synchronised) and
counts its pairs and distinct experts, per call. Calls with more tokens than N requests are prefill(-holding)
steps, the others batched decode steps. The expert share of each phase is s = (full's expert seconds in that
phase) / (the timed full engine's median wall time of that phase); the expert work ratio r is, in prefill,
the (token, expert) pairs ratio and, in batched decode, the ratio of distinct experts read per decode step
(both measured), and limit = T_full / (T_pre ((1 - s_pre) + s_pre r_pre) + T_dec ((1 - s_dec) + s_dec r_dec)),
the speed-up over `full` that removing only the expert work could give. Targets (reported, never forced):
plan >= 0.95 x global at equal activations and plan >= 0.90 x its limit against full.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def shape_dir(spec: str, out: Path) -> Path:
    from allocmoe.shapes import SHAPES, SHAPE_CLASSES, parse_shape

    name, layers = parse_shape(spec)
    cfg = dict(SHAPES[name][0], num_hidden_layers=layers)
    cls, arch = SHAPE_CLASSES[name]
    model_type = {"Qwen3MoeConfig": "qwen3_moe", "DeepseekV2Config": "deepseek_v2"}[cls]
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**cfg, "model_type": model_type, "architectures": [arch],
                                                 "torch_dtype": "bfloat16"}, indent=1))
    return out


def moe_layers(cfg: dict) -> list[int]:
    n = cfg["num_hidden_layers"]
    first = cfg.get("first_k_dense_replace", 0) or 0
    only = set(cfg.get("mlp_only_layers") or [])
    step = cfg.get("decoder_sparse_step", 1) or 1
    return [i for i in range(n) if i >= first and i not in only and (i + 1) % step == 0]


def write_plan(model_dir: Path, ks_for: "callable", out: Path, recipe: str) -> Path:
    """A fixed-policy plan in allocmoe's plan format with k_j = ks_for(j, n_moe_layers) per MoE layer."""
    from allocmoe_vllm.plancheck import config_fingerprint

    cfg = json.loads((model_dir / "config.json").read_text())
    idx = moe_layers(cfg)
    ks = [ks_for(j, len(idx)) for j in range(len(idx))]
    fp = config_fingerprint(cfg)
    names = [f"model.layers.{i}.mlp" for i in idx]
    plan = {"format": "allocmoe-plan", "version": 1, "method": "manual", "token_policy": {"name": "fixed"},
            "renormalize": "native", "layers": [{"k": kk, "name": n} for kk, n in zip(ks, names)],
            "model": {**fp, "num_moe_layers": len(idx), "moe_layer_names": names},
            "budget": {"activations_per_token": sum(ks), "original_activations_per_token": fp["top_k"] * len(idx)},
            "meta": {"recipe": recipe}}
    out.write_text(json.dumps(plan, indent=1))
    return out


def mixed_ks(k: int, sign: int = 1):
    """k_j for the synthetic per-layer plan: k + sign, k - sign, ... (an odd last layer at k), the same total as
    global top-k, so it cannot be faster by spending less."""
    def ks(j, n):
        return k if (n % 2 and j == n - 1) else k + (sign if j % 2 == 0 else -sign)

    return ks


def synth_plan(model_dir: Path, k: int, out: Path) -> Path:
    """A per-layer plan (k+1, k-1, ...) with the same total as global top-k, in allocmoe's plan format."""
    return write_plan(model_dir, mixed_ks(k), out, f"bench_vllm synthetic per-layer plan around k={k}")


def bench_prompts(vocab: int, n: int, prompt_len: int) -> list:
    """n deterministic token-id prompts of prompt_len tokens (random weights: any ids will do)."""
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=[(7 + 31 * i + 17 * j) % (vocab - 10) + 5 for j in range(prompt_len)])
            for i in range(n)]


def pct(xs: list[float], q: float) -> float | None:
    """The q-quantile (0..1) of xs, linear interpolation; None for no data."""
    xs = sorted(xs)
    if not xs:
        return None
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def timed_round(llm, prompts, sp, tag: str) -> dict:
    """Submit all prompts, step the engine to the end; per-request token arrival times (front-end clock)."""
    from vllm.sampling_params import RequestOutputKind

    sp = sp.clone()  # LLM.generate sets output_kind FINAL_ONLY on the params it is given (entrypoints/common/offline.py)
    sp.output_kind = RequestOutputKind.CUMULATIVE  # an output every step: the streaming timestamps
    eng = llm.llm_engine
    t0 = time.perf_counter()
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        eng.add_request(rid, p, sp)
    seen = {rid: 0 for rid in ids}
    arrivals = {rid: [] for rid in ids}
    while eng.has_unfinished_requests():
        outs = eng.step()
        now = time.perf_counter()
        for o in outs:
            if o.request_id not in seen:
                continue
            n = len(o.outputs[0].token_ids)
            arrivals[o.request_id] += [now] * (n - seen[o.request_id])
            seen[o.request_id] = n
    wall = time.perf_counter() - t0
    if any(len(set(a)) < len(a) for a in arrivals.values()) and not any(len(set(a)) > 1 for a in arrivals.values()):
        raise SystemExit("error: the engine returned each request's tokens at once (no streaming): no ITL")
    ttft = [a[0] - t0 for a in arrivals.values() if a]
    itl = [b - a for arr in arrivals.values() for a, b in zip(arr, arr[1:])]
    pre = max(ttft) if ttft else wall
    return {"wall_s": wall, "ttft_s": ttft, "itl_s": itl, "prefill_s": pre, "decode_s": wall - pre,
            "tokens": sum(seen.values())}


def phase_profile(before: dict | None, after: dict | None, c: int) -> dict | None:
    """Sum over MoE layers of the profile difference (after - before) split at c tokens per call."""
    if not after:
        return None
    base = {l["layer"]: l.get("profile", {}) for l in (before or {}).get("layers", [])}
    out = {ph: {"calls": 0, "expert_s": 0.0, "pairs": 0, "distinct": 0} for ph in ("prefill", "decode")}
    for l in after["layers"]:
        for t, row in l.get("profile", {}).items():
            b = base.get(l["layer"], {}).get(t, [0, 0.0, 0, 0])
            ph = out["prefill" if int(t) > c else "decode"]
            for key, i in (("calls", 0), ("expert_s", 1), ("pairs", 2), ("distinct", 3)):
                ph[key] += row[i] - b[i]
    return out


def wait_counts(path: str, before: dict | None, min_new: int, timeout: float = 20.0) -> dict | None:
    from allocmoe_vllm.counts import read_counts

    base = {l["layer"]: l["tokens"] for l in (before or {}).get("layers", [])}
    deadline = time.time() + timeout
    while True:  # the least-advanced layer: the writer may snapshot mid-step (the last layers not yet counted)
        c = read_counts(path)
        if c and min(l["tokens"] - base.get(l["layer"], 0) for l in c["layers"]) >= min_new \
                or time.time() > deadline:
            return c
        time.sleep(0.2)


def shutdown(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # pragma: no cover - best effort
        pass


def profile_engines(common: dict, plans: dict, concurrencies: list[int], workloads: dict, sp, tmp: Path,
                    a_max_tokens: int) -> dict:
    """One eager profiling engine per variant (plugin, ALLOCMOE_VLLM_PROFILE=1), one after another."""
    from vllm import LLM

    from allocmoe_vllm.counts import read_counts

    prof = {}
    for name, plan in plans.items():
        path = str(tmp / f"profile-{name}.counts.json")
        os.environ.update(ALLOCMOE_COUNTS=path, ALLOCMOE_VLLM_PROFILE="1")
        try:
            llm = LLM(**{**common, "enforce_eager": True}, hf_overrides={"allocmoe_plan": str(plan)})
        finally:
            os.environ.pop("ALLOCMOE_VLLM_PROFILE", None)
        prof[name] = {}
        ran = {c: sum(len(p["prompt_token_ids"]) for p in workloads[c]) + len(workloads[c]) * (a_max_tokens - 1)
               for c in concurrencies}  # tokens one run of the workload puts through each MoE layer
        time.sleep(0.6)
        for c in concurrencies:
            base = read_counts(path)
            llm.generate(workloads[c], sp, use_tqdm=False)  # warm-up at this batch size
            before = wait_counts(path, base, ran[c])  # the warm-up's counts are flushed: the baseline
            r = timed_round(llm, workloads[c], sp, f"profile-{name}-{c}")
            after = wait_counts(path, before, ran[c])
            b = {l["layer"]: l["tokens"] for l in (before or {}).get("layers", [])}
            delta = {l["layer"]: l["tokens"] - b.get(l["layer"], 0) for l in (after or {}).get("layers", [])}
            if not delta or set(delta.values()) != {ran[c]}:
                raise SystemExit(f"error: profiling engine {name}: the plugin's counts for one run of the "
                                 f"{c}-request workload are not the {ran[c]} tokens it ran")
            prof[name][str(c)] = {"phases": phase_profile(before, after, c), "eager_prefill_s": r["prefill_s"],
                                  "eager_decode_s": r["decode_s"]}
        shutdown(llm)
        del llm
        gc.collect()
    return prof


def amdahl(prof: dict | None, c: int, names: list[str], timed: dict) -> dict:
    """Per engine: s, r and limit = T_full / predicted T (see the module docstring)."""
    out = {}
    if not prof:
        return out
    f = prof["full"][str(c)]["phases"]
    if not f:
        return out
    T_pre, T_dec = timed["full"]["prefill_s"], timed["full"]["decode_s"]
    s_pre = min(1.0, f["prefill"]["expert_s"] / T_pre) if T_pre > 0 else 0.0
    s_dec = min(1.0, f["decode"]["expert_s"] / T_dec) if T_dec > 0 else 0.0
    for n in names:
        p = (prof.get(n) or {}).get(str(c), {}).get("phases")
        if not p:
            continue
        r_pre = p["prefill"]["pairs"] / f["prefill"]["pairs"] if f["prefill"]["pairs"] else 1.0
        r_dec = p["decode"]["distinct"] / f["decode"]["distinct"] if f["decode"]["distinct"] else 1.0
        pred = T_pre * ((1 - s_pre) + s_pre * r_pre) + T_dec * ((1 - s_dec) + s_dec * r_dec)
        out[n] = {"s_prefill": s_pre, "s_decode": s_dec, "r_prefill_pairs": r_pre, "r_decode_distinct": r_dec,
                  "r_decode_pairs": p["decode"]["pairs"] / f["decode"]["pairs"] if f["decode"]["pairs"] else None,
                  "distinct_experts_per_decode_step": p["decode"]["distinct"] / p["decode"]["calls"]
                  if p["decode"]["calls"] else None,
                  "limit_vs_full": (T_pre + T_dec) / pred if pred > 0 else None}
    return out


def markdown(results: dict, names: list[str], gname: str) -> str:
    ms = lambda v: "" if v is None else f"{1000 * v:.1f}"  # noqa: E731
    x = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
    rows = ["| requests | engine | tok/s | x full | x global | limit | TTFT med / p90 ms | ITL med / p90 ms "
            "| plan >= 0.95 global | plan >= 0.90 limit |", "|---:|---|---:|---:|---:|---:|---:|---:|:-:|:-:|"]
    for c, res in results.items():
        for n in names:
            e = res[n]
            t = res.get("targets", {}) if n == "plan" else {}
            yes = lambda v: "" if v is None else ("yes" if v else "**no**")  # noqa: E731
            rows.append(f"| {c} | {n} | {e['output_tokens_per_s']:.1f} | {x(e['speedup_vs_full'])} | "
                        f"{x(e['ratio_vs_global'])} | {x(e.get('limit_vs_full'))} | {ms(e['ttft_median_s'])} / "
                        f"{ms(e['ttft_p90_s'])} | {ms(e['itl_median_s'])} / {ms(e['itl_p90_s'])} | "
                        f"{yes(t.get('plan_ge_095_global'))} | {yes(t.get('plan_ge_090_limit'))} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local Hugging Face model directory")
    src.add_argument("--shape", help="allocmoe shape, e.g. qwen3-30b-a3b:2 (random weights)")
    ap.add_argument("--plan", help="allocmoe plan (default: synthetic, same total as --k)")
    ap.add_argument("--k", type=int, help="global top-k of the override (default: half the model's top-k)")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--eager", action="store_true", help="timed engines without torch.compile / CUDA graphs")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiling engines (no Amdahl limit)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.28, help="per engine (three engines)")
    ap.add_argument("--kv-cache-mib", type=int, default=256, help="CPU: KV cache per engine (MiB)")
    ap.add_argument("--md", help="also write the markdown table here")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    try:
        concurrencies = [int(x) for x in a.concurrency.split(",")]
    except ValueError:
        ap.error(f"--concurrency must be comma-separated integers, got {a.concurrency!r}")
    if min(concurrencies) < 1 or a.repeats < 1 or a.max_tokens < 2:
        ap.error("--concurrency values and --repeats must be >= 1 and --max-tokens >= 2")
    if a.prompt_len <= max(concurrencies):
        ap.error(f"--prompt-len must exceed the largest concurrency ({max(concurrencies)}): calls with more "
                 f"tokens than requests are how prefill steps are told from decode steps")

    from vllm import LLM, SamplingParams

    tmp = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    model_dir = shape_dir(a.shape, tmp / "model") if a.shape else Path(a.model)
    cfg = json.loads((model_dir / "config.json").read_text())
    top_k = cfg["num_experts_per_tok"]
    k = a.k or max(1, top_k // 2)
    if not 1 <= k <= top_k:
        ap.error(f"--k must be in 1..{top_k} (the model's top-k), got {k}")
    plan = Path(a.plan) if a.plan else synth_plan(model_dir, k, tmp / "plan.json")
    gname = f"global_k{k}"
    common = dict(model=str(model_dir), dtype=a.dtype, max_model_len=a.prompt_len + a.max_tokens + 8, seed=0,
                  max_num_seqs=max(concurrencies), enable_prefix_caching=False, enforce_eager=a.eager,
                  max_num_batched_tokens=max(1024, a.prompt_len + a.max_tokens))
    if a.shape:
        common.update(load_format="dummy", skip_tokenizer_init=True)
    try:
        import torch

        if torch.cuda.is_available():
            common["gpu_memory_utilization"] = a.gpu_memory_utilization
        else:  # three engines share the machine's memory
            common["kv_cache_memory_bytes"] = a.kv_cache_mib << 20
    except ImportError:  # pragma: no cover
        pass
    vocab = cfg["vocab_size"]
    sp = SamplingParams(temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True)
    workloads = {c: bench_prompts(vocab, c, a.prompt_len) for c in concurrencies}

    prof = None
    if not a.no_profile:
        full_p = write_plan(model_dir, lambda j, n: top_k, tmp / "full_plan.json", "bench_vllm identity plan")
        uni_p = write_plan(model_dir, lambda j, n: k, tmp / "global_plan.json", f"bench_vllm uniform k={k}")
        prof = profile_engines(common, {"full": full_p, gname: uni_p, "plan": plan}, concurrencies, workloads, sp,
                               tmp, a.max_tokens)

    os.environ["ALLOCMOE_COUNTS"] = str(tmp / "counts.json")
    engines = {
        "full": LLM(**common),
        gname: LLM(**common, hf_overrides={"num_experts_per_tok": k}),
        "plan": LLM(**common, hf_overrides={"allocmoe_plan": str(plan)}),
    }
    names = list(engines)
    results = {}
    for c in concurrencies:
        for llm in engines.values():  # warm-up at this batch size
            llm.generate(workloads[c], sp, use_tqdm=False)
        rounds = {n: [] for n in names}
        for r in range(a.repeats):
            for n in names[r % 3:] + names[:r % 3]:  # rotate the order every round
                rounds[n].append(timed_round(engines[n], workloads[c], sp, f"{n}-{c}-{r}"))
        res = {}
        for n in names:
            rs = rounds[n]
            ttft = [t for x in rs for t in x["ttft_s"]]
            itl = [t for x in rs for t in x["itl_s"]]
            res[n] = {"median_s": statistics.median(x["wall_s"] for x in rs), "times_s": [x["wall_s"] for x in rs],
                      "output_tokens_per_s": statistics.median(c * a.max_tokens / x["wall_s"] for x in rs),
                      "prefill_s": statistics.median(x["prefill_s"] for x in rs),
                      "decode_s": statistics.median(x["decode_s"] for x in rs),
                      "ttft_median_s": pct(ttft, 0.5), "ttft_p90_s": pct(ttft, 0.9),
                      "itl_median_s": pct(itl, 0.5), "itl_p90_s": pct(itl, 0.9)}
        for n in names:
            res[n]["speedup_vs_full"] = res[n]["output_tokens_per_s"] / res["full"]["output_tokens_per_s"]
            res[n]["ratio_vs_global"] = res[n]["output_tokens_per_s"] / res[gname]["output_tokens_per_s"]
        lim = amdahl(prof, c, names, res)
        for n in names:
            if n in lim:
                res[n].update(amdahl=lim[n], limit_vs_full=lim[n]["limit_vs_full"])
        p = res["plan"]
        res["targets"] = {"plan_ge_095_global": p["ratio_vs_global"] >= 0.95,
                          "plan_ge_090_limit": (p["speedup_vs_full"] >= 0.90 * p["limit_vs_full"])
                          if p.get("limit_vs_full") else None}
        results[str(c)] = res
        print(f"concurrency {c:>3}: " + "  ".join(
            f"{n} {res[n]['output_tokens_per_s']:.1f} tok/s (x{res[n]['speedup_vs_full']:.3f}"
            + (f", limit x{res[n]['limit_vs_full']:.3f}" if res[n].get("limit_vs_full") else "") + ")"
            for n in names), flush=True)
    from allocmoe_vllm.counts import read_counts

    time.sleep(1.0)
    plan_d = json.loads(plan.read_text())
    out = {"model": a.shape or a.model, "dtype": a.dtype, "top_k": top_k, "global_k": k,
           "plan_ks": [l["k"] for l in plan_d["layers"]], "prompt_len": a.prompt_len, "max_tokens": a.max_tokens,
           "repeats": a.repeats, "eager": a.eager, "measured_plan_counts": read_counts(), "results": results,
           "profile": prof, "timing": "front-end streaming timestamps (LLMEngine.add_request + step)",
           "limit": "Amdahl on the routed-expert share; prefill: pairs ratio, batched decode: distinct-experts ratio"}
    import vllm

    out["vllm"] = vllm.__version__
    for llm in engines.values():
        shutdown(llm)
    table = markdown(results, names, gname)
    print(table)
    if a.md:
        Path(a.md).write_text(table + "\n")
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
