"""KL(full || candidate) between next-token distributions, the quality measure behind Alloc-L's profile, the
plan search and the compensation fit's model selection. The full model's side is computed once per batch
(`Reference`); each candidate's logits are then scored against it."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class Reference(NamedTuple):
    """The full model's distribution at each position: p [..., V] and sum_v p log p [...]."""

    p: torch.Tensor
    plogp: torch.Tensor

    @classmethod
    def of(cls, logits: torch.Tensor) -> "Reference":
        return cls.from_logp(F.log_softmax(logits.float(), dim=-1))

    @classmethod
    def from_logp(cls, logp: torch.Tensor) -> "Reference":
        """From the full model's log-probs (when the caller also needs them, e.g. for its NLL)."""
        p = logp.exp()
        return cls(p, (p * logp).sum(-1))

    def kl(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(KL(reference || softmax(logits)) per position, the candidate's log-probs).
        KL = sum p log p - sum p log q, the first term computed once in `of`; both terms are reduced the same
        way, so the full model scores exactly 0 against itself."""
        logp = F.log_softmax(logits.float(), dim=-1)
        return self.plogp - (self.p * logp).sum(-1), logp

    def kl_sum(self, logits: torch.Tensor) -> float:
        """Summed KL over all positions, in float64."""
        return float(self.kl(logits)[0].double().sum())

    def head(self, n: int) -> "Reference":
        """The first n sequences of the batch (for a shorter last batch)."""
        return Reference(self.p[:n], self.plogp[:n])
