import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from allocmoe.allocators import (
    _tie_tol,
    dp_allocate,
    frontier,
    greedy_allocate,
    parse_budget,
    random_allocate,
    uniform_allocate,
)
from allocmoe.errors import AllocMoeError, BudgetError, ProfileError
from allocmoe.methods import METHODS, AllocationContext, get_method
from allocmoe.profiling import Profile


def allocate_matrix(S, ks, B, method, seed=0):
    """Dispatch through the method registry, as `allocmoe.allocate` does."""
    S = np.asarray(S, dtype=float).tolist()
    ctx = AllocationContext(budget=B, k_values=list(ks), num_layers=len(S), seed=seed,
                            profile=Profile(list(ks), S, "kl", 0, {}))
    return METHODS[method].allocate(ctx)

# -----------------------------------------------------------------------------
# strategies / brute force


@st.composite
def problems(draw, grid: bool = True):
    """(S, k_values, B) with L <= 4 layers, <= 4 k-values (possibly with gaps) and a reachable B."""
    L = draw(st.integers(1, 4))
    ks = sorted(draw(st.sets(st.integers(1, 6), min_size=1, max_size=4)))
    if grid:
        # multiples of 0.1 (not exact in binary): real ties, but sums can differ by an ulp with order
        vals = st.integers(-20, 20).map(lambda i: i / 10)
    else:
        vals = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
    S = [[draw(vals) for _ in ks] for _ in range(L)]
    B = sum(draw(st.sampled_from(ks)) for _ in range(L))
    return S, ks, B


def brute(S, ks, B, tol):
    """Lexicographically smallest allocation with cost within tol of the optimum (the documented rule)."""
    allocs = [a for a in itertools.product(range(len(ks)), repeat=len(S)) if sum(ks[j] for j in a) == B]
    cost = {a: sum(S[l][j] for l, j in enumerate(a)) for a in allocs}
    best = min(cost.values())
    return min([ks[j] for j in a] for a in allocs if cost[a] <= best + tol), best


def cost_of(S, ks, alloc):
    return sum(S[l][ks.index(k)] for l, k in enumerate(alloc))


# -----------------------------------------------------------------------------
# dp / frontier


@settings(max_examples=300, deadline=None)
@given(problems())
def test_dp_matches_brute_force_including_ties(p):
    S, ks, B = p
    # any tol between an ulp and 0.1 selects the same set on this grid
    want, _ = brute(S, ks, B, tol=1e-6)
    assert dp_allocate(S, ks, B) == want


@settings(max_examples=200, deadline=None)
@given(problems(grid=False))
def test_dp_optimal_on_arbitrary_floats(p):
    S, ks, B = p
    got = dp_allocate(S, ks, B)
    assert sum(got) == B and all(k in ks for k in got)
    _, best = brute(S, ks, B, tol=0.0)
    assert cost_of(S, ks, got) <= best + _tie_tol(np.asarray(S))


@settings(max_examples=150, deadline=None)
@given(problems())
def test_frontier_agrees_with_single_solves(p):
    S, ks, _ = p
    L = len(S)
    F = frontier(S, ks)
    reachable = {sum(c) for c in itertools.product(ks, repeat=L)}
    assert set(F) == reachable
    assert set(F) <= set(range(L * ks[0], L * ks[-1] + 1))
    for B, (c, alloc) in F.items():
        assert alloc == dp_allocate(S, ks, B)
        assert math.isclose(c, cost_of(S, ks, alloc), abs_tol=1e-9)


def test_frontier_contiguous_covers_every_budget():
    S = np.random.default_rng(0).normal(size=(5, 4))
    F = frontier(S, [1, 2, 3, 4])
    assert list(F) == list(range(5, 21))
    assert F[20][1] == [4] * 5 and F[5][1] == [1] * 5


def test_dp_simple_cases_and_ties():
    # all-equal matrix: every allocation ties -> lexicographically smallest
    assert dp_allocate(np.zeros((3, 3)), [1, 2, 3], 6) == [1, 2, 3]
    # non-monotone and negative values
    S = [[5.0, -1.0, 0.0], [0.0, 3.0, -2.0]]
    assert dp_allocate(S, [1, 2, 3], 5) == [2, 3]


def test_dp_ulp_tie():
    # cost [1,2] = 0.1 + 0.2 = 0.30000000000000004, cost [2,1] = 0.3 + 0.0 = 0.3: a tie in exact arithmetic
    # without the tolerance the float-cheaper [2, 1] would win
    S = [[0.1, 0.3], [0.0, 0.2]]
    assert dp_allocate(S, [1, 2], 3) == [1, 2]
    assert frontier(S, [1, 2])[3][1] == [1, 2]


@st.composite
def integer_problems(draw):
    """(S, k_values, B, shifts) with integer costs: adding an integer to a row is exact, and costs are either
    equal or at least 1 apart, far outside the tie tolerance."""
    L = draw(st.integers(1, 5))
    ks = sorted(draw(st.sets(st.integers(1, 6), min_size=1, max_size=4)))
    S = [[draw(st.integers(-9, 9)) for _ in ks] for _ in range(L)]
    B = sum(draw(st.sampled_from(ks)) for _ in range(L))
    shifts = [draw(st.integers(-1000, 1000)) for _ in range(L)]
    return S, ks, B, shifts


@settings(max_examples=150, deadline=None)
@given(integer_problems())
def test_allocation_ignores_per_layer_offsets(p):
    # A constant added to one layer's row adds the same to every allocation's cost, so the chosen allocation
    # (ties included: the tie-break is on k, not on cost) must not move; a solver normalising rows, or one
    # whose tie tolerance let the offsets' magnitude decide, would.
    S, ks, B, shifts = p
    T = [[v + c for v in row] for row, c in zip(S, shifts)]
    assert dp_allocate(T, ks, B) == dp_allocate(S, ks, B)
    if _contig(ks):  # greedy compares marginal steps within a row, which the offset cancels out of
        assert greedy_allocate(T, ks, B) == greedy_allocate(S, ks, B)
    fs, ft = frontier(S, ks), frontier(T, ks)
    assert {b: a for b, (_, a) in ft.items()} == {b: a for b, (_, a) in fs.items()}
    assert all(ft[b][0] == fs[b][0] + sum(shifts) for b in fs)


def test_dp_large_is_fast_and_optimal():
    # 48 layers x 8 candidate k: 8**48 allocations, so only a polynomial DP finishes at all; the bound is loose
    # (a shared 2-core machine) but an exponential or per-budget-restarting solver would blow far past it.
    import time

    rng = np.random.default_rng(1)
    # convex decreasing rows (diminishing returns): there the greedy marginal step is optimal, a known answer
    steps = np.sort(rng.uniform(0.01, 1.0, size=(48, 7)), axis=1)[:, ::-1]
    S = np.concatenate([np.cumsum(steps[:, ::-1], axis=1)[:, ::-1], np.zeros((48, 1))], axis=1)
    ks = list(range(1, 9))
    t0 = time.perf_counter()
    a = dp_allocate(S, ks, 48 * 4)
    F = frontier(S, ks)
    elapsed = time.perf_counter() - t0
    assert sum(a) == 192 and len(a) == 48
    assert len(F) == 48 * 7 + 1
    assert math.isclose(cost_of(S.tolist(), ks, a), cost_of(S.tolist(), ks, greedy_allocate(S, ks, 192)),
                        rel_tol=1e-12, abs_tol=1e-12)
    assert elapsed < 30, f"dp + frontier on 48 layers took {elapsed:.1f}s"


# -----------------------------------------------------------------------------
# baselines


def _contig(ks):
    return ks == list(range(ks[0], ks[-1] + 1))


@settings(max_examples=200, deadline=None)
@given(problems(), st.integers(0, 3))
def test_baselines_meet_budget_and_bounds(p, seed):
    S, ks, B = p
    L = len(S)
    outs = [random_allocate(L, ks, B, seed=seed), allocate_matrix(S, ks, B, "random", seed=seed)]
    if _contig(ks):
        outs += [uniform_allocate(L, ks, B), greedy_allocate(S, ks, B), allocate_matrix(S, ks, B, "uniform"),
                 allocate_matrix(S, ks, B, "greedy")]
    for a in outs:
        assert len(a) == L and sum(a) == B and all(k in ks for k in a)


def test_uniform_spreads_remainder_evenly():
    assert uniform_allocate(4, [1, 2, 3, 4], 10) == [3, 2, 3, 2]
    assert uniform_allocate(4, [1, 2, 3, 4], 9) == [3, 2, 2, 2]
    assert uniform_allocate(4, [1, 2, 3, 4], 11) == [3, 3, 3, 2]  # r=3: layers 0, 1, 2
    assert uniform_allocate(3, range(1, 9), 12) == [4, 4, 4]
    u = uniform_allocate(8, range(1, 9), 8 * 2 + 3)
    assert max(u) - min(u) == 1 and sum(u) == 19


def test_uniform_unrepresentable():
    with pytest.raises(BudgetError, match=r"cannot be split uniformly over 2 layers with k_values \[2, 4\]"):
        uniform_allocate(2, [2, 4], 6)
    assert uniform_allocate(2, [2, 4], 8) == [4, 4]


def test_random_seeded():
    a = random_allocate(6, range(1, 9), 24, seed=3)
    assert a == random_allocate(6, range(1, 9), 24, seed=3)
    assert len({tuple(random_allocate(6, range(1, 9), 24, seed=s)) for s in range(10)}) > 1


def test_random_is_uniform_over_allocations():
    # L=2, k in 1..3, B=4: allocations (1,3),(2,2),(3,1) each ~1/3
    counts = {}
    for s in range(600):
        a = tuple(random_allocate(2, [1, 2, 3], 4, seed=s))
        counts[a] = counts.get(a, 0) + 1
    assert set(counts) == {(1, 3), (2, 2), (3, 1)}
    assert all(150 < c < 250 for c in counts.values())


def test_greedy_known_answer_and_suboptimal():
    # layer 0: 3->2 costs 1, 2->1 costs 9; layer 1: 3->2 costs 2, 2->1 costs 0
    S = [[10.0, 1.0, 0.0], [2.0, 2.0, 0.0]]
    ks = [1, 2, 3]
    assert greedy_allocate(S, ks, 6) == [3, 3]
    assert greedy_allocate(S, ks, 5) == [2, 3]  # cheapest first step is layer 0
    assert greedy_allocate(S, ks, 4) == [2, 2]  # then layer 1 (2 < 9): cost 3
    assert dp_allocate(S, ks, 4) == [3, 1]  # optimum costs 2
    assert greedy_allocate(S, ks, 2) == [1, 1]


def test_greedy_ties_lowest_layer():
    assert greedy_allocate(np.zeros((3, 3)), [1, 2, 3], 8) == [2, 3, 3]
    assert greedy_allocate(np.zeros((3, 3)), [1, 2, 3], 7) == [1, 3, 3]


def test_method_registry_dispatch_and_unknown():
    S = [[1.0, 0.0], [0.0, 1.0]]
    assert allocate_matrix(S, [1, 2], 3, "dp") == dp_allocate(S, [1, 2], 3) == [2, 1]
    assert allocate_matrix(S, [1, 2], 3, "uniform") == [2, 1]
    # the registry's random method must take its seed from the context: over seeds it finds both allocations
    assert {tuple(allocate_matrix(S, [1, 2], 3, "random", seed=s)) for s in range(20)} == {(1, 2), (2, 1)}
    ctx = AllocationContext(budget=3, k_values=[1, 2], num_layers=2, seed=7)
    METHODS["random"].allocate(ctx)
    assert ctx.meta == {"seed": 7}  # recorded in the plan's meta, so the plan can be re-made
    assert {n for n, m in METHODS.items() if m.needs_profile} == {"dp", "greedy"}
    with pytest.raises(AllocMoeError) as e:
        get_method("best")
    assert str(e.value) == f"unknown allocation method 'best' (choose from {', '.join(METHODS)})"
    assert e.value.param == "method"


# -----------------------------------------------------------------------------
# validation


@pytest.mark.parametrize("S,ks,msg", [
    ([1.0, 2.0], [1, 2], "must be 2-D"),
    (np.zeros((0, 2)), [1, 2], "must be 2-D with at least one layer"),
    ([[1.0, 2.0]], [1, 2, 3], "has 2 columns but there are 3 k_values"),
    ([[1.0, float("nan")]], [1, 2], "non-finite value nan at layer 0, k=2"),
    ([[1.0, float("inf")]], [1, 2], "non-finite value inf"),
    ([[1.0, 2.0]], [2, 1], "strictly ascending positive"),
    ([[1.0, 2.0]], [0, 1], "strictly ascending positive"),
    ([[1.0, 2.0]], [1, 1], "strictly ascending positive"),
    ([[1.0, 2.0]], [1, 2.5], "non-empty list of integers"),
    ([[1.0]], [], "non-empty list of integers"),
    ([[1.0, 2.0], [1.0]], [1, 2], "not a rectangular array"),
    ([["a", "b"]], [1, 2], "not a rectangular array"),
])
def test_bad_matrices(S, ks, msg):
    with pytest.raises(ProfileError, match=msg) as e:
        dp_allocate(S, ks, 1)
    assert "\n" not in str(e.value)


def test_bad_int_budgets():
    S = np.zeros((2, 2))
    with pytest.raises(BudgetError) as e:
        dp_allocate(S, [1, 2], 5)
    assert str(e.value) == "budget 5 activations/token is infeasible: feasible range is 2..4 activations/token for 2 layers with k in [1, 2]"
    with pytest.raises(BudgetError, match="cannot be formed from k_values"):
        dp_allocate(np.zeros((1, 2)), [1, 3], 2)
    with pytest.raises(BudgetError, match="must be an integer"):
        dp_allocate(S, [1, 2], 3.0)
    with pytest.raises(BudgetError, match="infeasible"):
        random_allocate(2, [1, 2], 1)
    with pytest.raises(ProfileError, match="at least one MoE layer"):
        uniform_allocate(0, [1, 2], 1)


# -----------------------------------------------------------------------------
# parse_budget  (L=8 layers, original top-6, k in 1..6: original 48, feasible 8..48)

ARGS = dict(num_layers=8, original_k=6, k_from=1, k_to=6)


@pytest.mark.parametrize("budget,B", [
    (0.5, 24), ("0.5", 24), (" 0.5 ", 24), (".5", 24), ("5e-1", 24), (1.0, 48), ("1.0", 48), ("1.", 48),
    (np.float32(0.5), 24), (0.25, 12), (1 / 6, 8),
    (9, 9), ("9", 9), ("+9", 9), (48, 48), (8, 8), (np.int64(30), 30),
])
def test_parse_budget_values(budget, B):
    assert parse_budget(budget, **ARGS) == B


def test_parse_budget_round_half_up():
    # original budget 48: 0.40625 * 48 = 19.5 exactly
    assert parse_budget("0.40625", **ARGS) == 20  # 19.5 -> 20
    assert parse_budget(0.40625, **ARGS) == 20
    assert parse_budget("0.40624", **ARGS) == 19  # 19.49952 -> 19
    # 0.15 * 10 = 1.5 exactly as written (the float 0.15 is slightly below), rounds up to 2
    assert parse_budget(0.15, num_layers=2, original_k=5, k_from=1, k_to=5) == 2
    assert parse_budget("0.25", num_layers=1, original_k=6, k_from=1, k_to=6) == 2  # 1.5 -> 2
    assert parse_budget("0.75", num_layers=1, original_k=6, k_from=1, k_to=6) == 5  # 4.5 -> 5


@pytest.mark.parametrize("budget,msg", [
    (0.05, "budget 0.05 (2 activations/token) is infeasible: feasible range is 8..48 activations/token (0.167..1.0 of the original 48)"),
    ("1.5", "budget 1.5 (72 activations/token) is infeasible: feasible range is 8..48 activations/token (0.167..1.0 of the original 48)"),
    (0.001, "budget 0.001 (0 activations/token) is infeasible: feasible range is 8..48 activations/token (0.167..1.0 of the original 48)"),
    (60, "budget 60 activations/token is infeasible: feasible range is 8..48 activations/token (0.167..1.0 of the original 48)"),
    ("7", "budget 7 activations/token is infeasible: feasible range is 8..48 activations/token (0.167..1.0 of the original 48)"),
    ("1", "budget 1 activations/token is infeasible: feasible range is 8..48 activations/token (0.167..1.0 of the original 48)"),
    ("abc", "budget 'abc' is not a number; give a fraction of the original budget like 0.5 or an integer number of activations per token like 96"),
    ("", "budget '' is not a number; give a fraction of the original budget like 0.5 or an integer number of activations per token like 96"),
    ("1_0", "budget '1_0' is not a number; give a fraction of the original budget like 0.5 or an integer number of activations per token like 96"),
    (None, "budget None is not a number; give a fraction of the original budget like 0.5 or an integer number of activations per token like 96"),
    (True, "budget True is not a number; give a fraction of the original budget like 0.5 or an integer number of activations per token like 96"),
    (float("nan"), "budget is NaN; give a fraction of the original budget like 0.5 or an integer number of activations per token like 96"),
    ("NaN", "budget is NaN; give a fraction of the original budget like 0.5 or an integer number of activations per token like 96"),
    (float("inf"), "budget inf is not finite; give a fraction of the original budget like 0.5 or an integer number of activations per token like 96"),
    ("-inf", "budget '-inf' is not finite; give a fraction of the original budget like 0.5 or an integer number of activations per token like 96"),
    (-0.5, "budget -0.5 is negative; it must be positive"),
    ("-3", "budget -3 is negative; it must be positive"),
    (-3, "budget -3 is negative; it must be positive"),
    (0, "budget 0 is zero; it must be positive"),
    ("0", "budget 0 is zero; it must be positive"),
    (0.0, "budget 0.0 is zero; it must be positive"),
    ("0.0", "budget 0.0 is zero; it must be positive"),
])
def test_parse_budget_errors(budget, msg):
    with pytest.raises(BudgetError) as e:
        parse_budget(budget, **ARGS)
    assert str(e.value) == msg


def test_parse_budget_range_with_k_to_above_original():
    # k_to above the original top-k: fractions above 1.0 become feasible
    assert parse_budget(1.5, num_layers=4, original_k=2, k_from=1, k_to=4) == 12
    with pytest.raises(BudgetError) as e:
        parse_budget(3.0, num_layers=4, original_k=2, k_from=1, k_to=4)
    assert str(e.value) == ("budget 3.0 (24 activations/token) is infeasible: feasible range is 4..16 "
                            "activations/token (0.5..2.0 of the original 8)")
