"""bench: result structure, ratios from the reported medians, measured activations, Amdahl's formula; the
fast experts paths for dropped slots against the reference path; shapes. No timing assertions."""

import json
import math

import pytest
import torch

import allocmoe
from allocmoe import bench, experts_fast
from allocmoe.errors import AllocMoeError
from allocmoe.shapes import parse_shape, random_model, shape_config
from allocmoe.testing import FAMILIES, save_tiny, tiny_config, tiny_model

SMALL = dict(prefill_len=8, decode_batches=(1, 2), decode_tokens=2, decode_prompt=4, repeats=2, warmup=1,
             progress=False)


@pytest.fixture(scope="module")
def ds():
    return tiny_model("deepseek_v2")


def _plans(m):
    L = len(allocmoe.find_moe_layers(m))
    return {"k2": allocmoe.make_plan(m, [2] * L),
            "k2-global": allocmoe.make_plan(m, [2] * L, token_policy="global"),
            "k13": allocmoe.make_plan(m, [1, 3][:L] + [2] * (L - 2))}


def test_run_bench_structure_ratios_and_measured_activations(ds):
    L = len(allocmoe.find_moe_layers(ds))
    impl_before = ds.config._experts_implementation
    r = bench.run_bench(ds, _plans(ds), **SMALL)
    assert r["format"] == "allocmoe-bench" and r["reference"] == "full"
    env = r["env"]
    for key in ("threads", "torch", "transformers", "dtype", "experts_implementation", "cpu"):
        assert env[key] not in (None, "")
    assert env["threads"] == torch.get_num_threads()
    assert set(r["phases"]) == {"prefill", "decode_b1", "decode_b2"}
    assert list(r["configs"]) == ["full", "k2", "k2-global", "k13"]
    for name, ph in r["phases"].items():
        full = ph["configs"]["full"]
        assert full["activations_per_token"] == 4 * L  # tiny top-4, measured with full_plan
        for c, d in ph["configs"].items():
            assert len(d["times_s"]) == 2 and len(d["decoder_times_s"]) == 2
            assert d["min_s"] <= d["median_s"] <= d["max_s"]
            assert 0 < d["decoder_median_s"] <= d["median_s"]
            assert d["speedup"] == pytest.approx(full["median_s"] / d["median_s"])
            assert d["decoder_speedup"] == pytest.approx(full["decoder_median_s"] / d["decoder_median_s"])
        # fixed and global plans execute exactly 2 experts per token and layer (counted, not planned)
        for c in ("k2", "k2-global", "k13"):
            assert ph["configs"][c]["activations_per_token"] == 2 * L
            assert ph["configs"][c]["activation_fraction"] == pytest.approx(0.5)
    assert r["phases"]["decode_b2"]["configs"]["k2"]["ms_per_step"] == pytest.approx(
        1e3 * r["phases"]["decode_b2"]["configs"]["k2"]["median_s"] / 2)
    json.dumps(r)  # serialisable
    # the model is left as it was
    assert allocmoe.applied_plan(ds) is None
    assert ds.config._experts_implementation == impl_before
    table = bench.format_table(r)
    assert "| k2-global | global |" in table and "### decode_b1" in table


def test_run_bench_implementations_and_variants(ds):
    L = len(allocmoe.find_moe_layers(ds))
    plans = {"k2": allocmoe.make_plan(ds, [2] * L)}
    r = bench.run_bench(ds, plans, implementations=["grouped_mm", "eager", "batched_mm"],
                        **dict(SMALL, decode_batches=(1,)))
    names = list(r["configs"])
    assert names == [f"{n}@{i}" for i in ("grouped_mm", "eager", "batched_mm") for n in ("full", "k2")]
    ph = r["phases"]["prefill"]["configs"]
    assert ph["k2@eager"]["speedup"] == pytest.approx(ph["full@eager"]["median_s"] / ph["k2@eager"]["median_s"])
    assert ph["k2@eager"]["vs_reference_full"] == pytest.approx(
        ph["full@grouped_mm"]["median_s"] / ph["k2@eager"]["median_s"])
    g = allocmoe.make_plan(ds, [2] * L, token_policy="global")
    r2 = bench.run_bench(ds, {"full": None, "g-loop": bench.Variant(g, sparse_path="loop"),
                              "g-ref": bench.Variant(g, sparse_path="reference")},
                         **dict(SMALL, decode_batches=()))
    assert r2["configs"]["g-loop"]["sparse_path"] == "loop"
    assert experts_fast.get_sparse_path() == "follow"
    # batched_mm memory guard: reported, not run
    r3 = bench.run_bench(ds, plans, implementations=["batched_mm"], batched_mm_max_bytes=1,
                         **dict(SMALL, decode_batches=()))
    assert "skipped" in r3["phases"]["prefill"]["configs"]["k2@batched_mm"]


def test_amdahl_formula_and_report_with_known_share(ds):
    assert bench.ideal_speedup(0.5, 9, 18) == pytest.approx(1 / 0.75)
    assert bench.ideal_speedup(0.0, 1, 18) == 1.0
    assert bench.ideal_speedup(1.0, 9, 18) == pytest.approx(2.0)
    f = 0.4
    assert bench.ideal_speedup(f, 3, 6) == pytest.approx(1 / (0.6 + 0.2))
    L = len(allocmoe.find_moe_layers(ds))
    r = bench.run_bench(ds, _plans(ds), **dict(SMALL, decode_batches=(1,)))
    share = {p: {"f": f, "f_decoder": 0.5} for p in r["phases"]}
    a = bench.amdahl(None, r, share=share)
    row = a["phases"]["prefill"]["configs"]["k2"]
    assert row["ideal_speedup"] == pytest.approx(1 / (0.6 + 0.4 * 0.5))
    assert row["ideal_decoder_speedup"] == pytest.approx(1 / (0.5 + 0.5 * 0.5))
    d = r["phases"]["prefill"]["configs"]["k2"]
    assert row["achieved_speedup"] == d["speedup"]
    assert row["achieved_over_ideal"] == pytest.approx(d["speedup"] / row["ideal_speedup"])
    ov = a["token_policy_overhead"]["k2-global"]["prefill"]
    g = r["phases"]["prefill"]["configs"]["k2-global"]
    assert ov["fixed"] == "k2"
    assert ov["raw_pct"] == pytest.approx(100 * (g["median_s"] / d["median_s"] - 1))
    assert ov["at_equal_activations_pct"] == pytest.approx(ov["raw_pct"])  # equal measured activations
    assert r["amdahl"] is a and "| ideal (Amdahl) |" in bench.format_table(r)
    assert row["activations_full"] == 4 * L


def test_amdahl_measures_share(ds):
    r = bench.run_bench(ds, _plans(ds), **dict(SMALL, decode_batches=(1,)))
    a = bench.amdahl(ds, r, repeats=1, progress=False)
    for p in ("prefill", "decode_b1"):
        e = a["phases"][p]
        assert 0 < e["f"] < 1 and e["f"] <= e["f_decoder"] < 1
        assert "hook_overhead_pct" in e


# --------------------------------------------------------------------------------------------------
# fast experts paths == reference path (dropped slots)
# --------------------------------------------------------------------------------------------------

IDS = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(m, plan, path, impl, **kw):
    experts_fast.register_experts_implementation()
    m.config._experts_implementation = impl
    old = experts_fast.set_sparse_path(path)
    try:
        with allocmoe.apply(m, plan) as h, torch.no_grad():
            out = m(IDS, **kw).logits
            return out, h.counts()["last"]["pairs_per_layer"], h.expert_load()
    finally:
        experts_fast.set_sparse_path(old)
        m.config._experts_implementation = "grouped_mm"


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_paths_equal_reference(models, family):
    m = models[family]
    L = len(allocmoe.find_moe_layers(m))
    plans = [allocmoe.make_plan(m, [2] * L, token_policy="global"),
             allocmoe.make_plan(m, [2] * L, token_policy="threshold", layer_params=[{"threshold": 0.12}] * L)]
    for plan in plans:
        ref, ref_pairs, ref_load = _logits(m, plan, "reference", "grouped_mm")
        for impl in ("grouped_mm", "eager", "batched_mm", "allocmoe"):
            for path in ("follow", "auto", "grouped", "loop", "batched"):
                out, pairs, load = _logits(m, plan, path, impl)
                assert torch.allclose(out, ref, atol=1e-5, rtol=0), (impl, path, plan.policy)
                assert pairs == ref_pairs and load == ref_load


@pytest.mark.parametrize("family", ["deepseek_v2", "qwen2_moe", "gpt_oss"])
def test_fast_paths_with_padding_under_fixed_policy(models, family):
    m = models[family]
    L = len(allocmoe.find_moe_layers(m))
    plan = allocmoe.make_plan(m, [3] * L)
    mask = torch.ones_like(IDS)
    mask[1, :5] = 0  # left padding: dropped rows under the fixed policy go through the sparse path
    ref, ref_pairs, _ = _logits(m, plan, "reference", "grouped_mm", attention_mask=mask)
    for path in ("grouped", "loop", "batched"):
        out, pairs, _ = _logits(m, plan, path, "grouped_mm", attention_mask=mask)
        assert torch.allclose(out[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=0)
        assert pairs == ref_pairs == [3 * int(mask.sum())] * L


@pytest.mark.parametrize("family", ["deepseek_v2", "gpt_oss", "mixtral"])
def test_sparse_forward_direct_and_sync_free(models, family):
    m = models[family]
    layer = allocmoe.find_moe_layers(m)[0]
    g = torch.Generator().manual_seed(3)
    T, M = 24, 4
    h = torch.randn(T, m.config.hidden_size, generator=g)
    idx = torch.stack([torch.randperm(layer.num_experts, generator=g)[:M] for _ in range(T)])
    idx[::3, 2:] = -1
    idx[5] = -1  # a token with no expert at all
    w = torch.rand(T, M, generator=g)
    ref, n_ref, c_ref = experts_fast.sparse_experts_forward(layer.experts, h, idx, w,
                                                            stock_forward=layer.experts.forward, path="reference")
    assert n_ref == int((idx >= 0).sum())
    for path in ("grouped", "loop", "batched"):
        out, n, c = experts_fast.sparse_experts_forward(layer.experts, h, idx, w, path=path)
        assert torch.allclose(out, ref, atol=1e-5, rtol=0) and n == n_ref and torch.equal(c, c_ref)
    out, n, c = experts_fast.sparse_experts_forward(layer.experts, h, idx, w, path="grouped", sync_free=True)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0) and int(n) == n_ref and torch.equal(c, c_ref)
    assert torch.equal(out[5], torch.zeros_like(out[5]))
    # experts with exactly 1, 2, 3 and 4 rows
    small = torch.tensor([[0, 1, 2, 3], [1, 2, 3, -1], [2, 3, -1, -1], [3, -1, -1, -1]])
    hs, ws = h[:4], w[:4]
    ref_s = experts_fast.sparse_experts_forward(layer.experts, hs, small, ws, stock_forward=layer.experts.forward,
                                                path="reference")[0]
    for path in ("grouped", "loop", "batched"):
        out = experts_fast.sparse_experts_forward(layer.experts, hs, small, ws, path=path)[0]
        assert torch.allclose(out, ref_s, atol=1e-5, rtol=0), path
    none = torch.full_like(idx, -1)
    out, n, _ = experts_fast.sparse_experts_forward(layer.experts, h, none, w, path="grouped")
    assert n == 0 and not out.any()


@pytest.mark.parametrize("family", ["deepseek_v2", "gpt_oss", "qwen3_moe"])
def test_allocmoe_experts_implementation(models, family):
    m = models[family]
    with torch.no_grad():
        ref = m(IDS).logits
        name = experts_fast.register_experts_implementation()
        m.config._experts_implementation = name
        try:
            out = m(IDS).logits
            with allocmoe.apply(m, allocmoe.full_plan(m)):
                patched = m(IDS).logits
        finally:
            m.config._experts_implementation = "grouped_mm"
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)
    assert torch.equal(patched, out)  # full K: the patched model calls the same kernels unchanged


def test_sparse_path_setting():
    old = experts_fast.set_sparse_path("auto")
    try:
        assert experts_fast.get_sparse_path() == "auto"
        with pytest.raises(ValueError):
            experts_fast.set_sparse_path("nope")
    finally:
        experts_fast.set_sparse_path(old)


# --------------------------------------------------------------------------------------------------
# shapes and the CLI entry point
# --------------------------------------------------------------------------------------------------


def test_shape_spec_parsing_and_config():
    assert parse_shape("deepseek-v2-lite") == ("deepseek-v2-lite", 4)
    assert parse_shape("DeepSeek-V2-Lite:6") == ("deepseek-v2-lite", 6)
    for bad in ("nope", "deepseek-v2-lite:x", "deepseek-v2-lite:1", "deepseek-v2-lite:99", ""):
        with pytest.raises(AllocMoeError) as e:
            parse_shape(bad)
        assert "\n" not in str(e.value)
    c = shape_config("deepseek-v2-lite:3")
    assert (c.hidden_size, c.n_routed_experts, c.moe_intermediate_size, c.n_shared_experts, c.num_experts_per_tok,
            c.first_k_dense_replace, c.intermediate_size, c.kv_lora_rank, c.q_lora_rank, c.qk_rope_head_dim,
            c.qk_nope_head_dim, c.v_head_dim, c.num_attention_heads, c.vocab_size, c.routed_scaling_factor,
            c.topk_method, c.num_hidden_layers) == (2048, 64, 1408, 2, 6, 1, 10944, 512, None, 64, 128, 128, 16,
                                                    102400, 1.0, "greedy", 3)
    with pytest.raises(AllocMoeError):
        allocmoe.shapes.build_shape("mixtral-8x7b")


def test_random_model_is_deterministic_and_routes_unevenly():
    cfg = tiny_config("deepseek_v2")
    a, b = random_model(cfg, seed=1), random_model(cfg, seed=1)
    ids = IDS[:1]
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    assert torch.equal(la, lb) and torch.isfinite(la).all()
    layer = allocmoe.find_moe_layers(a)[0]
    h = torch.randn(64, cfg.hidden_size)
    h = h / h.pow(2).mean(-1, keepdim=True).sqrt()
    probs = layer.adapter.scores(layer.router, h).weight
    assert probs.max(-1).values.mean() > 2.0 / layer.num_experts  # not uniform
    assert math.isclose(float(a.model.rotary_emb.inv_freq[0]), 1.0)


def test_bench_command_tiny_model_dir(tmp_path):
    d = save_tiny("qwen3_moe", tmp_path / "m")
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    r = bench.bench_command(str(d), None, [], str(out), markdown=str(md), amdahl=True,
                            **dict(SMALL, decode_batches=(1,), repeats=1, warmup=0))
    data = json.loads(out.read_text())
    assert data["format"] == "allocmoe-bench" and list(data["configs"]) == [
        "full", "uniform-50%-fixed", "uniform-50%-global"]
    assert data["configs"]["uniform-50%-global"]["summary"]["policy"] == "global"
    assert "amdahl" in data and "command" in data and md.read_text().startswith("Model ")
    plan_path = tmp_path / "p.json"
    allocmoe.make_plan(tiny_model("qwen3_moe"), [1, 3, 2]).save(plan_path)
    r2 = bench.bench_command(str(d), None, [str(plan_path)], str(out), amdahl=False,
                             **dict(SMALL, decode_batches=(), repeats=1, warmup=0))
    assert list(r2["configs"]) == ["full", "p"]
    with pytest.raises(AllocMoeError):
        bench.bench_command(str(d), "deepseek-v2-lite", [], str(out))
    with pytest.raises(AllocMoeError):
        bench.bench_command(None, "nope:3", [], str(out))
