#!/usr/bin/env bash
# Prepared check of allocmoe's vLLM plugin on a GPU machine (vllm==0.33.x). Nothing in the project depends
# on it; run it by hand where a GPU and a vLLM environment exist:
#
#   VLLM_PY=/path/to/venv/bin/python scripts/gpu_vllm_check.sh [OUT_DIR]
#
# VLLM_PY: a Python with vllm 0.33.x (default: python3; if it has no vLLM the script tries
# `pip install vllm==0.33.*`, which needs the package index). allocmoe is installed into it with --no-deps.
# Steps (each prints one line; the JSON results land in OUT_DIR, default ./gpu_vllm_out):
#   1. a tiny random Qwen3-MoE (built with that environment's transformers): stock vs full-K plan greedy tokens
#      (must be equal) and a per-layer plan's measured counts (must be k_l per token), with CUDA graphs on
#      (the default: the counters are in-graph tensor ops, so replayed graphs keep counting);
#   2. the families (tests/vllm_families.py: tiny random OLMoE, Mixtral, DeepSeek-V2 with MLA at the real latent
#      sizes), bfloat16, one process with three engines each: stock vs full-K plan greedy tokens (must be equal),
#      the per-layer plan changes the output and runs k_l pairs per token in every layer (measured);
#   3. scripts/bench_vllm.py on the Qwen3-30B-A3B shape (4 of 48 layers, dummy weights, bf16): full vs
#      global top-4 vs a per-layer plan of the same total, at 1/4/16 concurrent requests: tok/s, TTFT, ITL
#      (median, p90), ratios and the Amdahl limit (profiling engines first), JSON + markdown table in OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_vllm_out}"
PY="${VLLM_PY:-python3}"
mkdir -p "$OUT"
if ! "$PY" -c "import vllm" 2>/dev/null; then
  "$PY" -m pip install -q "vllm==0.33.*"
fi
"$PY" -m pip install -q --no-deps -e .
"$PY" -c "import vllm, torch; print('vllm', vllm.__version__, 'cuda', torch.cuda.is_available())"

"$PY" - "$OUT" <<'EOF'
import json, math, sys, shutil, subprocess, os
from pathlib import Path
import torch, transformers as tf
out = Path(sys.argv[1]); d = out / "tiny"; d.mkdir(parents=True, exist_ok=True)
cfg = tf.Qwen3MoeConfig(vocab_size=8192, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
    num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=64, num_experts=32,
    num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=512, tie_word_embeddings=False)
cfg.architectures = ["Qwen3MoeForCausalLM"]
torch.manual_seed(0)
m = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
with torch.no_grad():
    for n, p in m.named_parameters():
        if p.dim() >= 2:
            p.normal_(0, 0.5 if n.startswith("lm_head") else 0.05)
        if n.endswith("mlp.gate.weight"):
            p.normal_(0, 4.0 / math.sqrt(p.shape[1]))
m.save_pretrained(d)
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(Path("src/allocmoe/assets/default_model") / f, d / f)
names = [f"model.layers.{i}.mlp" for i in range(4)]
fp = {"architecture": "Qwen3MoeForCausalLM", "num_moe_layers": 4, "moe_layer_names": names, "num_experts": 32,
      "top_k": 8, "hidden_size": 128, "num_hidden_layers": 4}
for name, ks in (("full", [8, 8, 8, 8]), ("half", [4, 2, 6, 3])):
    (out / f"{name}.json").write_text(json.dumps({"format": "allocmoe-plan", "version": 1, "token_policy": {"name": "fixed"},
        "layers": [{"k": k, "name": n} for k, n in zip(ks, names)], "model": fp}))
prompts = json.dumps([[5, 17, 300, 41, 999, 7, 1234, 88], [9, 8, 7, 6000, 42]])
res = {}
for name, extra in (("stock", []), ("full", ["--plan", str(out / "full.json")]), ("half", ["--plan", str(out / "half.json")])):
    env = dict(os.environ, ALLOCMOE_COUNTS=str(out / f"{name}.counts.json"))
    env.pop("ALLOCMOE_PLAN", None)
    subprocess.run([sys.executable, "tests/vllm_run.py", "--model", str(d), "--prompts", prompts, "--out",
                    str(out / f"{name}.out.json"), *extra], check=True, env=env)
    res[name] = json.loads((out / f"{name}.out.json").read_text())
ok_full = res["full"]["tokens"] == res["stock"]["tokens"]
c = res["half"]["counts"]
ok_counts = c is not None and all(l["pairs"] == k * l["tokens"] for l, k in zip(c["layers"], [4, 2, 6, 3]))
print(f"full-K plan == stock tokens: {ok_full}; half plan pairs == k*tokens per layer: {ok_counts} "
      f"(activations/token {c and c['activations_per_token']}, tokens {c and c['tokens']}, expected "
      f"{res['half']['expected_tokens']})")
sys.exit(0 if ok_full and ok_counts else 1)
EOF

"$PY" - "$OUT" <<'EOF'
# the families: models built with this environment's transformers (allocmoe itself is not imported: its
# transformers pin may differ from vLLM's), plans written in allocmoe's plan format by hand
import json, math, os, shutil, subprocess, sys
from pathlib import Path
import torch, transformers as tf
sys.path.insert(0, "tests")
from vllm_families import FAMILIES, tiny_config
from allocmoe_vllm.plancheck import config_fingerprint
out = Path(sys.argv[1]) / "families"; out.mkdir(parents=True, exist_ok=True)
prompts = json.dumps([[5, 17, 300, 41, 999, 7, 1234, 88], [9, 8, 7, 6000, 42]])
ok_all = True
for fam, (ks, _) in FAMILIES.items():
    d = out / fam
    torch.manual_seed(0)
    m = tf.AutoModelForCausalLM.from_config(tiny_config(fam), dtype=torch.float32)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.5 if n.startswith("lm_head") else 0.2 if ".experts." in n else 0.05)
            if n.endswith(".gate.weight"):  # the routers (any transformers naming): sharp, so a plan changes the output
                p.normal_(0, 4.0 / math.sqrt(p.shape[1]))
    m.save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path("src/allocmoe/assets/default_model") / f, d / f)
    cfg = json.loads((d / "config.json").read_text())
    fp = config_fingerprint(cfg)
    first = cfg.get("first_k_dense_replace", 0) or 0
    idx = list(range(first, cfg["num_hidden_layers"]))
    names = [f"model.layers.{i}.mlp" for i in idx]
    for name, kk in (("full", [fp["top_k"]] * len(idx)), ("half", ks)):
        (out / f"{fam}.{name}.json").write_text(json.dumps({"format": "allocmoe-plan", "version": 1,
            "token_policy": {"name": "fixed"}, "layers": [{"k": k, "name": n} for k, n in zip(kk, names)],
            "model": {**fp, "num_moe_layers": len(idx), "moe_layer_names": names}}))
    env = dict(os.environ); env.pop("ALLOCMOE_PLAN", None)
    res_file = out / f"{fam}.out.json"
    subprocess.run([sys.executable, "tests/vllm_families.py", "--model", str(d), "--prompts", prompts, "--out",
                    str(res_file), "--dtype", "bfloat16", "--engine", "stock", "--engine",
                    f"full={out / (fam + '.full.json')}", "--engine", f"half={out / (fam + '.half.json')}",
                    *(["--one-at-a-time"] if fam == "deepseek_v2" else [])],  # as tests/test_vllm.py (CPU MLA)
                   check=True, env=env)
    r = json.loads(res_file.read_text())
    errs = {n: v["error"] for n, v in r.items() if "error" in v}
    if errs:
        print(f"{fam}: start-up failed: {errs}"); ok_all = False; continue
    c = r["half"]["counts"]
    ok = (r["full"]["tokens"] == r["stock"]["tokens"] and r["half"]["tokens"] != r["full"]["tokens"]
          and [l["pairs"] for l in c["layers"]] == [k * r["half"]["expected_tokens"] for k in ks])
    print(f"{fam}: full-K plan == stock tokens, half plan changes them and runs k_l pairs per token: {ok}")
    ok_all &= ok
sys.exit(0 if ok_all else 1)
EOF

"$PY" scripts/bench_vllm.py --shape qwen3-30b-a3b:4 --k 4 --repeats 5 --out "$OUT/bench_vllm_qwen3_30b_a3b.json" \
  --md "$OUT/bench_vllm_qwen3_30b_a3b.md"
