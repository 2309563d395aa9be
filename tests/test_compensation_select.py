"""Compensation only where it helps (compensation_select.py): "no map" per layer unless a map helps beyond noise."""

import math

import pytest
import torch

import allocmoe
from allocmoe import compensation_select as CS
from allocmoe.compensation_fit import fit_best
from allocmoe.testing import tiny_model


@pytest.fixture(scope="module")
def calib():
    return torch.randint(3, 97, (24, 24), generator=torch.Generator().manual_seed(3))


def _plan(model, k=2):
    return allocmoe.make_plan(model, [k] * len(allocmoe.find_moe_layers(model)))


def test_a_random_model_ends_with_no_maps(calib, tmp_path):
    m = tiny_model("deepseek_v2")
    plan = allocmoe.allocate(m, budget=0.5, method="uniform", windows=calib, compensate=True, progress=False)
    comp = plan.compensation_maps
    assert plan.compensation["kept_layers"] == [] and all(not layer for layer in comp.maps)
    sel = comp.meta["layer_selection"]
    assert set(sel["layers"]) == {"0", "1"} and not any(f["kept"] for f in sel["layers"].values())
    x = calib[:2]
    plan.save(tmp_path / "plan.json")
    with allocmoe.apply(m, tmp_path / "plan.json") as h, torch.no_grad():
        m(x)
        assert h.counts().get("compensation", {}).get("macs_per_token", 0) == 0
    # unpruned, the same fit has maps in every layer
    full = fit_best(m, _plan(m), calib, progress=False, prune=False)
    assert all(layer for layer in full.maps) and "kept_layers" not in full.meta


def test_maps_that_cannot_help_are_dropped(calib):
    m = tiny_model("qwen3_moe")
    with torch.no_grad():  # every expert outputs 0: the dropped experts add nothing, a map has nothing to add
        for layer in allocmoe.find_moe_layers(m):
            for name, p in layer.experts.named_parameters():
                if "down" in name:
                    p.zero_()
    comp = fit_best(m, _plan(m), calib, progress=False)
    assert comp.meta["kept_layers"] == [] and all(not layer for layer in comp.maps)


def test_benefit_and_the_noise_rule(monkeypatch):
    g = torch.Generator().manual_seed(0)
    base = torch.rand(640, generator=g, dtype=torch.float64)
    gain, se = CS.benefit(base, base + 0.5)  # removing the maps costs 0.5 per position, at every position
    assert gain == pytest.approx(0.5) and se == pytest.approx(0.0, abs=1e-12)
    noise = base + 0.1 * torch.randn(640, generator=g, dtype=torch.float64)
    gain, se = CS.benefit(base, noise)
    assert abs(gain) < 2 * se
    assert CS.benefit(base[:10], base[:10] + 1)[1] == math.inf  # one block: no noise estimate, nothing kept

    # prune_layers: the set must help beyond noise; then a layer loses its maps only where they hurt beyond noise
    m = tiny_model("qwen3_moe")
    comp = fit_best(m, _plan(m), torch.randint(3, 97, (16, 24), generator=g), progress=False, prune=False)

    def fake(effect):  # effect[l]: the KL layer l's maps remove; + 0.001 noise per position
        def fake_kl(model, plan, c, windows, reference, batch_size):
            missing = range(len(effect)) if c is None else [l for l, layer in enumerate(c.maps) if not layer]
            return base + sum(effect[l] for l in missing) + 0.001 * torch.randn(640, generator=g,
                                                                                 dtype=torch.float64)
        return fake_kl

    monkeypatch.setattr(CS, "position_kl", fake([0.5, 0.0005, -0.01]))  # helps, within noise, hurts
    out = CS.prune_layers(m, _plan(m), comp, None, None)
    assert out.meta["kept_layers"] == [0, 1] and bool(out.maps[0]) and bool(out.maps[1]) and not out.maps[2]
    sel = out.meta["layer_selection"]
    assert sel["all_maps"]["kept"] and sel["all_maps"]["kl_lowered"] == pytest.approx(0.4905, abs=1e-3)
    assert [sel["layers"][str(l)]["kept"] for l in range(3)] == [True, True, False]
    assert comp.maps[2]  # the input is left as it was

    # the set does not help beyond noise (its layers cancel): no layer keeps a map, whatever its own share
    monkeypatch.setattr(CS, "position_kl", fake([0.02, -0.02, 0.0]))
    out = CS.prune_layers(m, _plan(m), comp, None, None)
    assert out.meta["kept_layers"] == [] and not any(out.maps)
    assert not out.meta["layer_selection"]["all_maps"]["kept"]


def test_selection_runs_on_the_guards_held_out_text():
    # with calibration text, the fitting mode and the maps kept are chosen on the guard's held-out windows (the
    # end of the text, beyond every window read), so all calibration windows are fitted on; without enough
    # text, on the last eighth of the calibration windows
    from allocmoe.guard import GUARD_TOKENS
    from allocmoe.testing import tiny_tokenizer

    m, tok = tiny_model("qwen3_moe"), tiny_tokenizer()
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 60
    kw = dict(method="uniform", tokenizer=tok, calibration_tokens=256, seq_len=32, compensate=True, progress=False)
    plan = allocmoe.allocate(m, budget=0.5, texts=[text], **kw)
    sel = plan.compensation_maps.meta["selection"]
    assert sel["holdout_tokens"] == GUARD_TOKENS
    assert plan.compensation_maps.meta["layer_selection"]["held_out_positions"] == GUARD_TOKENS
    short = allocmoe.allocate(m, budget=0.5, texts=[text[:2200]], **kw)
    assert short.compensation_maps.meta["selection"]["holdout_tokens"] == 256 // 8
