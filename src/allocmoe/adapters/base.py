"""The one interface every model family implements, and the structural search for MoE blocks.

A *family adapter* knows how one router family turns hidden states into routing scores and how it
turns the scores of the kept experts into mixing weights. Everything else in allocmoe (policies,
the experts path, counting, profiling) is family-agnostic and talks to routers only through this.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class RouterScores:
    """What a router computes for T tokens before choosing experts.

    logits: what the stock router returns as its first output (kept for API compatibility).
    rank:   [T, E] float32 scores used to *choose* experts, comparable across tokens (probabilities or
            bias-corrected sigmoid scores); experts a family forbids for a token (group-limited routing)
            are -inf.
    weight: [T, E] float32 scores the mixing weights are taken from (e.g. unbiased sigmoid for DeepSeek-V3).
    """

    logits: torch.Tensor
    rank: torch.Tensor
    weight: torch.Tensor


class FamilyAdapter:
    """Routing semantics of one router family. Subclasses are tiny; see families.py."""

    name: str = "?"
    router_classes: tuple[str, ...] = ()
    score_function: str = "softmax"  # softmax | sigmoid
    score_order: str = "softmax-then-topk"  # or topk-then-softmax

    def matches(self, router: nn.Module) -> bool:
        return type(router).__name__ in self.router_classes

    # --- routing -------------------------------------------------------------------------------
    def scores(self, router: nn.Module, hidden: torch.Tensor) -> RouterScores:
        raise NotImplementedError

    def renormalises(self, router: nn.Module) -> bool:
        """Whether the family's native weights over the kept experts are renormalised to sum to 1."""
        return False

    def scaling_factor(self, router: nn.Module) -> float:
        return float(getattr(router, "routed_scaling_factor", 1.0) or 1.0)

    def weight_dtype(self, router: nn.Module, hidden: torch.Tensor, logits: torch.Tensor) -> torch.dtype:
        """Dtype of the weights the stock router returns (the experts multiply by them)."""
        return logits.dtype

    def group_limit(self, router: nn.Module) -> dict | None:
        return None

    def describe(self, router: nn.Module) -> dict:
        d = {
            "family": self.name,
            "score_function": self.score_function,
            "score_order": self.score_order,
            "renormalise_topk": self.renormalises(router),
            "routed_scaling_factor": self.scaling_factor(router),
        }
        g = self.group_limit(router)
        if g:
            d["group_limited"] = g
        if getattr(router, "e_score_correction_bias", None) is not None:
            d["score_correction_bias"] = True
        return d


@dataclass
class MoELayer:
    """One routed MoE block of a model, as found by `find_moe_layers`."""

    index: int  # position among MoE layers (what a plan indexes)
    name: str  # module path, e.g. "model.layers.3.mlp"
    decoder_index: int | None  # index of the decoder layer that holds it, when the path says so
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    adapter: FamilyAdapter
    num_experts: int
    top_k: int
    shared_experts: int = 0
    shared_intermediate_size: int | None = None
    extra: dict = field(default_factory=dict)

    def describe(self) -> dict:
        d = {
            "index": self.index,
            "name": self.name,
            "decoder_layer": self.decoder_index,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "shared_experts": self.shared_experts,
        }
        d.update(self.adapter.describe(self.router))
        return d
