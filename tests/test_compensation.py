"""Dropped-expert compensation (issue 10, item 1; split into maps + fitter in issue 21): exactness at full K,
fit quality (KL to the full model), files, FLOPs, padding."""

import warnings

import pytest
import torch

import allocmoe
from allocmoe import compensation_fit as CF
from allocmoe import compensation_maps as CM
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
    return {f: CF.fit_compensation(tiny[f], _plan(tiny[f]), calib, mode="teacher", progress=False) for f in FAMS}


@pytest.mark.parametrize("fam", FAMS)
def test_exact_at_full_k(tiny, fitted, fam):
    model = tiny[fam]
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with allocmoe.apply(model, allocmoe.full_plan(model)), CM.install(model, fitted[fam]) as ch:
            out = model(input_ids=ids).logits
            assert ch.flops()["macs_total"] == 0
        with CM.install(model, fitted[fam]):  # unpatched model: every token keeps K, nothing added
            out2 = model(input_ids=ids).logits
    assert torch.equal(ref, out) and torch.equal(ref, out2)


@pytest.fixture(scope="module")
def sharp():
    """Tiny models whose output depends on routing: with the random init the logits are almost uniform and
    dropping experts moves the KL by ~1e-8 (float noise); a sharper LM head and stronger experts give KL
    ~1e-5..1e-2 under the top-2 plans below."""
    out = {}
    for f in FAMS:
        m = tiny_model(f)
        with torch.no_grad():
            m.lm_head.weight.mul_(50.0)
            for layer in allocmoe.find_moe_layers(m):
                for name, p in layer.experts.named_parameters():
                    if "down" in name:
                        p.mul_(10.0)
        out[f] = m
    return out


@pytest.mark.parametrize("fam", FAMS)
@pytest.mark.parametrize("policy", ["fixed", "global"])
@pytest.mark.parametrize("mode,router_features", [("teacher", True), ("sequential", True), ("sequential", False)])
def test_fit_lowers_kl_to_full_model(sharp, calib, fam, policy, mode, router_features):
    model = sharp[fam]
    plan = _plan(model, policy)
    comp = CF.fit_compensation(model, plan, calib, mode=mode, router_features=router_features, progress=False)
    assert comp.meta["mode"] == mode and comp.router_features == router_features
    assert comp.meta["ridge"] == CF.DEFAULT_RIDGE
    if policy == "global":  # several kept counts occur, each with its own map
        assert any(len(m) > 1 for m in comp.maps)
    without = CF.kl_to_full(model, plan, None, calib)
    with_maps = CF.kl_to_full(model, plan, comp, calib)
    assert without > 1e-6  # the plan does change the model's output measurably
    # on the calibration windows the maps were fitted on, the budgeted model gets measurably closer to the full one
    assert with_maps < 0.97 * without, (with_maps, without)
    # the FLOPs cap: per layer, compensation <= 10% of the expert multiply-adds the plan saves
    for info in comp.meta["layers"]:
        assert info["comp_macs_per_token"] <= 0.1 * info["saved_expert_macs_per_token"] + 1e-9
    assert model.__dict__.get("forward") is None and not allocmoe.find_moe_layers(model)[0].experts._forward_hooks


def test_save_load_round_trip(tiny, fitted, tmp_path):
    comp = fitted["deepseek_v2"]
    digest = comp.save(tmp_path / "c.safetensors")
    back = CM.Compensation.load(tmp_path / "c.safetensors", expected_sha256=digest, model=tiny["deepseek_v2"])
    assert [f.name for f in tmp_path.iterdir()] == ["c.safetensors"]  # written atomically, no temp file left
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
        CM.Compensation.load(tmp_path / "missing.safetensors")
    errs.append(e.value)
    with pytest.raises(allocmoe.PlanError) as e:  # checksum in the plan does not match the file
        CM.Compensation.load(p, expected_sha256="0" * 64)
    errs.append(e.value)
    data = bytearray(p.read_bytes())
    data[-5] ^= 0xFF  # flip a byte inside the tensor data
    (tmp_path / "flip.safetensors").write_bytes(bytes(data))
    with pytest.raises(allocmoe.FileFormatError) as e:
        CM.Compensation.load(tmp_path / "flip.safetensors")
    errs.append(e.value)
    (tmp_path / "trunc.safetensors").write_bytes(p.read_bytes()[:100])
    with pytest.raises(allocmoe.FileFormatError) as e:
        CM.Compensation.load(tmp_path / "trunc.safetensors")
    errs.append(e.value)
    (tmp_path / "junk.safetensors").write_text("hello")
    with pytest.raises(allocmoe.FileFormatError) as e:
        CM.Compensation.load(tmp_path / "junk.safetensors")
    errs.append(e.value)
    with pytest.raises(allocmoe.ModelMismatchError) as e:  # made for the deepseek model (2 MoE layers)
        CM.Compensation.load(p, model=tiny["qwen3_moe"])
    errs.append(e.value)
    with pytest.raises(allocmoe.ModelMismatchError):
        CM.install(tiny["qwen3_moe"], comp)
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
        with torch.no_grad(), allocmoe.apply(model, _plan(model)), CM.install(model, comp) as ch:
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
    d, cost = comp.delta_and_cost(0, x, counts)
    assert torch.equal(d, comp.delta(0, x, counts))
    assert torch.equal(d[[0, 2, 3]], torch.zeros(3, H)) and d[1].abs().sum() > 0
    R = comp.maps[0][2].rank
    # one compensated token, no router features given: 2 R H multiply-adds, H bias adds
    assert cost == {"macs": 2 * R * H, "bias_adds": H, "compensated_tokens": 1}
    dropped = (torch.tensor([[-1, -1, -1, -1], [5, 6, -1, -1], [-1] * 4, [-1] * 4]), torch.rand(4, 4))
    d2, cost2 = comp.delta_and_cost(0, x, counts, dropped)
    assert cost2["macs"] == (2 * R + 2) * H  # + H per dropped expert looked up (2 here)
    assert not torch.equal(d2[1], d[1])  # the lookup is used, not its calibration mean


def test_padding_positions_unchanged_by_compensation(tiny, fitted):
    """With right padding, the real tokens' logits do not depend on what padding sits beside them."""
    model, comp = tiny["deepseek_v2"], fitted["deepseek_v2"]
    ids = torch.randint(3, 97, (1, 10), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 10, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)], 1)
    with torch.no_grad(), allocmoe.apply(model, _plan(model)), CM.install(model, comp):
        a = model(input_ids=ids).logits
        b = model(input_ids=padded, attention_mask=mask).logits[:, :10]
    assert torch.allclose(a, b, atol=1e-5)


def test_rank_cap_refused_or_warned(tiny, calib):
    model = tiny["deepseek_v2"]
    # saves 1 pair of 3*32*16 MACs per token -> 10% = 153.6 allows rank 2 (2*R*32 <= 153.6), or rank 1 with
    # the router-feature lookup (2*R*32 + 32 <= 153.6)
    plan = _plan(model, k=3)
    for rf, cap in ((False, 2), (True, 1)):
        comp = CF.fit_compensation(model, plan, calib, mode="teacher", router_features=rf, progress=False)
        assert [max(r.values()) for r in comp.ranks()] == [cap, cap]
        with pytest.raises(allocmoe.PlanError, match=f"largest allowed rank is {cap}"):
            CF.fit_compensation(model, plan, calib, mode="teacher", rank=8, router_features=rf, progress=False)
    with pytest.warns(UserWarning):
        comp = CF.fit_compensation(model, plan, calib, mode="teacher", rank=8, flops_fraction=None, progress=False)
    assert comp.ranks()[0][3] == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CF.fit_compensation(model, plan, calib, mode="teacher", rank=2, router_features=False, progress=False)
    # every kept count >= K is left alone: nothing to fit for a full plan
    full = CF.fit_compensation(model, allocmoe.full_plan(model), calib, mode="teacher", progress=False)
    assert all(not m for m in full.maps)


def test_fit_best_records_choice(tiny, calib):
    model = tiny["qwen3_moe"]
    comp = CF.fit_best(model, _plan(model, "global"), calib, progress=False)
    sel = comp.meta["selection"]
    assert sel["chosen"] in ("teacher", "sequential") and comp.meta["mode"] == sel["chosen"]
    assert sel["kl"][sel["chosen"]] == min(sel["kl"]["teacher"], sel["kl"]["sequential"])
    assert sel["holdout_tokens"] == 2 * 32


def test_unknown_modes_are_refused(tiny, calib):
    model = tiny["deepseek_v2"]
    assert CF.MODES == ("teacher", "sequential")
    for mode in ("bogus", "trajectory"):  # trajectory was removed (measured worse, see docs/results.md)
        with pytest.raises(allocmoe.PlanError, match="unknown compensation mode"):
            CF.fit_compensation(model, _plan(model), calib, mode=mode, progress=False)


def test_fit_best_ridges_and_refit(tiny, calib):
    model = tiny["deepseek_v2"]
    comp = CF.fit_best(model, _plan(model), calib, modes=("teacher",), ridges=(1e-2, 1e-1), refit=True,
                      progress=False)
    sel = comp.meta["selection"]
    assert set(sel["kl"]) == {"none", "teacher@ridge=0.01", "teacher@ridge=0.1"}
    assert sel["ridge"] in (1e-2, 1e-1) and sel["refit"] and comp.meta["calibration_tokens"] == calib.numel()


def test_runtime_maps_need_neither_patching_nor_plan():
    """plan.py and patching.py import the runtime maps; the maps must not import them (or the fitter) back."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(CM))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1}
    assert imported and not imported & {"patching", "plan", "compensation_fit", "planning"}, imported
