"""KL(full || candidate) between next-token distributions, the quality measure behind Alloc-L's profile, the
plan search and the compensation fit's model selection. The full model's side is computed once per batch
(`Reference`); each candidate's logits are then scored against it.

Also the one rule for where a model's inputs go (`model_device`) and the batched forward + KL loop that the
plan search, the compensation fit and calibration share (`batches`, `forward_logits`, `references`,
`mean_kl`); profiling keeps its own loop (it replays cached decoder layers) but scores with `Reference` and
places inputs with `model_device` too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


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


# --------------------------------------------------------------------------------------------------
# the shared batched forward and KL loop


def model_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: the device of its first materialised (non-meta) weight. Under accelerate's
    offload or a device map the first weights may be on `meta`; its hooks move the inputs on from there."""
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def batches(windows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive row blocks of `windows` [N, S], the last one possibly shorter."""
    for i in range(0, windows.shape[0], batch_size):
        yield windows[i:i + batch_size]


def forward_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """One forward over token ids [B, S] on the model's device (no KV cache): the logits [B, S, V]."""
    return model(input_ids=ids.to(model_device(model)), use_cache=False).logits


def references(model: nn.Module, windows: torch.Tensor, batch_size: int,
               device: torch.device | str | None = None) -> list[Reference]:
    """The model's own distributions on `windows`, one `Reference` per batch of `batches(windows, batch_size)`.
    Run it on the full model (unpatched, or under a full plan). `device`: where to keep them (e.g. "cpu" to
    spare accelerator memory when many batches are held); None keeps them where the logits are."""
    out = []
    with torch.no_grad():
        for ids in batches(windows, batch_size):
            logits = forward_logits(model, ids)
            out.append(Reference.of(logits if device is None else logits.to(device)))
    return out


def mean_kl(model: nn.Module, windows: torch.Tensor, refs: list[Reference], batch_size: int) -> float:
    """Mean per-position KL(reference || model) in nats over `windows`, scored in the model's current state
    (a plan applied, compensation installed, ...). `refs` come from `references` on the same windows with the
    same batch size; `windows` may be a prefix of those (a shorter last batch uses the head of its reference)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for ids, ref in zip(batches(windows, batch_size), refs):
            ref = ref.head(ids.shape[0])
            logits = forward_logits(model, ids)
            total += ref.kl_sum(logits.to(ref.p.device))
            n += ref.plogp.numel()
    return total / n
