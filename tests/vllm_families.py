"""MoE families on vLLM: tiny random models (built in the main environment) and a runner that starts several
vLLM engines, one after another, in ONE process (run in the vLLM environment).

Builders (main environment; transformers' config classes + save_pretrained + the built-in tokenizer, no hub):

    save_tiny("olmoe" | "mixtral" | "deepseek_v2", path) -> str

Runner (vLLM environment; imports only vLLM and allocmoe_vllm, never allocmoe or transformers):

    .venv-vllm/bin/python tests/vllm_families.py --model DIR --prompts '[[ids...], ...]' --out out.json \\
        --engine stock --engine full=full.json --engine half=half.json [--max-tokens N] [--dtype float32]
        [--llm-kwargs '{"attention_backend": "CPU_MLA"}'] [--one-at-a-time] [--profile NAME]

Each `--engine NAME[=PLAN]` is an engine started with the plan named by vLLM's own option
(`hf_overrides={"allocmoe_plan": PLAN}`), or none; it runs greedy generation on the prompts, its counts file
is its own (ALLOCMOE_COUNTS=<out>.<NAME>.counts.json, read before and after generation: the difference is what
the generation ran), and it is shut down before the next starts. The output maps NAME -> {tokens, logprobs,
counts, expected_tokens}; a start-up failure is recorded as {"error": "<type>: <first line>"}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

#: family -> (per-layer k of the "half" plan (a different k per layer, about half the original activations),
#: the tiny config's keyword arguments). Shapes are tiny except where vLLM's CPU kernels need a size.
FAMILIES = {
    # OLMoE: softmax over 32 experts, top-8, never renormalised (norm_topk_prob False, as OLMoE-1B-7B)
    "olmoe": ([4, 2, 6, 3], dict(cls="OlmoeConfig", arch="OlmoeForCausalLM", num_experts=32, num_experts_per_tok=8,
                                 norm_topk_prob=False, intermediate_size=64, num_attention_heads=2,
                                 num_key_value_heads=2)),
    # Mixtral: softmax, top-4 of 16, renormalised over the kept experts (softmax over the top-k logits)
    "mixtral": ([2, 1, 3, 2], dict(cls="MixtralConfig", arch="MixtralForCausalLM", num_local_experts=16,
                                   num_experts_per_tok=4, intermediate_size=64, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=64, sliding_window=None)),
    # DeepSeek-V2 (V2-Lite layout): MLA with the real latent sizes vLLM's CPU MLA needs (kv_lora_rank 512 +
    # qk_rope_head_dim 64 = head size 576), layer 0 dense, 16 routed experts top-4 + 1 shared, greedy top-k,
    # softmax weights never renormalised, routed_scaling_factor 1
    "deepseek_v2": ([2, 1, 3], dict(cls="DeepseekV2Config", arch="DeepseekV2ForCausalLM", n_routed_experts=16,
                                    num_experts_per_tok=4, n_shared_experts=1, moe_intermediate_size=64,
                                    intermediate_size=128, first_k_dense_replace=1, num_attention_heads=2,
                                    num_key_value_heads=2, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
                                    qk_nope_head_dim=32, v_head_dim=32, head_dim=64, topk_method="greedy", n_group=1,
                                    topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False)),
}
COMMON = dict(vocab_size=8192, hidden_size=128, num_hidden_layers=4, max_position_embeddings=512,
              tie_word_embeddings=False, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_config(family: str):
    import transformers as tf

    kw = dict(FAMILIES[family][1])
    cls, arch = kw.pop("cls"), kw.pop("arch")
    cfg = getattr(tf, cls)(**COMMON, **kw)
    cfg.architectures = [arch]
    return cfg


def save_tiny(family: str, path, seed: int = 0, router_scale: float = 4.0, init_std: float = 0.05,
              expert_std: float = 0.2) -> str:
    """A tiny random model of `family` (fp32) with sharpened routers (so a per-layer plan changes the greedy
    output), plus the built-in model's tokenizer."""
    import torch
    import transformers as tf

    import allocmoe

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.5 if name.startswith("lm_head") else expert_std if ".experts." in name else init_std)
        for layer in allocmoe.find_moe_layers(model):
            w = layer.router.weight
            w.normal_(0, router_scale / math.sqrt(w.shape[1]))
    model.eval().save_pretrained(path)
    assets = Path(allocmoe.__file__).parent / "assets" / "default_model"
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(assets / f, Path(path) / f)
    return str(path)


# --- the vLLM runner (vLLM environment) -----------------------------------------------------------------

def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _run_engine(a, name: str, plan: str | None, prompts: list[list[int]]) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from allocmoe_vllm.counts import read_counts

    counts_file = f"{a.out}.{name}.counts.json"
    os.environ["ALLOCMOE_COUNTS"] = counts_file  # the engine process is spawned with this environment
    os.environ.pop("ALLOCMOE_PLAN", None)
    if name in (a.profile or []):  # the plugin's per-call profile (hook._profiled) in this engine's counts
        os.environ["ALLOCMOE_VLLM_PROFILE"] = "1"
    else:
        os.environ.pop("ALLOCMOE_VLLM_PROFILE", None)
    t0 = time.time()
    try:
        llm = LLM(model=a.model, dtype=a.dtype, max_model_len=256, max_num_seqs=8, max_num_batched_tokens=256,
                  seed=0, enforce_eager=True, enable_prefix_caching=False,
                  hf_overrides={"allocmoe_plan": plan} if plan else None, **json.loads(a.llm_kwargs))
    except Exception as e:
        return {"error": _one_line(e)}
    load_s = time.time() - t0
    try:
        time.sleep(0.6)  # > ALLOCMOE_COUNTS_INTERVAL: the start-up (profiling, warm-up) counts are flushed
        before = read_counts(counts_file)
        sp = SamplingParams(temperature=0.0, max_tokens=a.max_tokens, logprobs=1, ignore_eos=True)
        if a.one_at_a_time:  # each prompt alone in its batch (one generate call per prompt)
            outs = [llm.generate([TokensPrompt(prompt_token_ids=p)], sp, use_tqdm=False)[0] for p in prompts]
        else:
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        logprobs = [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs]
        expected = sum(len(p) for p in prompts) + sum(len(t) - 1 for t in tokens)  # tokens the model ran
        counts = None
        deadline = time.time() + 15
        base_tokens = {l["layer"]: l["tokens"] for l in before["layers"]} if before else {}
        while before is not None and time.time() < deadline:
            # every layer has its tokens: the writer may snapshot mid-step (the first layers of a step counted,
            # the last not yet), so wait for the least-advanced layer, not for the total
            counts = read_counts(counts_file)
            if counts and min(l["tokens"] - base_tokens.get(l["layer"], 0) for l in counts["layers"]) >= expected:
                break
            time.sleep(0.2)
        if counts is not None:
            base = {l["layer"]: l for l in before["layers"]}
            for l in counts["layers"]:
                b = base[l["layer"]]
                l["tokens"] -= b["tokens"]
                l["pairs"] -= b["pairs"]
                if "profile" in l:  # per call size: [calls, expert_seconds, pairs, distinct] of this generation
                    prof = {t: [x - y for x, y in zip(row, b.get("profile", {}).get(t, [0, 0.0, 0, 0]))]
                            for t, row in l["profile"].items()}
                    l["profile"] = {t: row for t, row in prof.items() if row[0]}
            counts["tokens"] = max(l["tokens"] for l in counts["layers"])
            counts["activations_per_token"] = sum(l["pairs"] / l["tokens"] for l in counts["layers"] if l["tokens"])
        return {"tokens": tokens, "logprobs": logprobs, "counts": counts, "expected_tokens": expected,
                "load_s": load_s}
    finally:
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # pragma: no cover - best effort; the process exit cleans up
            pass
        del llm
        import gc

        gc.collect()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--engine", action="append", required=True, help="NAME or NAME=PLAN (repeatable)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--llm-kwargs", default="{}", help="more LLM(...) arguments, JSON")
    ap.add_argument("--one-at-a-time", action="store_true", help="one generate call per prompt (batch of one)")
    ap.add_argument("--profile", action="append", help="engine NAME run with ALLOCMOE_VLLM_PROFILE=1 (repeatable)")
    a = ap.parse_args()
    prompts = json.loads(a.prompts)
    res = {}
    for spec in a.engine:
        name, _, plan = spec.partition("=")
        res[name] = _run_engine(a, name, plan or None, prompts)
        print(f"{name}: {'error' if 'error' in res[name] else 'ok'}", file=sys.stderr, flush=True)
    Path(a.out).write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
