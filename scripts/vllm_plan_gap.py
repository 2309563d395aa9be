"""Where a per-layer plan loses time against vLLM's global top-k override (issue 18's open gap).

Run in the vLLM environment (README: vLLM):

    OMP_NUM_THREADS=1 VLLM_CPU_OMP_THREADS_BIND=nobind .venv-vllm/bin/python scripts/vllm_plan_gap.py \
        --shape qwen3-30b-a3b:2 --k 4 --concurrency 1 --out gap.json

Engines, kept alive side by side and timed in rotating order (bench_vllm.py's timed rounds): `global_k<k>`
(vLLM's override), `plan_uniform` (the plugin, every layer at k: the plugin's own cost), `plan_mixed` (k+1, k-1,
...: the cost of mixing k) and `plan_mixed_rev` (k-1, k+1, ...: whether the order of the layers matters). Then
each engine runs --profile-rounds rounds under vLLM's torch profiler (`profiler_config`), and the per-op self
CPU time of each is written beside the others, so the op that costs the extra time shows as a row that differs.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vllm import bench_prompts, mixed_ks, moe_layers, shape_dir, shutdown, timed_round, write_plan  # noqa: E402

ROW = re.compile(r"^\s*(\S.*?)\s{2,}(-?[\d.]+)%\s+([\d.]+)(us|ms|s)\s+")


def self_cpu_ms(table: str) -> dict[str, float]:
    """op name -> self CPU time (ms) from a torch profiler key_averages table (its first two time columns are
    'Self CPU %' and 'Self CPU')."""
    out = {}
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    for line in table.splitlines():
        m = ROW.match(line)
        if m:
            out[m[1].strip()] = out.get(m[1].strip(), 0.0) + float(m[3]) * scale[m[4]]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="qwen3-30b-a3b:2")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile-rounds", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--kv-cache-mib", type=int, default=256)
    ap.add_argument("--variants", default="global,plan_uniform,plan_mixed,plan_mixed_rev",
                    help="engines to compare (each holds the model's weights: about 5 GB for the default shape in bf16)")
    ap.add_argument("--top", type=int, default=25, help="ops shown, by the largest difference")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    from vllm import LLM, SamplingParams

    tmp = Path(tempfile.mkdtemp(prefix="vllm-gap-"))
    model_dir = shape_dir(a.shape, tmp / "model")
    cfg = json.loads((model_dir / "config.json").read_text())
    n = len(moe_layers(cfg))
    k = a.k
    plans = {"plan_uniform": write_plan(model_dir, lambda j, n: k, tmp / "u.json", f"uniform k={k}"),
             "plan_mixed": write_plan(model_dir, mixed_ks(k), tmp / "m.json", f"k+1, k-1 around {k}"),
             "plan_mixed_rev": write_plan(model_dir, mixed_ks(k, -1), tmp / "r.json", f"k-1, k+1 around {k}")}
    common = dict(model=str(model_dir), dtype=a.dtype, max_model_len=a.prompt_len + a.max_tokens + 8, seed=0,
                  max_num_seqs=a.concurrency, enable_prefix_caching=False, enforce_eager=a.eager,
                  max_num_batched_tokens=max(1024, a.prompt_len + a.max_tokens), load_format="dummy",
                  skip_tokenizer_init=True, kv_cache_memory_bytes=a.kv_cache_mib << 20)
    gname = f"global_k{k}"
    variants = {gname: {"hf_overrides": {"num_experts_per_tok": k}},
                **{name: {"hf_overrides": {"allocmoe_plan": str(p)}} for name, p in plans.items()}}
    want = a.variants.split(",")
    variants = {nm: kw for nm, kw in variants.items() if (nm if nm != gname else "global") in want}
    if gname not in variants:
        ap.error("--variants must include 'global' (the reference)")
    engines = {}
    for name, kw in variants.items():
        prof = {"profiler": "torch", "torch_profiler_dir": str(tmp / f"prof-{name}"),
                "torch_profiler_with_stack": False}
        engines[name] = LLM(**common, **kw, profiler_config=prof)
    sp = SamplingParams(temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True)
    vocab = cfg["vocab_size"]
    prompts = bench_prompts(vocab, a.concurrency, a.prompt_len)
    names = list(engines)
    for name in names:  # warm-up: compile / first-call costs out of the timed rounds
        timed_round(engines[name], prompts, sp, f"warm-{name}")
    rounds = {name: [] for name in names}
    for r in range(a.repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            rounds[name].append(timed_round(engines[name], prompts, sp, f"{name}-{r}"))
    res = {"args": vars(a), "moe_layers": n, "plans": {nm: [l["k"] for l in json.loads(p.read_text())["layers"]]
                                                       for nm, p in plans.items()}, "engines": {}}
    for name in names:
        tok = [x["tokens"] / x["wall_s"] for x in rounds[name]]
        itl = [t for x in rounds[name] for t in x["itl_s"]]
        res["engines"][name] = {"tok_s_median": statistics.median(tok), "itl_ms_median": 1e3 * statistics.median(itl),
                                "tok_s_rounds": tok}
    base = res["engines"][gname]["tok_s_median"]
    for name in names:
        e = res["engines"][name]
        e["x_global"] = e["tok_s_median"] / base
        print(f"{name:16s} tok/s {e['tok_s_median']:7.2f}  x global {e['x_global']:.3f}  ITL {e['itl_ms_median']:.1f} ms",
              flush=True)
    ops = {}
    for name in names:
        llm = engines[name]
        llm.start_profile()
        for r in range(a.profile_rounds):
            timed_round(llm, prompts, sp, f"prof-{name}-{r}")
        llm.stop_profile()
        tables = sorted((tmp / f"prof-{name}").rglob("*.txt"))
        ops[name] = {}
        for t in tables:
            for op, ms in self_cpu_ms(t.read_text()).items():
                ops[name][op] = ops[name].get(op, 0.0) + ms / a.profile_rounds
        shutdown(llm)
    allops = sorted({op for d in ops.values() for op in d},
                    key=lambda op: -max(abs(ops[nm].get(op, 0.0) - ops[gname].get(op, 0.0)) for nm in names))
    res["self_cpu_ms_per_round"] = {op: {nm: round(ops[nm].get(op, 0.0), 3) for nm in names} for op in allops}
    print("\nself CPU ms per round (ops with the largest difference from the override first):")
    print(f"{'op':60s} " + " ".join(f"{nm[:14]:>14s}" for nm in names))
    for op in allops[: a.top]:
        print(f"{op[:60]:60s} " + " ".join(f"{ops[nm].get(op, 0.0):14.2f}" for nm in names))
    print(f"{'total':60s} " + " ".join(f"{sum(ops[nm].values()):14.2f}" for nm in names))
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
