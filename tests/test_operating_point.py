"""Operating-point profiling (`profile(..., at=BUDGET)`, `--at`): the other layers run the budget's allocation."""

import json

import numpy as np
import pytest
import torch

import allocmoe
from allocmoe import allocators, errors
from allocmoe.adapters import decoder_layers
from allocmoe.profiling import Profile, profile
from allocmoe.testing import invoke_cli, tiny_model


@pytest.fixture(scope="module")
def sharp():
    """A tiny qwen3_moe (4 MoE layers, top-4) with sharpened logits, so KLs are far above float noise."""
    m = tiny_model("qwen3_moe", num_layers=4)
    with torch.no_grad():
        m.lm_head.weight.mul_(30)
    return m


@pytest.fixture(scope="module")
def windows():
    return torch.randint(3, 97, (8, 24), generator=torch.Generator().manual_seed(3))


def test_around_full_k_is_the_full_profile(sharp, windows):
    full = profile(sharp, windows, batch_size=4, progress=False)
    same = profile(sharp, windows, batch_size=4, progress=False, around=[4, 4, 4, 4])
    for m in ("kl", "loss"):
        np.testing.assert_allclose(same.metrics[m], full.metrics[m], rtol=0, atol=1e-12)
    assert full.operating_point is None and same.settings["around"] == [4, 4, 4, 4]


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2"])
def test_cached_equals_naive_around_an_allocation(models, windows, family):
    m = models[family]  # deepseek_v2: a dense first decoder layer and shared experts
    n = len(allocmoe.find_moe_layers(m))
    around = [1, 3, 2][:n]
    a = profile(m, windows, batch_size=4, progress=False, around=around)
    b = profile(m, windows, batch_size=4, progress=False, around=around, cached=False)
    for metric in ("kl", "loss"):
        np.testing.assert_allclose(a.metrics[metric], b.metrics[metric], rtol=1e-5, atol=1e-10)


def test_budgeted_neighbours_change_each_layers_cost(sharp, windows):
    full = np.array(profile(sharp, windows, batch_size=4, progress=False).sensitivity)
    op = profile(sharp, windows, batch_size=4, progress=False, at=0.5)
    S = np.array(op.sensitivity)
    # with the other three layers at k=2, every candidate costs more than with them at full K
    assert (S > full + 1e-6).all()
    # S[l][k] at the surrounding allocation itself is the whole allocation's KL: the same for every layer
    around = op.operating_point["around"]
    base = [S[l, op.k_values.index(k)] for l, k in enumerate(around)]
    assert np.ptp(base) < 1e-12 and base[0] > 1e-6
    assert op.k_values == [1, 2, 3, 4]


def test_fixed_point_loop_records_the_operating_point(sharp, windows):
    op = profile(sharp, windows, batch_size=4, progress=False, at="0.5", rounds=3)
    o = op.operating_point
    assert o["at"] == "0.5" and o["budget"] == 8 and o["allocations"][0] == [2, 2, 2, 2]
    assert 1 <= o["rounds"] <= 3 and len(o["allocations"]) == o["rounds"] and o["around"] == o["allocations"][-1]
    assert o["dp_plan"] == allocators.dp_allocate(op.sensitivity, op.k_values, 8)
    assert o["converged"] == (o["dp_plan"] == o["around"])
    # the profile is the last round's: the same as one pass around its allocation
    again = profile(sharp, windows, batch_size=4, progress=False, around=o["around"])
    assert again.sensitivity == op.sensitivity


def test_fixed_point_loop_stops_at_the_round_limit(sharp, windows, monkeypatch):
    plans = iter([[1, 3, 2, 2], [3, 1, 2, 2], [2, 2, 1, 3], [2, 2, 3, 1]])
    monkeypatch.setattr(allocators, "dp_allocate", lambda S, ks, B: next(plans))  # never a fixed point
    op = profile(sharp, windows[:4], batch_size=4, progress=False, at=8, rounds=3)
    o = op.operating_point
    assert o["rounds"] == 3 and o["converged"] is False
    assert o["allocations"] == [[2, 2, 2, 2], [1, 3, 2, 2], [3, 1, 2, 2]] and o["dp_plan"] == [2, 2, 1, 3]
    assert op.settings["around"] == [3, 1, 2, 2]
    with pytest.raises(errors.ProfileError, match="rounds must be an integer >= 1"):
        profile(sharp, windows[:4], progress=False, at=8, rounds=0)


def test_a_round_costs_one_full_profile_plus_one_forward_per_batch(sharp, windows, monkeypatch):
    layer_cls = type(decoder_layers(sharp)[0])
    real = layer_cls.forward
    calls = {"n": 0}

    def counting(self, *a, **k):  # replayed layers (cached outputs) are not counted: they compute nothing
        calls["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(layer_cls, "forward", counting)
    profile(sharp, windows, batch_size=4, progress=False)
    full = calls["n"]
    calls["n"] = 0
    op = profile(sharp, windows, batch_size=4, progress=False, at=0.5, rounds=1)
    D, batches = len(decoder_layers(sharp)), 2
    assert op.operating_point["rounds"] == 1
    assert calls["n"] == full + D * batches  # the surrounding allocation's forward, once per batch


def test_profile_json_round_trip_and_older_profiles(sharp, windows, tmp_path):
    op = profile(sharp, windows[:4], batch_size=4, progress=False, at=0.5, out=tmp_path / "p.json")
    d = json.loads((tmp_path / "p.json").read_text())
    assert d["operating_point"] == op.operating_point and d["settings"]["around"] == op.operating_point["around"]
    assert not list(tmp_path.glob("*.partial.json"))
    back = Profile.load(tmp_path / "p.json")
    assert back.operating_point == op.operating_point and back.with_metric("loss").operating_point == op.operating_point
    del d["operating_point"]  # a profile written before operating points: still loads
    assert Profile.load(d).operating_point is None
    d["operating_point"] = [1, 2]
    with pytest.raises(errors.ProfileError, match="operating_point"):
        Profile.load(d)
    with pytest.raises(errors.ProfileError, match="around must give one of the candidate k"):
        profile(sharp, windows[:4], progress=False, around=[2, 2])
    assert profile(sharp, windows[:4], progress=False, at="full").operating_point == {"at": "full"}


def test_allocate_profiles_at_the_budgets_operating_point(sharp, windows):
    plan = allocmoe.allocate(sharp, budget=0.5, method="dp", windows=windows, progress=False)
    op = plan.meta["profile_operating_point"]
    assert op["at"] == "0.5" and len(op["around"]) == 4 and plan.budget["activations_per_token"] == 8
    assert plan.meta["recipe"]["method"]["profile_at"] == "budget"
    full = allocmoe.allocate(sharp, budget=0.5, method="dp", windows=windows, progress=False, profile_at="full")
    assert full.meta["profile_operating_point"] == {"at": "full"}
    with pytest.raises(errors.SettingsError, match="profile_at"):
        allocmoe.allocate(sharp, budget=0.5, method="dp", windows=windows, progress=False, profile_at="half")


def test_cli_profile_at(tiny_dir, tmp_path):
    (tmp_path / "text.txt").write_text("It is a truth universally acknowledged. " * 10)
    common = ("profile", "--model", tiny_dir("qwen3_moe"), "--data", tmp_path / "text.txt", "--tokens", "64",
              "--seq-len", "16", "--batch-size", "4")
    rc, _, err = invoke_cli(*common, "--at", "0.5", "--out", tmp_path / "op.json")
    assert rc == 0, err
    d = json.loads((tmp_path / "op.json").read_text())
    assert d["operating_point"]["at"] == "0.5" and d["operating_point"]["budget"] == 6
    assert d["operating_point"]["window"] == 2 and d["k_values"] == [1, 2, 3, 4]
    rc, _, err = invoke_cli(*common, "--at", "0.5", "--window", "0", "--out", tmp_path / "w0.json")
    assert rc == 0, err
    w0 = json.loads((tmp_path / "w0.json").read_text())  # only the allocation's own k: nothing to move
    assert w0["k_values"] == [2] and w0["operating_point"]["converged"] is True
    rc, _, err = invoke_cli(*common, "--out", tmp_path / "full.json")
    assert rc == 0, err
    assert json.loads((tmp_path / "full.json").read_text())["operating_point"] == {"at": "full"}
    rc, _, err = invoke_cli(*common, "--at", "half", "--out", tmp_path / "bad.json")
    assert rc == 2 and "not a number" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad.json").exists()


def test_candidates_are_a_window_around_the_operating_point(sharp, windows):
    every = profile(sharp, windows, batch_size=4, progress=False, at=0.5, rounds=1, window=None)
    near = profile(sharp, windows, batch_size=4, progress=False, at=0.5, rounds=1, window=1)
    assert every.k_values == [1, 2, 3, 4] and near.k_values == [1, 2, 3]  # around [2, 2, 2, 2], +-1
    assert near.operating_point["window"] == 1
    # a candidate's cost does not depend on which other candidates are measured
    S, T = np.array(every.sensitivity), np.array(near.sensitivity)
    np.testing.assert_allclose(T, S[:, :3], rtol=0, atol=1e-12)
    with pytest.raises(errors.ProfileError, match="window must be an integer >= 0"):
        profile(sharp, windows, batch_size=4, progress=False, at=0.5, window=-1)
