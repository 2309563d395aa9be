"""Uncertainty of perplexity comparisons: a paired bootstrap over evaluation windows (numpy only, seeded).

Every configuration of a comparison is scored on the same windows (`evaluate()`'s `window_nll` and
`window_tokens`: summed NLL and scored tokens per window). A resample draws windows with replacement, the
same draw for every configuration, and recomputes each configuration's perplexity on it; the relative
difference ppl_b / ppl_a - 1 = exp((NLL_b - NLL_a) / tokens) - 1 of each resample gives a percentile interval.
Windows, not tokens, are the unit: tokens of one window are strongly correlated, windows much less so.

`paired_interval` compares two configurations; `Bootstrap` holds one draw for many (the report compares
every pair of a budget's table on the same resamples). Same inputs and seed give the same numbers.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


class Bootstrap:
    """One seeded draw of `resamples` window resamples for `n` windows of `tokens` scored tokens each."""

    def __init__(self, tokens: Sequence[int], resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL):
        self.tokens = np.asarray(tokens, dtype=np.float64)
        n = len(self.tokens)
        if n < 2:
            raise ValueError(f"a bootstrap needs at least 2 windows, got {n}")
        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), got {level}")
        self.n, self.resamples, self.level, self.seed = n, resamples, level, seed
        rng = np.random.default_rng(seed)
        # resample r counts window i counts[r, i] times (a multinomial draw = n draws with replacement)
        self.counts = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)
        self.resampled_tokens = self.counts @ self.tokens

    def nll_sums(self, window_nll: Sequence[float]) -> np.ndarray:
        """Each resample's summed NLL of one configuration."""
        v = np.asarray(window_nll, dtype=np.float64)
        if v.shape != (self.n,):
            raise ValueError(f"expected {self.n} window NLLs, got {v.shape[0] if v.ndim == 1 else v.shape}")
        return self.counts @ v

    def relative(self, base_nll: Sequence[float], other_nll: Sequence[float]) -> dict:
        """ppl(other) / ppl(base) - 1 on all windows, with its interval over the resamples (`resolved`: the
        interval excludes 0, i.e. the data tell the two apart at this level)."""
        a, b = np.asarray(base_nll, dtype=np.float64), np.asarray(other_nll, dtype=np.float64)
        point = float(np.expm1((b.sum() - a.sum()) / self.tokens.sum()))
        return self.from_sums(point, self.nll_sums(a), self.nll_sums(b))

    def from_sums(self, point: float, sums_a: np.ndarray, sums_b: np.ndarray) -> dict:
        d = np.expm1((sums_b - sums_a) / self.resampled_tokens)
        q = (1 - self.level) / 2
        lo, hi = (float(x) for x in np.quantile(d, [q, 1 - q]))
        return {"delta": point, "low": lo, "high": hi, "level": self.level, "windows": self.n,
                "resamples": self.resamples, "seed": self.seed, "resolved": not lo <= 0 <= hi}


def paired_interval(base_nll: Sequence[float], other_nll: Sequence[float], tokens: Sequence[int], *,
                    resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> dict:
    """ppl(other) / ppl(base) - 1 with its paired-bootstrap interval (see the module docstring)."""
    return Bootstrap(tokens, resamples, seed, level).relative(base_nll, other_nll)


def resolved_ranks(window_nll: list[Sequence[float]], tokens: Sequence[int], *, resamples: int = RESAMPLES,
                   seed: int = 0, level: float = LEVEL) -> list[int]:
    """A rank per configuration that claims only orders the data resolve: 1 + the number of configurations
    whose perplexity is lower with an interval that excludes 0 (so configurations the data cannot tell apart
    may share a rank)."""
    bs = Bootstrap(tokens, resamples, seed, level)
    sums = [bs.nll_sums(v) for v in window_nll]
    totals = [float(np.sum(v)) for v in window_nll]
    q = (1 - level) / 2
    ranks = []
    for i in range(len(sums)):
        better = 0
        for j in range(len(sums)):
            if j != i and totals[j] < totals[i]:  # j is better on all windows; resolved if its interval is > 0
                better += bool(np.quantile((sums[i] - sums[j]) / bs.resampled_tokens, q) > 0)
        ranks.append(1 + better)
    return ranks
