"""bench: result structure, ratios from the reported medians, measured activations, Amdahl's formula, the
reliability flags (fed synthetic timings); the fast experts paths for dropped slots against the reference
path; shapes; the `allocmoe bench` command. No timing assertions."""

import dataclasses
import json
import math

import pytest

from allocmoe.testing import invoke_cli
import torch
from typer.testing import CliRunner

import allocmoe
from allocmoe import bench, experts_fast
from allocmoe.bench import BenchSettings, Variant
from allocmoe.errors import AllocMoeError
from allocmoe.shapes import parse_shape, random_model, shape_config
from allocmoe.testing import FAMILIES, tiny_config

SMALL = BenchSettings(prefill_len=8, decode_batches=(1, 2), decode_tokens=2, decode_prompt=4, repeats=2, warmup=1,
                      progress=False, amdahl=False, remeasure=False)


def small(**kw) -> BenchSettings:
    return dataclasses.replace(SMALL, **kw)


@pytest.fixture
def ds(models):
    return models["deepseek_v2"]


def _plans(m):
    L = len(allocmoe.find_moe_layers(m))
    return {"k2": allocmoe.make_plan(m, [2] * L),
            "k2-global": allocmoe.make_plan(m, [2] * L, token_policy="global"),
            "k13": allocmoe.make_plan(m, [1, 3][:L] + [2] * (L - 2))}


def test_run_bench_structure_ratios_and_measured_activations(ds):
    L = len(allocmoe.find_moe_layers(ds))
    impl_before = ds.config._experts_implementation
    r = bench.run_bench(ds, _plans(ds), small(threads=1))
    assert r["format"] == "allocmoe-bench" and r["reference"] == "full"
    env = r["env"]
    for key in ("threads", "torch", "transformers", "dtype", "experts_implementation", "cpu"):
        assert env[key] not in (None, "")
    assert env["threads"] == 1 and torch.get_num_threads() == 1
    for key in ("loadavg_start", "loadavg_end"):  # os.getloadavg: 1, 5 and 15 minutes
        assert env[key] is None or (len(env[key]) == 3 and all(x >= 0 for x in env[key]))
    assert isinstance(env["machine_busy"], bool)
    assert r["settings"]["repeats"] == 2 and r["settings"]["decode_batches"] == [1, 2]
    assert set(r["phases"]) == {"prefill", "decode_b1", "decode_b2"}
    assert list(r["configs"]) == ["full", "k2", "k2-global", "k13"]
    for name, ph in r["phases"].items():
        full = ph["configs"]["full"]
        assert full["activations_per_token"] == 4 * L  # tiny top-4, measured with full_plan
        assert "flags" not in full  # the reference has no ratio to judge
        for c, d in ph["configs"].items():
            assert len(d["times_s"]) == 2 and len(d["decoder_times_s"]) == 2
            assert d["min_s"] <= d["median_s"] <= d["max_s"]
            assert d["iqr_pct"] == pytest.approx(100 * bench.iqr_over_median(d["times_s"]))
            assert 0 < d["decoder_median_s"] <= d["median_s"]
            assert d["speedup"] == pytest.approx(full["median_s"] / d["median_s"])
            assert d["decoder_speedup"] == pytest.approx(full["decoder_median_s"] / d["decoder_median_s"])
        # fixed and global plans execute exactly 2 experts per token and layer (counted, not planned)
        for c in ("k2", "k2-global", "k13"):
            d = ph["configs"][c]
            assert d["activations_per_token"] == 2 * L
            assert d["activation_fraction"] == pytest.approx(0.5)
            # no measured share (amdahl=False): the limit is the f = 1 bound A_full / A_plan
            assert d["limit_source"] == "activations" and d["speedup_limit"] == pytest.approx(2.0)
            assert d["flags"] == bench.ratio_flags(d["speedup"], 2.0, d["times_s"], full["times_s"],
                                                   decoder_ratio=d["decoder_speedup"], decoder_limit=2.0)
            assert d["reliable"] == (not d["flags"])
            assert (c in r["reliability"]["flagged"].get(name, {})) == bool(d["flags"])
    assert r["phases"]["decode_b2"]["configs"]["k2"]["ms_per_step"] == pytest.approx(
        1e3 * r["phases"]["decode_b2"]["configs"]["k2"]["median_s"] / 2)
    assert r["reliability"]["remeasured"] == []  # remeasure=False
    json.dumps(r)  # serialisable
    # the model is left as it was
    assert allocmoe.applied_plan(ds) is None
    assert ds.config._experts_implementation == impl_before
    table = bench.format_table(r)
    assert "| k2-global | global |" in table and "### decode_b1" in table and "Load average" in table


def test_settings_are_checked():
    for bad in (dict(repeats=0), dict(warmup=-1), dict(decode_batches=(0,))):
        with pytest.raises(AllocMoeError):
            small(**bad)
    with pytest.raises(AllocMoeError):
        small(prefill_len=0, decode_tokens=0).phases()


def _count_kernels(monkeypatch) -> dict:
    """Count which experts_fast kernel every sparse call runs (the sparse path actually used)."""
    calls = {"grouped": 0, "loop": 0, "batched": 0, "reference": 0}
    for name, fn in list(experts_fast.KERNELS.items()):
        def wrapped(*a, _fn=fn, _name=name, **k):
            calls[_name] += 1
            return _fn(*a, **k)
        monkeypatch.setitem(experts_fast.KERNELS, name, wrapped)
    ref = experts_fast.reference_sparse_forward

    def ref_wrapped(*a, **k):
        calls["reference"] += 1
        return ref(*a, **k)
    monkeypatch.setattr(experts_fast, "reference_sparse_forward", ref_wrapped)
    return calls


def test_run_bench_implementations_and_variants(ds, monkeypatch):
    L = len(allocmoe.find_moe_layers(ds))
    plans = {"k2": allocmoe.make_plan(ds, [2] * L)}
    r = bench.run_bench(ds, plans, small(implementations=["grouped_mm", "eager", "batched_mm"], decode_batches=(1,)))
    names = list(r["configs"])
    assert names == [f"{n}@{i}" for i in ("grouped_mm", "eager", "batched_mm") for n in ("full", "k2")]
    ph = r["phases"]["prefill"]["configs"]
    assert ph["k2@eager"]["speedup"] == pytest.approx(ph["full@eager"]["median_s"] / ph["k2@eager"]["median_s"])
    assert ph["k2@eager"]["vs_reference_full"] == pytest.approx(
        ph["full@grouped_mm"]["median_s"] / ph["k2@eager"]["median_s"])
    assert "flags" in ph["k2@eager"] and "flags" not in ph["full@eager"]  # full@eager is its own reference
    # the sparse path of a Variant, and the settings' default, are the kernels that actually run
    g = allocmoe.make_plan(ds, [2] * L, token_policy="global")  # drops slots: every call is sparse
    calls = _count_kernels(monkeypatch)
    r2 = bench.run_bench(ds, {"full": None, "g-loop": Variant(g, sparse_path="loop")}, small(decode_batches=()))
    assert r2["configs"]["g-loop"]["sparse_path"] == "loop" and r2["configs"]["full"]["sparse_path"] == "follow"
    assert calls["loop"] > 0 and calls["grouped"] == calls["reference"] == 0  # follow + grouped_mm would be grouped
    calls.update(loop=0)
    r3 = bench.run_bench(ds, {"g": g, "g-ref": Variant(g, sparse_path="reference")},
                         small(decode_batches=(), sparse_path="batched"))
    assert r3["env"]["sparse_experts_path"] == "batched"
    assert (r3["configs"]["g"]["sparse_path"], r3["configs"]["g-ref"]["sparse_path"]) == ("batched", "reference")
    assert calls["batched"] > 0 and calls["reference"] > 0 and calls["grouped"] == calls["loop"] == 0
    with pytest.raises(AllocMoeError):
        bench.run_bench(ds, {"g": g}, small(decode_batches=(), sparse_path="nope"))
    assert allocmoe.applied_plan(ds) is None
    # batched_mm memory guard: reported, not run
    r4 = bench.run_bench(ds, plans, small(implementations=["batched_mm"], batched_mm_max_bytes=1, decode_batches=()))
    assert "skipped" in r4["phases"]["prefill"]["configs"]["k2@batched_mm"]


def test_amdahl_formula_and_report_with_known_share(ds):
    assert bench.ideal_speedup(0.5, 9, 18) == pytest.approx(1 / 0.75)
    assert bench.ideal_speedup(0.0, 1, 18) == 1.0
    assert bench.ideal_speedup(1.0, 9, 18) == pytest.approx(2.0)
    f = 0.4
    assert bench.ideal_speedup(f, 3, 6) == pytest.approx(1 / (0.6 + 0.2))
    with pytest.raises(AllocMoeError):
        bench.ideal_speedup(0.5, 1, 0)
    L = len(allocmoe.find_moe_layers(ds))
    r = bench.run_bench(ds, _plans(ds), small(decode_batches=(1,)))
    share = {p: {"f": f, "f_decoder": 0.5} for p in r["phases"]}
    a = bench.amdahl(None, r, share=share)
    row = a["phases"]["prefill"]["configs"]["k2"]
    assert row["ideal_speedup"] == pytest.approx(1 / (0.6 + 0.4 * 0.5))
    assert row["ideal_decoder_speedup"] == pytest.approx(1 / (0.5 + 0.5 * 0.5))
    d = r["phases"]["prefill"]["configs"]["k2"]
    assert row["achieved_speedup"] == d["speedup"]
    assert row["achieved_over_ideal"] == pytest.approx(d["speedup"] / row["ideal_speedup"])
    # the limit beside each ratio is now the Amdahl one
    assert d["limit_source"] == "amdahl" and d["speedup_limit"] == row["ideal_speedup"]
    assert d["decoder_speedup_limit"] == row["ideal_decoder_speedup"]
    ov = a["token_policy_overhead"]["k2-global"]["prefill"]
    g = r["phases"]["prefill"]["configs"]["k2-global"]
    assert ov["fixed"] == "k2"
    assert ov["raw_pct"] == pytest.approx(100 * (g["median_s"] / d["median_s"] - 1))
    assert ov["at_equal_activations_pct"] == pytest.approx(ov["raw_pct"])  # equal measured activations
    assert r["amdahl"] is a and "| ideal (Amdahl) |" in bench.format_table(r)
    assert row["activations_full"] == 4 * L
    with pytest.raises(AllocMoeError):
        bench.amdahl(None, r)  # nothing to measure the share on


def test_amdahl_measures_share_and_remeasures_flagged_phases(ds):
    # limit_tolerance=-1 flags every ratio (ratio > 0 * limit): the phases are timed once more, the first
    # attempt kept beside, and what is still flagged stays flagged
    r = bench.run_bench(ds, _plans(ds), small(decode_batches=(1,), amdahl=True, amdahl_repeats=1, remeasure=True,
                                              limit_tolerance=-1.0))
    a = r["amdahl"]
    assert a["measured"]
    for p in ("prefill", "decode_b1"):
        e = a["phases"][p]
        assert 0 < e["f"] < 1 and e["f"] <= e["f_decoder"] < 1
        assert "hook_overhead_pct" in e
        ph = r["phases"][p]
        assert ph["remeasured"] and set(ph["first_attempt"]) == {"full", "k2", "k2-global", "k13"}
        assert "over_limit" in ph["first_attempt"]["k2"]["flags"]
        d = ph["configs"]["k2"]
        assert d["limit_source"] == "amdahl" and "over_limit" in d["flags"] and not d["reliable"]
        assert a["phases"][p]["configs"]["k2"]["achieved_speedup"] == d["speedup"]  # analysis of the new times
    assert r["reliability"]["remeasured"] == ["prefill", "decode_b1"]
    assert "(still, after re-measuring this phase once)" in bench.format_table(r)


# --------------------------------------------------------------------------------------------------
# reliability flags on synthetic timings
# --------------------------------------------------------------------------------------------------


def test_iqr_over_median():
    assert bench.iqr_over_median([1.0, 2.0, 3.0]) == pytest.approx(0.5)  # quartiles 1.5 and 2.5
    assert bench.iqr_over_median([2.0, 2.0, 2.0, 2.0]) == 0.0
    assert bench.iqr_over_median([5.0]) == 0.0  # one repeat: nothing to judge


def test_ratio_flags_over_limit_and_wide_spread():
    tight, tight_ref = [1.00, 1.01, 0.99], [2.00, 2.03, 2.05]
    # the case from the issue: uniform at 50% reported as 2.03x where the Amdahl limit is about 1.2x
    assert bench.ratio_flags(2.03, 1.2, tight, tight_ref) == ["over_limit"]
    assert bench.ratio_flags(1.24, 1.2, tight, tight_ref) == []  # within the 5% tolerance
    assert bench.ratio_flags(1.27, 1.2, tight, tight_ref) == ["over_limit"]
    assert bench.ratio_flags(1.27, 1.2, tight, tight_ref, tolerance=0.10) == []
    assert bench.ratio_flags(1.1, None, tight, tight_ref) == []  # no limit known: only the spread is judged
    wide = [1.0, 1.3, 0.8]  # IQR / median = 0.25
    assert bench.ratio_flags(1.1, 1.2, wide, tight_ref) == ["wide_spread"]
    assert bench.ratio_flags(1.1, 1.2, tight, wide) == ["wide_spread"]  # the reference's spread counts too
    assert bench.ratio_flags(1.1, 1.2, wide, tight_ref, max_spread=0.3) == []
    assert bench.ratio_flags(2.0, 1.2, wide, tight_ref, decoder_ratio=1.9, decoder_limit=1.3) == [
        "over_limit", "decoder_over_limit", "wide_spread"]


def _synthetic_result(full_times, half_times, share=None) -> dict:
    def cfg(times, acts):
        return {"times_s": times, **bench.stats.summary(times), "decoder_times_s": times,
                **{f"decoder_{k}": v for k, v in bench.stats.summary(times).items()}, "activations_per_token": acts}

    phase = {"description": "prefill: synthetic", "name": "prefill", "kind": "prefill", "batch": 1, "tokens": 8,
             "prompt": 0, "configs": {"full": cfg(full_times, 8.0), "half": cfg(half_times, 4.0)}}
    bench.stats.add_ratios(phase["configs"], {"full": "full", "half": "full"}, "full")
    r = {"format": "allocmoe-bench", "reference": "full", "phases": {"prefill": phase},
         "env": {"model": "m", "architecture": "A", "dtype": "float32", "device": "cpu", "cpu": "c", "threads": 1,
                 "cpu_count": 2, "torch": "t", "transformers": "t", "experts_implementation": "grouped_mm",
                 "sparse_experts_path": "follow", "loadavg_start": [3.1, 1, 1], "loadavg_end": [3.4, 1, 1]},
         "settings": {"repeats": 3, "warmup": 1},
         "configs": {"full": {"plan": "full", "reference": "full", "experts_implementation": "grouped_mm"},
                     "half": {"plan": "half", "reference": "full", "experts_implementation": "grouped_mm",
                              "summary": {"policy": "fixed", "ks": [2, 2]}}}}
    if share is not None:
        r["amdahl"] = bench.stats.amdahl_analysis(r, share, measured=False)
    return r


def test_flag_ratios_marks_over_limit_and_spread_in_results_and_tables():
    # another process slowed the full model's runs: 2.03x measured, Amdahl limit 1.2x (f = 1/3 at half the experts)
    r = _synthetic_result([2.03, 2.04, 2.02], [1.0, 1.01, 0.99], share={"prefill": {"f": 1 / 3, "f_decoder": 1 / 3}})
    rel = bench.flag_ratios(r)
    d = r["phases"]["prefill"]["configs"]["half"]
    assert d["speedup"] == pytest.approx(2.03 / 1.0)
    assert d["speedup_limit"] == pytest.approx(1.2) and d["limit_source"] == "amdahl"
    assert d["flags"] == ["over_limit", "decoder_over_limit"] and d["reliable"] is False
    assert rel["flagged"] == {"prefill": {"half": ["over_limit", "decoder_over_limit"]}}
    table = bench.format_table(r)
    row = next(l for l in table.splitlines() if l.startswith("| half |"))
    assert f"2.030 {bench.MARK}" in row and "| 1.200 |" in row
    assert f"{bench.MARK} unreliable: half: above the limit" in table
    assert "other processes competed for the CPU" in table  # load 3.4 with 1 thread
    # without a measured share the bound is A_full / A_plan = 2: 2.03 is within 5% of it
    r = _synthetic_result([2.03, 2.04, 2.02], [1.0, 1.01, 0.99])
    bench.flag_ratios(r)
    d = r["phases"]["prefill"]["configs"]["half"]
    assert d["speedup_limit"] == pytest.approx(2.0) and d["limit_source"] == "activations" and d["flags"] == []
    assert bench.MARK not in bench.format_table(r)
    # a plausible ratio from widely spread repeats is flagged too
    r = _synthetic_result([1.1, 1.5, 1.2], [1.0, 1.01, 0.99], share={"prefill": {"f": 1 / 3, "f_decoder": 1 / 3}})
    bench.flag_ratios(r)
    assert r["phases"]["prefill"]["configs"]["half"]["flags"] == ["wide_spread"]


def test_report_marks_flagged_speed_columns():
    from allocmoe.report import markdown_report

    full = {"label": "full model", "method": "full", "budget": 1.0, "perplexity": 10.0, "bits_per_byte": 1.0,
            "tokens": 100, "tasks": {}, "activations_per_token": 8.0, "ks": [4, 4]}
    uni = dict(full, label="uniform", method="uniform", budget=0.5, perplexity=11.0, activations_per_token=4.0,
               ks=[2, 2], speed={"prefill_speedup": 2.03, "prefill_limit": 1.2, "prefill_flags": ["over_limit"],
                                 "decode_speedup": 1.08, "decode_limit": 1.15, "decode_flags": []})
    dp = dict(uni, label="dp", method="dp", speed=None)
    results = {"model": {"architecture": "A", "path": "p", "moe_layers": 2, "num_experts": 8, "top_k": 4,
                         "shared_experts": 0, "activations_per_token": 8},
               "settings": {"metric": "kl", "calibration_tokens": 10, "profile_seconds": 1.0,
                            "validation_files": ["v.txt"], "seq_len": 8, "budgets": [0.5]},
               "configs": [full, uni, dp], "speed_note": "note"}
    md = markdown_report(results)
    assert "prefill x (limit) | decode x (limit)" in md
    row = next(l for l in md.splitlines() if "| uniform |" in l)
    assert "2.03 ⚠ (≤ 1.20)" in row and "1.08 (≤ 1.15)" in row
    assert "| - | - |" in next(l for l in md.splitlines() if "| dp |" in l)
    assert "- uniform at budget 0.5, prefill: 2.03x vs a limit of 1.20x (above the limit)" in md


# --------------------------------------------------------------------------------------------------
# fast experts paths == reference path (dropped slots)
# --------------------------------------------------------------------------------------------------

IDS = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(m, plan, path, impl, **kw):
    experts_fast.register_experts_implementation()
    m.config._experts_implementation = impl
    try:
        with allocmoe.apply(m, plan, sparse_path=path) as h, torch.no_grad():
            out = m(IDS, **kw).logits
            return out, h.counts()["last"]["pairs_per_layer"], h.expert_load()
    finally:
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


def test_sparse_path_of_a_live_handle_picks_the_kernel(ds, monkeypatch):
    """The handle's sparse_path is read on every call: changing it on a live handle changes the kernel."""
    L = len(allocmoe.find_moe_layers(ds))
    plan = allocmoe.make_plan(ds, [2] * L, token_policy="global")
    calls = _count_kernels(monkeypatch)
    with pytest.raises(AllocMoeError):
        allocmoe.apply(ds, plan, sparse_path="nope")
    with allocmoe.apply(ds, plan, sparse_path="loop") as h, torch.no_grad():
        assert h.sparse_path == "loop"
        ref = ds(IDS).logits
        assert calls["loop"] == L and calls["grouped"] == calls["reference"] == 0
        h.sparse_path = "reference"
        out = ds(IDS).logits
        assert calls["reference"] == L and calls["loop"] == L
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)


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
    with torch.no_grad():  # the seed is what decides the weights, not a fixed or a global RNG state
        assert not torch.equal(random_model(cfg, seed=2)(ids).logits, la)
    layer = allocmoe.find_moe_layers(a)[0]
    h = torch.randn(64, cfg.hidden_size)
    h = h / h.pow(2).mean(-1, keepdim=True).sqrt()
    probs = layer.adapter.scores(layer.router, h).weight
    assert probs.max(-1).values.mean() > 2.0 / layer.num_experts  # not uniform
    assert math.isclose(float(a.model.rotary_emb.inv_freq[0]), 1.0)


def _bench_cli(*args):
    from allocmoe.cli import app

    return CliRunner().invoke(app, ["bench", *map(str, args)])


def test_bench_command_tiny_model_dir(models, tiny_dir, tmp_path):
    d = tiny_dir("qwen3_moe")
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    fast = ["--prefill-len", 8, "--decode-tokens", 2, "--decode-prompt", 4, "--repeats", 1, "--warmup", 0,
            "--threads", 1]
    res = _bench_cli("--model", d, "--out", out, "--markdown", md, "--decode-batches", "1", *fast)
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["format"] == "allocmoe-bench" and list(data["configs"]) == [
        "full", "uniform-50%-fixed", "uniform-50%-global"]
    assert data["configs"]["uniform-50%-global"]["summary"]["policy"] == "global"
    assert data["amdahl"]["measured"] and "command" in data and md.read_text().startswith("Model ")
    assert data["settings"]["amdahl"] and data["settings"]["remeasure"] and data["env"]["threads"] == 1
    d50 = data["phases"]["decode_b1"]["configs"]["uniform-50%-fixed"]
    assert d50["limit_source"] == "amdahl" and isinstance(d50["flags"], list)
    assert "| ideal (Amdahl) |" in res.stdout
    plan_path = tmp_path / "p.json"
    allocmoe.make_plan(models["qwen3_moe"], [1, 3, 2]).save(plan_path)
    res = _bench_cli("--model", d, "--out", out, "--force", "--plan", plan_path, "--no-amdahl", "--no-remeasure",
                     "--decode-batches", "", "--sparse-path", "loop", "--experts-implementation", "eager", *fast)
    assert res.exit_code == 0, res.output
    r2 = json.loads(out.read_text())
    assert list(r2["configs"]) == ["full", "p"] and "amdahl" not in r2 and list(r2["phases"]) == ["prefill"]
    assert r2["configs"]["p"]["sparse_path"] == "loop" and r2["env"]["experts_implementation"] == "eager"
    assert r2["phases"]["prefill"]["configs"]["p"]["limit_source"] == "activations"
    for bad in (["--model", d, "--shape", "deepseek-v2-lite"], ["--shape", "nope:3"],
                ["--model", d, "--decode-batches", "x"], ["--model", d, "--sparse-path", "nope", *fast],
                ["--model", d, "--repeats", 0]):
        rc, _, err = invoke_cli("bench", *bad, "--out", tmp_path / "x.json")  # the real entry point's handling
        errors = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]  # (progress bars may precede)
        assert rc == 2 and len(errors) == 1 and err.strip().endswith(errors[0]) and "Traceback" not in err, (bad, err)
    assert not (tmp_path / "x.json").exists()
