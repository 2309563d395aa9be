"""Profiling (cached == naive, resume is byte-identical), planning methods, calibrated token policies."""

import json

import numpy as np
import pytest
import torch

import allocmoe
from allocmoe import errors
from allocmoe.profiling import Profile, profile
from allocmoe.testing import invoke_cli


@pytest.fixture(scope="module")
def windows():
    return torch.randint(3, 97, (12, 24), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family", ["deepseek_v2", "qwen2_moe", "gpt_oss", "deepseek_v3"])
def test_cached_profile_equals_naive(models, windows, family):
    m = models[family]
    a = profile(m, windows, batch_size=4, progress=False)
    b = profile(m, windows, batch_size=4, progress=False, cached=False)
    for metric in ("kl", "loss"):
        np.testing.assert_allclose(a.metrics[metric], b.metrics[metric], rtol=1e-5, atol=1e-9)
    S = np.array(a.metrics["kl"])
    assert S.shape == (len(allocmoe.find_moe_layers(m)), 4)
    assert (S[:, -1] == 0).all() and (S[:, 0] > 0).all()  # k = K is the reference; k = 1 costs something


def test_profile_is_deterministic_and_resume_is_byte_identical(models, windows, tmp_path, monkeypatch):
    m = models["qwen3_moe"]
    profile(m, windows, batch_size=4, progress=False, out=tmp_path / "a.json")
    profile(m, windows, batch_size=4, progress=False, out=tmp_path / "a2.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "a2.json").read_bytes()

    calls = {"n": 0}
    real_forward = type(m).forward

    def flaky(self, *a, **k):  # dies on the 2nd batch's reference pass (after batch 1 was saved)
        calls["n"] += 1
        if calls["n"] == 1 + 1 + 3 * 3:  # batch 1: ref + 9 candidates (3 layers x k=1..3), then batch 2 ref
            raise KeyboardInterrupt
        return real_forward(self, *a, **k)

    monkeypatch.setattr(type(m), "forward", flaky)
    with pytest.raises(KeyboardInterrupt):
        profile(m, windows, batch_size=4, progress=False, out=tmp_path / "b.json")
    monkeypatch.setattr(type(m), "forward", real_forward)
    partial = tmp_path / "b.json.partial.json"
    assert json.loads(partial.read_text())["batches_done"] == 1 and not (tmp_path / "b.json").exists()
    assert allocmoe.applied_plan(m) is None  # the interruption left the model clean
    profile(m, windows, batch_size=4, progress=False, out=tmp_path / "b.json", resume=True)
    assert (tmp_path / "b.json").read_bytes() == (tmp_path / "a.json").read_bytes()
    assert not partial.exists()


def test_resume_refuses_other_run(models, windows, tmp_path):
    m = models["qwen3_moe"]
    partial = tmp_path / "c.json.partial.json"
    partial.write_text(json.dumps({"run": {"other": 1}, "batches_done": 1, "tokens": 1, "acc": {}}))
    with pytest.raises(errors.ProfileError, match="belongs to a different profiling run"):
        profile(m, windows, batch_size=4, progress=False, out=tmp_path / "c.json", resume=True)


def test_profile_file_errors(models, windows, tmp_path):
    m = models["qwen3_moe"]
    p = profile(m, windows[:4], batch_size=4, progress=False, out=tmp_path / "p.json")
    assert Profile.load(tmp_path / "p.json").sensitivity == p.sensitivity
    d = json.loads((tmp_path / "p.json").read_text())
    d["sensitivity"][0] = d["sensitivity"][0][:2]
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(errors.ProfileError, match="one row of 4 values per MoE layer"):
        Profile.load(tmp_path / "bad.json")
    (tmp_path / "trunc.json").write_text((tmp_path / "p.json").read_text()[:50])
    with pytest.raises(errors.ProfileError, match="not valid JSON"):
        Profile.load(tmp_path / "trunc.json")
    with pytest.raises(errors.ModelMismatchError, match="profile was made for another model"):
        allocmoe.allocate(p, 0.5, model=models["olmoe"])


@pytest.mark.parametrize("method", ["dp", "greedy", "uniform", "random"])
def test_allocate_methods_meet_budget(models, windows, method):
    m = models["qwen3_moe"]
    p = profile(m, windows[:4], batch_size=4, progress=False)
    plan = allocmoe.allocate(p, 0.5, method)
    assert sum(plan.ks) == 6 and plan.budget["fraction"] == 0.5 and plan.method == method
    with allocmoe.apply(m, plan) as h, torch.no_grad():
        m(windows[:2])
        assert h.counts()["last"]["activations_per_token"] == 6


def test_lexi_is_data_free_and_meets_budget(models):
    m = models["deepseek_v2"]
    plan = allocmoe.allocate(m, 5, "lexi")
    assert sum(plan.ks) == 5
    S = np.array(plan.meta["lexi_sensitivity"])
    assert (S[:, -1] == 0).all() and (np.diff(S, axis=1) <= 1e-12).all()  # more experts, less perturbation


@pytest.mark.parametrize("policy", ["threshold", "top-p", "naee"])
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_calibrated_policies_meet_budget(models, family, policy):
    m = models[family]
    w = torch.randint(3, 97, (24, 32), generator=torch.Generator().manual_seed(5))
    L = len(allocmoe.find_moe_layers(m))
    plan = allocmoe.allocate(m, 0.5, "uniform", token_policy=policy, windows=w, progress=False)
    target = 2 * L
    with allocmoe.apply(m, plan, record=True) as h, torch.no_grad():
        for b in range(0, len(w), 8):
            m(w[b:b + 8], use_cache=False)
            # the count really varies per token (a calibrated policy is not a fixed top-k in disguise)
            assert any(len(set((h.last_selection(l) >= 0).sum(-1).tolist())) > 1 for l in range(L))
        measured = h.counts()["cumulative"]["activations_per_token"]
    assert abs(measured - target) <= 0.01 * target
    assert plan.meta["calibration"]["measured_activations_per_token"] == pytest.approx(measured)
    per_layer = h.counts()["cumulative"]["activations_per_token_per_layer"]
    if policy == "threshold":  # one threshold per layer: every layer meets its own k_l
        assert all("threshold" in l for l in plan.layers)
        assert per_layer == pytest.approx([2.0] * L, rel=0.05)
    # the saved plan re-applies to the same effect
    plan2 = allocmoe.Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    with allocmoe.apply(m, plan2) as h2, torch.no_grad():
        for b in range(0, len(w), 8):
            m(w[b:b + 8], use_cache=False)
        assert h2.counts()["cumulative"]["activations_per_token"] == measured


def test_candidate_range_k_from_k_to_and_the_old_spellings(models, windows, tiny_dir, tmp_path):
    # the candidate k values of a profile / plan run k_from..k_to (a token policy's per-token floor is min_k)
    m = models["qwen3_moe"]  # 3 MoE layers, top-4
    p = profile(m, windows[:4], k_from=2, k_to=3, progress=False)
    assert p.k_values == [2, 3] and (p.settings["k_from"], p.settings["k_to"]) == (2, 3)
    with pytest.raises(errors.ProfileError, match=r"invalid candidate k range \[3, 2\]"):
        profile(m, windows[:4], k_from=3, k_to=2, progress=False)
    # allocate: the range bounds the budget; the old keyword k_min still means k_from
    assert allocmoe.allocate(m, budget=6, method="uniform", k_from=2).ks == [2, 2, 2]
    for kw in ({"k_from": 2}, {"k_min": 2}):
        with pytest.raises(errors.BudgetError, match=r"feasible range is 6\.\.12"):
            allocmoe.allocate(m, budget=5, method="uniform", **kw)
    # the CLI: --k-from/--k-to, and the old --k-min/--k-max
    (tmp_path / "text.txt").write_text("It is a truth universally acknowledged. " * 10)
    common = ("profile", "--model", tiny_dir("qwen3_moe"), "--data", tmp_path / "text.txt", "--tokens", "64",
              "--seq-len", "16", "--batch-size", "4")
    for flags in (("--k-from", "3", "--k-to", "4"), ("--k-min", "3", "--k-max", "4")):
        out = tmp_path / f"{flags[0]}.json"
        rc, _, err = invoke_cli(*common, *flags, "--out", out)
        assert rc == 0, err
        assert json.loads(out.read_text())["k_values"] == [3, 4]
    rc, _, err = invoke_cli(*common, "--k-from", "3", "--k-to", "2", "--out", tmp_path / "bad.json")
    assert rc == 2 and "--k-to 2 is below --k-from 3" in err
