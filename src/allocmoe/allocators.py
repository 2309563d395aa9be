"""Alloc-L: spend a fixed total of expert activations per token across MoE layers (numpy only).

Input is a sensitivity matrix S of shape (num_layers, len(k_values)): S[l, j] is the quality loss when
layer l alone runs top-k_values[j] (lower is better; may be negative or non-monotone in k). An
allocation picks one k per layer with sum(k) == B and cost sum_l S[l, k_l]. `dp_allocate` finds the
exact minimiser; `uniform_allocate`, `random_allocate` and `greedy_allocate` are baselines that meet
the same B exactly.

Tie-breaking (dp_allocate / frontier): among allocations whose cost is within `tol` of the optimum,
return the lexicographically smallest vector of k per layer (fewest experts in the earliest layers).
tol = 1e-9 * (1 + sum_l max_j |S[l, j]|), far above float rounding of a sum (a few ulps) and far
below any real difference between matrix entries, so sums that are equal in exact arithmetic but
differ by an ulp because of summation order still count as ties.
"""

from __future__ import annotations

import math
import re
from decimal import ROUND_HALF_UP, Decimal
from typing import Sequence

import numpy as np

from .errors import BudgetError, ProfileError

# -----------------------------------------------------------------------------
# budgets


def _fmt_frac(x: float) -> str:
    return str(round(x, 3))


def _range_msg(num_layers: int, original_k: int, k_from: int, k_to: int) -> str:
    total = num_layers * original_k
    lo, hi = num_layers * k_from, num_layers * k_to
    return (f"feasible range is {lo}..{hi} activations/token "
            f"({_fmt_frac(lo / total)}..{_fmt_frac(hi / total)} of the original {total})")


_INT_RE = re.compile(r"[+-]?\d+")
_NUM_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_HINT = "give a fraction of the original budget like 0.5 or an integer number of activations per token like 96"


def parse_budget(budget: str | float | int, num_layers: int, original_k: int, k_from: int, k_to: int) -> int:
    """Turn a user budget into B, the total number of expert activations per token over all MoE layers.

    - int (or a string of digits like "9"): absolute B.
    - float (or any other numeric string, e.g. "0.5", "1.0", "5e-1"): a fraction of the original budget
      num_layers * original_k, so 1.0 is the full budget. B = round-half-up(fraction * num_layers *
      original_k), computed exactly on the decimal as written (a float via its shortest repr), so
      0.25 of 6 = 1.5 gives 2 and 0.15 of 10 = 1.5 gives 2.

    Every layer's k is a candidate in k_from..k_to (the profile's k_values; not the token policies' per-token
    min_k / max_k). Raises BudgetError (one line) for non-numeric, NaN, infinite, zero or negative values, and
    when B is outside num_layers*k_from .. num_layers*k_to.
    """
    if num_layers < 1 or original_k < 1 or k_from < 1 or k_to < k_from:
        raise BudgetError(f"bad shape for a budget: num_layers={num_layers} original_k={original_k} "
                         f"k_from={k_from} k_to={k_to}")
    # classify into (raw text for messages, absolute int | fraction Decimal)
    if isinstance(budget, (bool, np.bool_)):
        raise BudgetError(f"budget {budget!r} is not a number; {_HINT}")
    if isinstance(budget, (int, np.integer)):
        raw, value = str(int(budget)), int(budget)
    elif isinstance(budget, (float, np.floating)):
        x = float(budget)
        raw = repr(x)
        if math.isnan(x):
            raise BudgetError(f"budget is NaN; {_HINT}")
        if math.isinf(x):
            raise BudgetError(f"budget {raw} is not finite; {_HINT}")
        value = Decimal(raw)
    elif isinstance(budget, str):
        raw = budget.strip()
        if raw.lower().lstrip("+-") == "nan":
            raise BudgetError(f"budget is NaN; {_HINT}")
        if raw.lower().lstrip("+-") in ("inf", "infinity"):
            raise BudgetError(f"budget {raw!r} is not finite; {_HINT}")
        if _INT_RE.fullmatch(raw):
            value = int(raw)
        elif _NUM_RE.fullmatch(raw):
            value = Decimal(raw)
        else:
            raise BudgetError(f"budget {budget!r} is not a number; {_HINT}")
    else:
        raise BudgetError(f"budget {budget!r} is not a number; {_HINT}")

    if value < 0:
        raise BudgetError(f"budget {raw} is negative; it must be positive")
    if value == 0:
        raise BudgetError(f"budget {raw} is zero; it must be positive")

    total = num_layers * original_k
    if isinstance(value, int):
        B, shown = value, f"budget {raw} activations/token"
    else:
        B = int((value * total).to_integral_value(rounding=ROUND_HALF_UP))
        shown = f"budget {raw} ({B} activations/token)"
    if not num_layers * k_from <= B <= num_layers * k_to:
        raise BudgetError(f"{shown} is infeasible: {_range_msg(num_layers, original_k, k_from, k_to)}")
    return B


# -----------------------------------------------------------------------------
# validation


def _check_k_values(k_values: Sequence[int]) -> list[int]:
    ks = list(k_values)
    if not ks or not all(isinstance(k, (int, np.integer)) and not isinstance(k, (bool, np.bool_)) for k in ks):
        raise ProfileError(f"k_values must be a non-empty list of integers, got {ks!r}")
    ks = [int(k) for k in ks]
    if ks[0] < 1 or any(a >= b for a, b in zip(ks, ks[1:])):
        raise ProfileError(f"k_values must be strictly ascending positive integers, got {ks}")
    return ks


def _check_layers(num_layers: int) -> int:
    if isinstance(num_layers, (bool, np.bool_)) or not isinstance(num_layers, (int, np.integer)) or num_layers < 1:
        raise ProfileError(f"need at least one MoE layer, got num_layers={num_layers!r}")
    return int(num_layers)


def _check_matrix(S, k_values: Sequence[int]) -> tuple[np.ndarray, list[int]]:
    ks = _check_k_values(k_values)
    try:
        M = np.asarray(S, dtype=np.float64)
    except (TypeError, ValueError):
        raise ProfileError("sensitivity matrix is not a rectangular array of numbers") from None
    if M.ndim != 2 or M.shape[0] < 1:
        raise ProfileError(f"sensitivity matrix must be 2-D with at least one layer row, got shape {M.shape}")
    if M.shape[1] != len(ks):
        raise ProfileError(f"sensitivity matrix has {M.shape[1]} columns but there are {len(ks)} k_values {ks}")
    if not np.isfinite(M).all():
        l, j = map(int, np.argwhere(~np.isfinite(M))[0])
        raise ProfileError(f"sensitivity matrix has a non-finite value {M[l, j]} at layer {l}, k={ks[j]}")
    return M, ks


def _reachable(num_layers: int, ks: list[int]) -> np.ndarray:
    """Boolean mask over 0..L*max(k): which totals some allocation reaches."""
    r = np.zeros(num_layers * ks[-1] + 1, dtype=bool)
    r[0] = True
    for _ in range(num_layers):
        nxt = np.zeros_like(r)
        for k in ks:
            nxt[k:] |= r[: len(r) - k]
        r = nxt
    return r


def _check_budget(budget: int, num_layers: int, ks: list[int]) -> int:
    if isinstance(budget, (bool, np.bool_)) or not isinstance(budget, (int, np.integer)):
        raise BudgetError(f"budget must be an integer number of activations per token, got {budget!r}")
    B, lo, hi = int(budget), num_layers * ks[0], num_layers * ks[-1]
    if not lo <= B <= hi:
        raise BudgetError(f"budget {B} activations/token is infeasible: feasible range is {lo}..{hi} "
                          f"activations/token for {num_layers} layers with k in {ks}")
    if not _reachable(num_layers, ks)[B]:
        raise BudgetError(f"budget {B} activations/token cannot be formed from k_values {ks} over {num_layers} layers")
    return B


# -----------------------------------------------------------------------------
# exact DP


def _tie_tol(M: np.ndarray) -> float:
    return 1e-9 * (1.0 + float(np.abs(M).max(axis=1).sum()))


def _suffix_table(M: np.ndarray, ks: list[int]) -> np.ndarray:
    """C[l, b] = min cost of layers l..L-1 spending exactly b activations (inf if impossible).

    Built from the last layer backwards so the forward reconstruction can pick the smallest k first.
    """
    L = M.shape[0]
    C = np.full((L + 1, L * ks[-1] + 1), np.inf)
    C[L, 0] = 0.0
    for l in range(L - 1, -1, -1):
        for j, k in enumerate(ks):
            np.minimum(C[l, k:], M[l, j] + C[l + 1, : C.shape[1] - k], out=C[l, k:])
    return C


def _reconstruct(M: np.ndarray, ks: list[int], C: np.ndarray, B: int, tol: float) -> list[int]:
    # Walk layers in order keeping `slack` = (optimum + tol) - cost so far. At each layer take the smallest
    # k that still admits a completion within the slack: this is exactly the lexicographically smallest
    # allocation whose cost is within tol of the optimum.
    kv = np.array(ks)
    slack, b, out = C[0, B] + tol, B, []
    for l in range(M.shape[0]):
        rest = np.where(kv <= b, C[l + 1, np.maximum(b - kv, 0)], np.inf)
        cand = M[l] + rest
        # max(): guard against an ulp of rounding in the running slack leaving no candidate
        j = int(np.argmax(cand <= max(slack, cand.min())))
        out.append(ks[j])
        slack -= M[l, j]
        b -= ks[j]
    assert b == 0
    return out


def _cost(M: np.ndarray, ks: list[int], alloc: list[int]) -> float:
    idx = {k: j for j, k in enumerate(ks)}
    return math.fsum(M[l, idx[k]] for l, k in enumerate(alloc))


def dp_allocate(S, k_values: Sequence[int], budget: int) -> list[int]:
    """Exact minimiser of sum_l S[l, k_l] subject to sum_l k_l == budget (tie rule: see module docstring)."""
    M, ks = _check_matrix(S, k_values)
    B = _check_budget(budget, M.shape[0], ks)
    return _reconstruct(M, ks, _suffix_table(M, ks), B, _tie_tol(M))


def frontier(S, k_values: Sequence[int]) -> dict[int, tuple[float, list[int]]]:
    """Optimal (cost, allocation) for every reachable budget B in L*min(k)..L*max(k), from one DP table.

    Allocations equal dp_allocate(S, k_values, B); the cost is their exact sum (math.fsum). Budgets that
    no allocation reaches (possible only when k_values has gaps) are absent.
    """
    M, ks = _check_matrix(S, k_values)
    L = M.shape[0]
    C, tol = _suffix_table(M, ks), _tie_tol(M)
    out = {}
    for B in range(L * ks[0], L * ks[-1] + 1):
        if np.isfinite(C[0, B]):
            alloc = _reconstruct(M, ks, C, B, tol)
            out[B] = (_cost(M, ks, alloc), alloc)
    return out


# -----------------------------------------------------------------------------
# baselines


def uniform_allocate(num_layers: int, k_values: Sequence[int], budget: int) -> list[int]:
    """k = B // L in every layer, plus 1 in r = B % L evenly spaced layers: indices i*L // r for i < r.

    Both B // L and (when r > 0) B // L + 1 must be in k_values, else BudgetError.
    """
    L, ks = _check_layers(num_layers), _check_k_values(k_values)
    B = _check_budget(budget, L, ks)
    base, r = divmod(B, L)
    if base not in ks or (r and base + 1 not in ks):
        raise BudgetError(f"budget {B} activations/token cannot be split uniformly over {L} layers "
                          f"with k_values {ks} (needs k={base}" + (f" and k={base + 1})" if r else ")"))
    out = [base] * L
    for i in range(r):
        out[i * L // r] += 1
    return out


def random_allocate(num_layers: int, k_values: Sequence[int], budget: int, seed: int = 0) -> list[int]:
    """A uniformly random allocation among all those with sum == budget, from numpy Generator(seed).

    Counts completions per (layer, remaining budget) exactly with Python ints, then samples layer by
    layer with probability proportional to the number of completions, so every feasible allocation is
    equally likely. Same seed -> same allocation.
    """
    L, ks = _check_layers(num_layers), _check_k_values(k_values)
    B = _check_budget(budget, L, ks)
    # N[l][b] = number of ways layers l..L-1 sum to b; Python ints since this grows like len(ks)**L
    N = [[0] * (B + 1) for _ in range(L + 1)]
    N[L][0] = 1
    for l in range(L - 1, -1, -1):
        for b in range(B + 1):
            N[l][b] = sum(N[l + 1][b - k] for k in ks if k <= b)
    rng = np.random.default_rng(seed)
    out, b = [], B
    for l in range(L):
        w = np.array([N[l + 1][b - k] / N[l][b] if k <= b else 0.0 for k in ks])
        cdf = np.cumsum(w)
        j = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))  # never lands on a zero weight
        out.append(ks[j])
        b -= ks[j]
    assert b == 0
    return out


def greedy_allocate(S, k_values: Sequence[int], budget: int) -> list[int]:
    """Start at max(k) in every layer; repeatedly drop one layer to its next lower k, choosing the step
    that raises S least (exact float comparison, ties -> lowest layer index), until sum == budget.

    Steps that would undershoot the budget are skipped; if k_values has gaps and no step lands exactly
    on the budget, raises BudgetError.
    """
    M, ks = _check_matrix(S, k_values)
    L = M.shape[0]
    B = _check_budget(budget, L, ks)
    j = [len(ks) - 1] * L
    total = L * ks[-1]
    while total > B:
        best = None
        for l in range(L):
            if j[l] == 0 or total - (ks[j[l]] - ks[j[l] - 1]) < B:
                continue
            d = M[l, j[l] - 1] - M[l, j[l]]
            if best is None or d < best[0]:
                best = (d, l)
        if best is None:
            raise BudgetError(f"greedy cannot reach budget {B} activations/token exactly with k_values {ks}; use dp")
        l = best[1]
        total -= ks[j[l]] - ks[j[l] - 1]
        j[l] -= 1
    return [ks[i] for i in j]
