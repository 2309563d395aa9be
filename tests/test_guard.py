"""The plan guard (guard.py): plans of methods that score plans are checked against uniform on held-out text."""

import pytest
import torch

import allocmoe
from allocmoe.divergence import mean_kl, references
from allocmoe.guard import held_out_windows
from allocmoe.plan import full_plan, make_plan
from allocmoe.profiling import profile
from allocmoe.testing import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model():
    m = tiny_model("qwen3_moe", num_layers=3)
    with torch.no_grad():
        m.lm_head.weight.mul_(30)  # KLs far above float noise
    return m


@pytest.fixture(scope="module")
def held():
    return torch.randint(3, 97, (6, 24), generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def prof(model):
    return profile(model, torch.randint(3, 97, (4, 24), generator=torch.Generator().manual_seed(3)), progress=False)


def _kl(model, ks, windows):
    with allocmoe.apply(model, full_plan(model)):
        refs = references(model, windows, 8)
    with allocmoe.apply(model, make_plan(model, ks)):
        return mean_kl(model, windows, refs, 8)


def test_guard_returns_uniform_when_the_dp_plan_is_worse(model, held, prof):
    rigged = prof.to_dict()
    rigged["sensitivity"] = [[0.0, 0.0, 0.0, 0.0], [0.0, 9.0, 9.0, 9.0], [0.0, 9.0, 9.0, 9.0]]  # dp: [4, 1, 1]
    rigged["metrics"] = {"kl": rigged["sensitivity"]}
    plan = allocmoe.allocate(model, budget=6, method="dp", profile=rigged, guard_windows=held, progress=False)
    g = plan.meta["guard"]
    assert g["allocations"] == {"candidate": [4, 1, 1], "uniform": [2, 2, 2]}
    assert g["candidate_kl"] == pytest.approx(_kl(model, [4, 1, 1], held), rel=1e-9)
    assert g["uniform_kl"] == pytest.approx(_kl(model, [2, 2, 2], held), rel=1e-9)
    assert g["candidate_kl"] > g["uniform_kl"] and g["chosen"] == "uniform" and plan.ks == [2, 2, 2]
    assert g["windows"] == 6 and plan.meta["predicted_cost"] == 0.0  # the method's own figures are kept


def test_guard_keeps_a_better_plan_and_can_be_turned_off(model, held, prof):
    rigged = prof.to_dict()
    rigged["sensitivity"] = [[9.0, 0.0, 0.0, 0.0], [9.0, 0.0, 0.0, 0.0], [9.0, 0.0, 0.0, 0.0]]  # dp: [2, 2, 2]
    rigged["metrics"] = {"kl": rigged["sensitivity"]}
    plan = allocmoe.allocate(model, budget=6, method="dp", profile=rigged, guard_windows=held, progress=False)
    g = plan.meta["guard"]
    assert plan.ks == [2, 2, 2] and g["chosen"] == "candidate" and g["candidate_kl"] == g["uniform_kl"]
    off = allocmoe.allocate(model, budget=6, method="dp", profile=prof, guard_windows=held, progress=False,
                            guard=False)
    assert "guard" not in off.meta and off.meta["recipe"]["method"]["guard"] is False
    # methods that do not score plans are not guarded
    assert "guard" not in allocmoe.allocate(model, budget=6, method="uniform", progress=False).meta


def test_previous_round_is_a_contender(model, held):
    w = torch.randint(3, 97, (4, 24), generator=torch.Generator().manual_seed(3))
    op = profile(model, w, progress=False, at=6)
    plan = allocmoe.allocate(model, budget=6, method="dp", profile=op, guard_windows=held, progress=False)
    g = plan.meta["guard"]
    assert set(g["allocations"]) >= {"candidate", "uniform"}
    if op.operating_point["around"] not in (g["allocations"]["candidate"], g["allocations"]["uniform"]):
        assert g["allocations"]["previous"] == op.operating_point["around"] and "previous_kl" in g
    best = min((v, k) for k, v in g.items() if k.endswith("_kl"))[1][:-3]
    assert g["chosen"] == best and plan.ks == g["allocations"][best]


def test_held_out_windows_come_from_the_end_of_the_calibration_text(model, prof):
    tok = tiny_tokenizer()
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 60
    plan = allocmoe.allocate(model, budget=6, method="dp", profile=prof, tokenizer=tok, texts=[text],
                             calibration_tokens=256, seq_len=32, progress=False)
    g = plan.meta["guard"]
    assert "note" not in g and g["windows"] == 2048 // 32 and g["chosen"] in g["allocations"]
    short = allocmoe.allocate(model, budget=6, method="dp", profile=prof, tokenizer=tok, texts=[text[:2200]],
                              calibration_tokens=256, seq_len=32, progress=False)
    assert short.meta["guard"]["note"].startswith("skipped: the calibration text")
    assert allocmoe.allocate(prof, 6).meta["guard"]["note"] == "skipped: no model weights (pass the model)"
    # held-out windows never overlap the first `used` windows
    all_w = torch.arange(20 * 4).view(20, 4)
    assert held_out_windows(all_w, used=12, tokens=32).tolist() == all_w[-8:].tolist()
    assert held_out_windows(all_w, used=13, tokens=32) is None
