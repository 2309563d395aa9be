"""Run greedy generation on vLLM (in the vLLM environment) and write the tokens, log-probs and the plugin's
measured counts as JSON. Used by tests/test_vllm.py as a subprocess:

    .venv-vllm/bin/python tests/vllm_run.py --model DIR --prompts '[[ids...], ...]' --out out.json
        [--plan plan.json | --plan-override plan.json] [--hf-overrides JSON] [--max-tokens N] [--eager] [--tp N]

The plan is named by ALLOCMOE_PLAN (--plan) or by hf_overrides {"allocmoe_plan": ...} (--plan-override).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--plan")
    ap.add_argument("--plan-override")
    ap.add_argument("--hf-overrides", default="{}")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    a = ap.parse_args()
    if a.plan:
        os.environ["ALLOCMOE_PLAN"] = a.plan
    overrides = json.loads(a.hf_overrides)
    if a.plan_override:
        overrides["allocmoe_plan"] = a.plan_override

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from allocmoe_vllm.counts import read_counts

    prompts = json.loads(a.prompts)
    t0 = time.time()
    try:
        llm = LLM(model=a.model, dtype=a.dtype, max_model_len=256, max_num_seqs=8, max_num_batched_tokens=256,
                  seed=0, enforce_eager=a.eager, tensor_parallel_size=a.tp, enable_prefix_caching=False, hf_overrides=overrides or None)
    except Exception as e:  # the start-up refusal the tests look for: its one line
        print(f"START-UP FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 3
    t_load = time.time() - t0
    # the counts include vLLM's start-up profiling/warm-up runs: take them as the baseline
    time.sleep(0.6)  # > ALLOCMOE_COUNTS_INTERVAL: the writer has flushed the start-up counts
    before = read_counts()
    sp = SamplingParams(temperature=0.0, max_tokens=a.max_tokens, logprobs=1, ignore_eos=True)
    t0 = time.time()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    t_gen = time.time() - t0
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs]
    expected = sum(len(p) for p in prompts) + sum(len(t) - 1 for t in tokens)  # tokens run through the model
    counts = None
    deadline = time.time() + 15
    base_tokens = {l["layer"]: l["tokens"] for l in before["layers"]} if before else {}
    while before is not None and time.time() < deadline:  # the worker's writer flushes every 0.25 s
        # it may snapshot mid-step (a step's first layers counted, its last not yet): wait until every layer
        # has all the tokens, not just the total
        counts = read_counts()
        if counts and min(l["tokens"] - base_tokens.get(l["layer"], 0) for l in counts["layers"]) >= expected:
            break
        time.sleep(0.2)
    if counts is not None:  # what the generate call ran: after - before, per layer
        base = {l["layer"]: l for l in before["layers"]}
        for l in counts["layers"]:
            l["tokens"] -= base[l["layer"]]["tokens"]
            l["pairs"] -= base[l["layer"]]["pairs"]
        counts["tokens"] = max(l["tokens"] for l in counts["layers"])
        counts["activations_per_token"] = sum(l["pairs"] / l["tokens"] for l in counts["layers"] if l["tokens"])
    with open(a.out, "w") as f:
        json.dump({"tokens": tokens, "logprobs": logprobs, "counts": counts, "expected_tokens": expected,
                   "load_s": t_load, "generate_s": t_gen}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
