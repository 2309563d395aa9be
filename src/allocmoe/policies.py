"""Token policies: how many of its best-ranked experts each token keeps in one layer.

Every policy keeps, per token, a *prefix* of that token's experts sorted by routing score; policies differ
only in how they choose the per-token count c_t in [min_k, max_k]. Each policy is one `TokenPolicy`
subclass registered in `TOKEN_POLICIES`; every list of policy names elsewhere (plan validation, the CLI,
calibration, the main job) is derived from that table, so adding a policy is one class in this file.

- fixed      c_t = K_l for every token (Alloc-L alone).
- global     Alloc-T: the T real tokens of the call share K_l*T activations; after each token's first
             min_k, the remaining K_l*T - min_k*T slots go to the globally best-scored candidates (the
             optimal selection under the bounds, since each token's scores are sorted). Not causal.
- threshold  keep experts with score >= tau_l (a per-layer threshold calibrated so the mean count is K_l).
- top-p      keep experts until their cumulative (normalised) score reaches p (arXiv 2403.07652).
- naee       keep expert i while its score >= beta * (top score) (NAEE dynamic skipping, ACL 2024).

Padding tokens (valid == False) get c_t = 0: they take no budget and run no expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .errors import PlanError
from .registry import Registry


@dataclass
class Candidates:
    """One layer's routing for T tokens, as the policies see it.

    vals/ids: each token's best max_k experts by rank score, best first ([T, max_k]); valid: bool [T] real
    tokens, or None (all); rank/raw_weight: the router's [T, E] scores, from which `weight` is derived on first
    use (only policies that read mixing weights pay for it).
    """

    vals: torch.Tensor
    ids: torch.Tensor | None
    valid: torch.Tensor | None
    rank: torch.Tensor | None = None
    raw_weight: torch.Tensor | None = None

    @cached_property
    def weight(self) -> torch.Tensor:
        """[T, E] mixing scores with the entries a family forbids (-inf rank) zeroed."""
        return self.raw_weight.masked_fill(~torch.isfinite(self.rank), 0.0)


class TokenPolicy:
    """How one layer picks per-token expert counts. Subclasses set the class attributes and `counts`."""

    name: str = "?"
    #: calibrated policies tune one knob on calibration text so the mean count meets the budget
    calibrated: bool = False
    #: the knob calibration tunes: its key, and whether it is stored per layer (in the plan's layer rows)
    param: str | None = None
    per_layer_param: bool = False
    #: bounds of the knob for bisection, and whether the mean count grows with it
    param_range: tuple[float, float] = (0.0, 1.0)
    param_increases_count: bool = True
    #: fixed counts: every token runs exactly K_l (no candidate list beyond K_l is needed)
    exact: bool = False
    #: per-token counts respect min_k as a hard floor, so a plan's k must be >= min_k
    k_at_least_min_k: bool = True
    #: the allocation method this policy is paired with in the main job (None: not run there)
    run_with: str | None = None
    label: str = ""  # how reports name it beside a method (default: its name)
    summary: str = ""

    def __init__(self):
        self.label = self.label or self.name

    def counts(self, c: Candidates, k: int, params: dict, min_k: int) -> torch.Tensor:
        raise NotImplementedError

    def calibration_counts(self, rec: dict, x: float, min_k: int) -> torch.Tensor:
        """Counts with knob value x on scores recorded by calibration (`rec`: vals, wvals, wsum)."""
        return self.counts(Candidates(rec["vals"], None, None), 0, {self.param: x}, min_k)

    def defaults(self, ks: list[int], original_k: int) -> dict:
        """Token-policy fields a plan with this policy carries before any calibration."""
        return {} if self.exact else {"min_k": 1, "max_k": max(original_k, max(ks))}


TOKEN_POLICIES: Registry[TokenPolicy] = Registry("token policy", PlanError)
register_policy = TOKEN_POLICIES.register
get_policy = TOKEN_POLICIES.lookup


# --------------------------------------------------------------------------------------------------


@register_policy
class Fixed(TokenPolicy):
    name, exact, summary = "fixed", True, "every token its top-K_l"

    def counts(self, c, k, params, min_k):
        return torch.full((c.vals.shape[0],), k, dtype=torch.long, device=c.vals.device)


@register_policy
class Global(TokenPolicy):
    name, run_with, label = "global", "dp", "Alloc-T"
    summary = "Alloc-T: the tokens of a call share K_l*T activations, each between min_k and max_k (not causal)"

    def counts(self, c, k, params, min_k):
        return global_counts(c.vals, k, min_k, c.valid)


@register_policy
class Threshold(TokenPolicy):
    name, calibrated, param, per_layer_param, run_with = "threshold", True, "threshold", True, "dp"
    k_at_least_min_k, param_increases_count = False, False
    summary = "causal: keep experts scoring >= a per-layer threshold calibrated so the mean is K_l"

    def counts(self, c, k, params, min_k):
        return threshold_counts(c.vals, float(params["threshold"]), min_k)


@register_policy
class TopP(TokenPolicy):
    name, calibrated, param, run_with = "top-p", True, "p", "uniform"
    k_at_least_min_k = False
    summary = "keep experts until their cumulative score reaches p (arXiv 2403.07652)"

    def counts(self, c, k, params, min_k):
        return top_p_counts(c.weight.gather(1, c.ids), c.weight.sum(dim=-1), float(params["p"]), min_k)

    def calibration_counts(self, rec, x, min_k):
        return top_p_counts(rec["wvals"], rec["wsum"], x, min_k)


@register_policy
class NAEE(TokenPolicy):
    name, calibrated, param, run_with = "naee", True, "beta", "uniform"
    k_at_least_min_k, param_increases_count = False, False
    summary = "NAEE dynamic skipping: keep experts scoring >= beta x the top score"

    def counts(self, c, k, params, min_k):
        return naee_counts(c.vals, float(params["beta"]), min_k)


# --------------------------------------------------------------------------------------------------
# the count functions (pure tensor code, shared by inference and calibration)


def sorted_candidates(rank: torch.Tensor, max_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's best `max_k` experts, best first: (values [T, max_k], expert ids [T, max_k])."""
    return torch.topk(rank, k=max_k, dim=-1, sorted=True)


def global_counts(vals: torch.Tensor, k: int, min_k: int, valid: torch.Tensor | None) -> torch.Tensor:
    """Per-token counts for the batch-global policy. vals: [T, max_k] sorted descending per row."""
    T, max_k = vals.shape
    n_real = T if valid is None else int(valid.sum())
    counts = torch.full((T,), min_k, dtype=torch.long, device=vals.device)
    if valid is not None:
        counts[~valid] = 0
    extra = (k - min_k) * n_real
    if extra > 0 and max_k > min_k:
        cand = vals[:, min_k:].clone()
        if valid is not None:
            cand[~valid] = float("-inf")
        cand = cand.reshape(-1)
        # -inf candidates (experts outside a token's allowed groups, padding) are never taken
        extra = min(extra, int(torch.isfinite(cand).sum()))
        chosen = torch.topk(cand, k=extra, sorted=False).indices // (max_k - min_k)
        counts += torch.bincount(chosen, minlength=T)
    return counts


def threshold_counts(vals: torch.Tensor, tau: float, min_k: int) -> torch.Tensor:
    return (vals >= tau).sum(dim=-1).clamp(min=min_k)


def top_p_counts(vals: torch.Tensor, rank_sum: torch.Tensor, p: float, min_k: int) -> torch.Tensor:
    """Smallest c with cumulative normalised score >= p (capped at max_k = vals.shape[1])."""
    cum = vals.cumsum(dim=-1) / rank_sum.unsqueeze(-1)
    # number of prefixes whose mass is still below p, plus the one that crosses it
    c = (cum < p).sum(dim=-1) + 1
    return c.clamp(min=min_k, max=vals.shape[1])


def naee_counts(vals: torch.Tensor, beta: float, min_k: int) -> torch.Tensor:
    return (vals >= beta * vals[:, :1]).sum(dim=-1).clamp(min=min_k)


def prefix_index(ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """ids [T, M] with slots beyond each token's count replaced by -1 (= dropped, never computed)."""
    keep = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0) < counts.unsqueeze(1)
    return torch.where(keep, ids, torch.full_like(ids, -1))
