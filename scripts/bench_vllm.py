"""vLLM throughput: full model vs a global top-k override vs an allocmoe per-layer plan, interleaved.

Run in the vLLM environment (README: vLLM):

    .venv-vllm/bin/python scripts/bench_vllm.py --shape qwen3-30b-a3b:2 --out docs/bench_vllm.json
    .venv-vllm/bin/python scripts/bench_vllm.py --model DIR [--plan plan.json] --out bench.json

Three engines are started in one process and kept alive: `full` (stock), `global` (every layer at top-k via
`hf_overrides={"num_experts_per_tok": k}`) and `plan` (allocmoe's plugin, the plan named by
`hf_overrides={"allocmoe_plan": ...}`). Without --plan, the per-layer plan has the same total as `global`
(k+1 and k-1 alternating, so it cannot be faster by spending less). For each concurrency (default 1, 4, 16
requests submitted together) the three engines are timed in rotating order for --repeats rounds; the table
reports median output tokens/s and the ratio to `full`. `--shape` builds a config-only model directory with
the real dimensions of a checkpoint (allocmoe.shapes; few layers) and loads it with random (dummy) weights:
what matters for speed is the shape of the compute, and a fixed-k plan runs exactly k pairs per token
whatever the weights are. The plugin's measured counts are reported beside the timings.
"""

from __future__ import annotations

import argparse
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


def synth_plan(model_dir: Path, k: int, out: Path) -> Path:
    """A per-layer plan (k+1, k-1, ...) with the same total as global top-k, in allocmoe's plan format."""
    from allocmoe_vllm.plancheck import config_fingerprint

    cfg = json.loads((model_dir / "config.json").read_text())
    idx = moe_layers(cfg)
    ks = [k + (1 if j % 2 == 0 else -1) for j in range(len(idx))]
    if len(idx) % 2:
        ks[-1] = k
    fp = config_fingerprint(cfg)
    plan = {"format": "allocmoe-plan", "version": 1, "method": "manual", "token_policy": {"name": "fixed"},
            "renormalize": "native", "layers": [{"k": kk, "name": f"model.layers.{i}.mlp"} for kk, i in zip(ks, idx)],
            "model": {**fp, "num_moe_layers": len(idx), "moe_layer_names": [f"model.layers.{i}.mlp" for i in idx]},
            "budget": {"activations_per_token": sum(ks), "original_activations_per_token": fp["top_k"] * len(idx)},
            "meta": {"recipe": f"bench_vllm synthetic per-layer plan around k={k}"}}
    out.write_text(json.dumps(plan, indent=1))
    return out


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
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.28, help="per engine (three engines)")
    ap.add_argument("--kv-cache-mib", type=int, default=256, help="CPU: KV cache per engine (MiB)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    tmp = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    model_dir = shape_dir(a.shape, tmp / "model") if a.shape else Path(a.model)
    cfg = json.loads((model_dir / "config.json").read_text())
    top_k = cfg["num_experts_per_tok"]
    k = a.k or max(1, top_k // 2)
    plan = Path(a.plan) if a.plan else synth_plan(model_dir, k, tmp / "plan.json")
    os.environ.setdefault("ALLOCMOE_COUNTS", str(tmp / "counts.json"))
    common = dict(model=str(model_dir), dtype=a.dtype, max_model_len=a.prompt_len + a.max_tokens + 8, seed=0,
                  max_num_seqs=max(int(c) for c in a.concurrency.split(",")), enable_prefix_caching=False,
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
    engines = {
        "full": LLM(**common),
        f"global_k{k}": LLM(**common, hf_overrides={"num_experts_per_tok": k}),
        "plan": LLM(**common, hf_overrides={"allocmoe_plan": str(plan)}),
    }
    vocab = cfg["vocab_size"]
    sp = SamplingParams(temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True)
    results = {}
    for c in (int(x) for x in a.concurrency.split(",")):
        prompts = [TokensPrompt(prompt_token_ids=[(7 + 31 * i + 17 * j) % (vocab - 10) + 5
                                                  for j in range(a.prompt_len)]) for i in range(c)]
        names = list(engines)
        for llm in engines.values():  # warm-up at this batch size
            llm.generate(prompts, sp, use_tqdm=False)
        times = {n: [] for n in names}
        for r in range(a.repeats):
            for n in names[r % 3:] + names[:r % 3]:  # rotate the order every round
                t0 = time.perf_counter()
                engines[n].generate(prompts, sp, use_tqdm=False)
                times[n].append(time.perf_counter() - t0)
        med = {n: statistics.median(t) for n, t in times.items()}
        results[str(c)] = {n: {"median_s": med[n], "times_s": times[n],
                               "output_tokens_per_s": c * a.max_tokens / med[n], "speedup_vs_full": med["full"] / med[n]}
                           for n in names}
        print(f"concurrency {c:>3}: " + "  ".join(f"{n} {results[str(c)][n]['output_tokens_per_s']:.1f} tok/s "
                                                 f"(x{results[str(c)][n]['speedup_vs_full']:.3f})" for n in names),
              flush=True)
    from allocmoe_vllm.counts import read_counts

    time.sleep(1.0)
    plan_d = json.loads(plan.read_text())
    out = {"model": a.shape or a.model, "dtype": a.dtype, "top_k": top_k, "global_k": k,
           "plan_ks": [l["k"] for l in plan_d["layers"]], "prompt_len": a.prompt_len, "max_tokens": a.max_tokens,
           "repeats": a.repeats, "measured_plan_counts": read_counts(), "results": results}
    import vllm

    out["vllm"] = vllm.__version__
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
