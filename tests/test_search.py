"""End-to-end plan search and policy-aware profiling."""

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import allocmoe
from allocmoe.search import PlanFitness, mutate, search_allocation
from allocmoe.testing import tiny_model


@pytest.fixture(scope="module")
def model():
    m = tiny_model("qwen3_moe", num_layers=4)
    with torch.no_grad():  # larger logits so plans differ measurably in KL
        m.lm_head.weight.mul_(40.0)
    return m


@pytest.fixture(scope="module")
def windows():
    return torch.randint(3, 97, (16, 24), generator=torch.Generator().manual_seed(3))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=2, max_size=8), st.integers(0, 10**6), st.integers(1, 3))
def test_mutation_keeps_the_budget_and_bounds(ks, seed, moves):
    out = mutate(ks, [1, 2, 3, 4], random.Random(seed), moves)
    assert sum(out) == sum(ks) and all(1 <= k <= 4 for k in out) and len(out) == len(ks)


def test_search_never_worse_than_its_start_exact_budget_and_seeded(model, windows):
    fit = PlanFitness(model, windows, {"name": "fixed"})
    start = [1, 1, 4, 4]  # a deliberately lopsided start
    ks, hist = search_allocation(fit, start, [1, 2, 3, 4], generations=6, seed=1, progress=False)
    assert sum(ks) == sum(start)
    assert hist["final_fitness"] <= hist["start_fitness"] == fit(start, 16)
    assert hist["final_fitness"] == fit(ks, 16)
    ks2, _ = search_allocation(PlanFitness(model, windows, {"name": "fixed"}), start, [1, 2, 3, 4],
                               generations=6, seed=1, progress=False)
    assert ks2 == ks
    # the fitness is the KL of the whole plan: the full plan scores 0, a cut plan more
    assert fit([4, 4, 4, 4], 16) == pytest.approx(0.0, abs=1e-9) and fit([1, 1, 1, 1], 16) > fit([2, 2, 2, 2], 16) > 0


def test_search_terminates_with_few_neighbours(model, windows):
    """Two layers at [2, 2] with k in 1..4 have only a handful of distinct mutations: no endless retrying."""
    m2 = tiny_model("qwen3_moe", num_layers=2)
    fit = PlanFitness(m2, windows[:4], {"name": "fixed"})
    ks, hist = search_allocation(fit, [2, 2], [1, 2, 3, 4], generations=3, low_windows=2, high_windows=4,
                                 progress=False)
    assert sum(ks) == 4 and hist["evaluations"] <= 3 * 8 * 2 + 1


def test_search_method_through_allocate(model, windows):
    prof = allocmoe.profile(model, windows, progress=False)
    plan = allocmoe.allocate(model, budget=0.5, method="search", windows=windows, profile=prof, progress=False)
    dp = allocmoe.allocate(prof, 0.5)
    h = plan.meta["search"]
    assert sum(plan.ks) == sum(dp.ks) == 8 and plan.method == "search"
    assert h["start"] == dp.ks and plan.meta["search_start"] == "dp"
    assert h["final_fitness"] <= h["start_fitness"]
    again = allocmoe.allocate(model, budget=0.5, method="search", windows=windows, profile=prof, progress=False)
    assert again.ks == plan.ks


def test_policy_aware_profile(model, windows):
    fixed = allocmoe.profile(model, windows, progress=False)
    glob = allocmoe.profile(model, windows, progress=False, token_policy="global")
    thr = allocmoe.profile(model, windows, progress=False, token_policy="threshold")
    assert glob.settings["token_policy"] == "global" and len(thr.settings["knobs"]) == 4
    F, G = np.array(fixed.sensitivity), np.array(glob.sensitivity)
    # at k = min_k = 1 every token keeps exactly one expert under global too: same selection as fixed top-1
    np.testing.assert_allclose(G[:, 0], F[:, 0], rtol=1e-6)
    # at k = K the fixed entry is the reference itself; global redistributes, so it is measured (and differs)
    assert (F[:, -1] == 0).all() and (G[:, -1] != 0).any()
    assert not np.allclose(np.array(thr.sensitivity)[:, 1], F[:, 1])
    plan = allocmoe.allocate(glob, 0.5, token_policy="global")
    assert plan.meta["profile_token_policy"] == "global"
