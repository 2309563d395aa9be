"""Dropped-expert compensation (issue 10, item 1): exactness at full K, fit quality, files, FLOPs, padding."""

import warnings

import pytest
import torch

import allocmoe
from allocmoe import compensation as C
from allocmoe.testing import tiny_model

torch.set_num_threads(1)

FAMS = ["deepseek_v2", "qwen3_moe"]


@pytest.fixture(scope="module")
def tiny():
    return {f: tiny_model(f) for f in FAMS}


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 97, (16, 32), generator=g)


def _plan(model, policy="fixed", k=2):
    return allocmoe.make_plan(model, [k] * len(allocmoe.find_moe_layers(model)), token_policy=policy)


@pytest.fixture(scope="module")
def fitted(tiny, calib):
    """One teacher-mode fit per family for the fixed top-2 plan (K = 4)."""
    return {f: C.fit_compensation(tiny[f], _plan(tiny[f]), calib, mode="teacher", progress=False) for f in FAMS}


@pytest.mark.parametrize("fam", FAMS)
def test_exact_at_full_k(tiny, fitted, fam):
    model = tiny[fam]
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with allocmoe.apply(model, allocmoe.full_plan(model)), C.install(model, fitted[fam]) as ch:
            out = model(input_ids=ids).logits
            assert ch.flops()["macs_total"] == 0
        with C.install(model, fitted[fam]):  # unpatched model: every token keeps K, nothing added
            out2 = model(input_ids=ids).logits
    assert torch.equal(ref, out) and torch.equal(ref, out2)


@pytest.mark.parametrize("fam", FAMS)
@pytest.mark.parametrize("policy", ["fixed", "global"])
@pytest.mark.parametrize("mode,router_features", [("teacher", True), ("sequential", True), ("sequential", False)])
def test_fit_reduces_calibration_residual(tiny, calib, fam, policy, mode, router_features):
    model = tiny[fam]
    plan = _plan(model, policy)
    comp = C.fit_compensation(model, plan, calib, mode=mode, router_features=router_features, progress=False)
    assert comp.meta["mode"] == mode and comp.router_features == router_features
    if policy == "global":  # several kept counts occur, each with its own map
        assert any(len(m) > 1 for m in comp.maps)
    res = C.calibration_residual(model, plan, comp, calib, mode=mode)
    for l, r in enumerate(res):
        assert r["tokens"] > 0
        assert r["err2"] < 0.97 * r["r2"], (l, r)
    # the FLOPs cap: per layer, compensation <= 10% of the expert multiply-adds the plan saves
    for info in comp.meta["layers"]:
        assert info["comp_macs_per_token"] <= 0.1 * info["saved_expert_macs_per_token"] + 1e-9
    assert model.__dict__.get("forward") is None and not allocmoe.find_moe_layers(model)[0].experts._forward_hooks


def test_save_load_round_trip(tiny, fitted, tmp_path):
    comp = fitted["deepseek_v2"]
    digest = comp.save(tmp_path / "c.safetensors")
    back = C.Compensation.load(tmp_path / "c.safetensors", expected_sha256=digest, model=tiny["deepseek_v2"])
    assert back.sha256 == digest and back.ranks() == comp.ranks() and back.meta == comp.meta
    x = torch.randn(40, comp.hidden_size)
    counts = torch.tensor([0, 1, 2, 3, 4] * 8)
    for l in range(comp.num_layers):
        assert torch.equal(comp.delta(l, x, counts), back.delta(l, x, counts))


def test_bad_files_are_one_line_errors(tiny, fitted, tmp_path):
    comp = fitted["deepseek_v2"]
    p = tmp_path / "c.safetensors"
    digest = comp.save(p)
    errs = []
    with pytest.raises(allocmoe.FileFormatError) as e:
        C.Compensation.load(tmp_path / "missing.safetensors")
    errs.append(e.value)
    with pytest.raises(allocmoe.PlanError) as e:  # checksum in the plan does not match the file
        C.Compensation.load(p, expected_sha256="0" * 64)
    errs.append(e.value)
    data = bytearray(p.read_bytes())
    data[-5] ^= 0xFF  # flip a byte inside the tensor data
    (tmp_path / "flip.safetensors").write_bytes(bytes(data))
    with pytest.raises(allocmoe.FileFormatError) as e:
        C.Compensation.load(tmp_path / "flip.safetensors")
    errs.append(e.value)
    (tmp_path / "trunc.safetensors").write_bytes(p.read_bytes()[:100])
    with pytest.raises(allocmoe.FileFormatError) as e:
        C.Compensation.load(tmp_path / "trunc.safetensors")
    errs.append(e.value)
    (tmp_path / "junk.safetensors").write_text("hello")
    with pytest.raises(allocmoe.FileFormatError) as e:
        C.Compensation.load(tmp_path / "junk.safetensors")
    errs.append(e.value)
    with pytest.raises(allocmoe.ModelMismatchError) as e:  # made for the deepseek model (2 MoE layers)
        C.Compensation.load(p, model=tiny["qwen3_moe"])
    errs.append(e.value)
    with pytest.raises(allocmoe.ModelMismatchError):
        C.install(tiny["qwen3_moe"], comp)
    for err in errs:
        assert isinstance(err, allocmoe.AllocMoeError) and "\n" not in str(err) and str(err)


def test_flops_counting_and_padding(tiny, fitted):
    model, comp = tiny["qwen3_moe"], fitted["qwen3_moe"]
    H = comp.hidden_size
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # 4 padding tokens (right padding)
    seen = []
    layers = allocmoe.find_moe_layers(model)
    hooks = [l.experts.register_forward_hook(lambda m, a, o: seen.append((a[1] >= 0).sum(-1))) for l in layers]
    try:
        with torch.no_grad(), allocmoe.apply(model, _plan(model)), C.install(model, comp) as ch:
            model(input_ids=ids, attention_mask=mask)
            fl = ch.flops()
    finally:
        for h in hooks:
            h.remove()
    real = int(mask.sum())
    # per compensated token: 2 R H for the low-rank map + H per dropped expert looked up (K - k = 2 here)
    assert comp.router_features
    expected = sum((2 * comp.maps[l][2].rank + 2) * H * real for l in range(len(layers)))
    assert fl["macs_total"] == expected and fl["tokens"] == real
    assert fl["compensated_tokens_per_layer"] == [real] * len(layers)
    assert fl["macs_per_token"] == pytest.approx(expected / real)
    for c in seen:  # padding has count 0 -> no delta
        assert int((c == 0).sum()) == 4
    counts = torch.tensor([0, 2, 4, 0])
    x = torch.randn(4, H)
    d = comp.delta(0, x, counts)
    assert torch.equal(d[[0, 2, 3]], torch.zeros(3, H)) and d[1].abs().sum() > 0
    assert comp.macs(0, counts)["macs"] == 2 * comp.maps[0][2].rank * H  # no router features given
    assert comp.flops_per_token(0, counts) == pytest.approx(2 * comp.maps[0][2].rank * H / 2)
    dropped = (torch.tensor([[-1, -1, -1, -1], [5, 6, -1, -1], [-1] * 4, [-1] * 4]), torch.rand(4, 4))
    assert comp.macs(0, counts, dropped)["macs"] == (2 * comp.maps[0][2].rank + 2) * H


def test_padding_positions_unchanged_by_compensation(tiny, fitted):
    """With right padding, the real tokens' logits do not depend on what padding sits beside them."""
    model, comp = tiny["deepseek_v2"], fitted["deepseek_v2"]
    ids = torch.randint(3, 97, (1, 10), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 10, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)], 1)
    with torch.no_grad(), allocmoe.apply(model, _plan(model)), C.install(model, comp):
        a = model(input_ids=ids).logits
        b = model(input_ids=padded, attention_mask=mask).logits[:, :10]
    assert torch.allclose(a, b, atol=1e-5)


def test_rank_cap_refused_or_warned(tiny, calib):
    model = tiny["deepseek_v2"]
    # saves 1 pair of 3*32*16 MACs per token -> 10% = 153.6 allows rank 2 (2*R*32 <= 153.6), or rank 1 with
    # the router-feature lookup (2*R*32 + 32 <= 153.6)
    plan = _plan(model, k=3)
    for rf, cap in ((False, 2), (True, 1)):
        comp = C.fit_compensation(model, plan, calib, mode="teacher", router_features=rf, progress=False)
        assert [max(r.values()) for r in comp.ranks()] == [cap, cap]
        with pytest.raises(allocmoe.PlanError, match=f"largest allowed rank is {cap}"):
            C.fit_compensation(model, plan, calib, mode="teacher", rank=8, router_features=rf, progress=False)
    with pytest.warns(UserWarning):
        comp = C.fit_compensation(model, plan, calib, mode="teacher", rank=8, flops_fraction=None, progress=False)
    assert comp.ranks()[0][3] == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        C.fit_compensation(model, plan, calib, mode="teacher", rank=2, router_features=False, progress=False)
    # every kept count >= K is left alone: nothing to fit for a full plan
    full = C.fit_compensation(model, allocmoe.full_plan(model), calib, mode="teacher", progress=False)
    assert all(not m for m in full.maps)


def test_fit_best_records_choice(tiny, calib):
    model = tiny["qwen3_moe"]
    comp = C.fit_best(model, _plan(model, "global"), calib, progress=False)
    sel = comp.meta["selection"]
    assert sel["chosen"] in ("teacher", "sequential") and comp.meta["mode"] == sel["chosen"]
    assert sel["kl"][sel["chosen"]] == min(sel["kl"]["teacher"], sel["kl"]["sequential"])
    assert sel["holdout_tokens"] == 2 * 32


def test_trajectory_and_fisher_variants_run(tiny, calib):
    model = tiny["deepseek_v2"]
    plan = _plan(model)
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(4))
    for kw in ({"mode": "trajectory"}, {"mode": "teacher", "metric": "fisher"}):
        comp = C.fit_compensation(model, plan, calib, progress=False, **kw)
        assert [sorted(m) for m in comp.maps] == [[2], [2]] and comp.meta["mode"] == kw["mode"]
        with torch.no_grad():
            ref = model(input_ids=ids).logits
            with allocmoe.apply(model, allocmoe.full_plan(model)), C.install(model, comp):
                assert torch.equal(model(input_ids=ids).logits, ref)
    with pytest.raises(allocmoe.PlanError):
        C.fit_compensation(model, plan, calib, mode="bogus", progress=False)


def test_fit_best_ridges_and_refit(tiny, calib):
    model = tiny["deepseek_v2"]
    comp = C.fit_best(model, _plan(model), calib, modes=("teacher",), ridges=(1e-2, 1e-1), refit=True,
                      progress=False)
    sel = comp.meta["selection"]
    assert set(sel["kl"]) == {"none", "teacher@ridge=0.01", "teacher@ridge=0.1"}
    assert sel["ridge"] in (1e-2, 1e-1) and sel["refit"] and comp.meta["calibration_tokens"] == calib.numel()
