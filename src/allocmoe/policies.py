"""Token policies: how many of its best-ranked experts each token keeps in one layer.

Every policy here keeps, per token, a *prefix* of that token's experts sorted by routing score; the
policies differ only in how they choose the per-token count c_t in [min_k, max_k]:

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

import torch


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
