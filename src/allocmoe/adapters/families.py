"""Per-family routing semantics. Each class mirrors its transformers router's forward exactly.

Checked against transformers 5.x: models/{deepseek_v2,deepseek_v3,qwen2_moe,qwen3_moe,olmoe,mixtral,
gpt_oss,granitemoe}/modeling_*.py. When a family ranks raw logits and softmaxes only over the top-k
(GPT-OSS, Granite), `rank` is the full softmax: per token it orders experts exactly as the logits do,
and unlike logits it is comparable across tokens (needed by batch-global policies); softmax over the
kept logits equals the full softmax renormalised over the kept set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UnsupportedModelError
from ..registry import Registry
from .base import FamilyAdapter, RouterScores

#: Family name -> adapter. Adding a family is one class here (or anywhere) decorated with `@register_family`;
#: `find_moe_layers` tries them in registration order and its error lists their names.
ADAPTERS: Registry[FamilyAdapter] = Registry("model family", UnsupportedModelError)
register_family = ADAPTERS.register


def _group_mask(scores: torch.Tensor, n_group: int, topk_group: int, how: str) -> torch.Tensor:
    """Boolean [T, E] mask of experts inside each token's `topk_group` best groups."""
    T, E = scores.shape
    grouped = scores.view(T, n_group, E // n_group)
    if how == "max":  # DeepSeek-V2 group_limited_greedy
        group_scores = grouped.max(dim=-1).values
    else:  # DeepSeek-V3: sum of the two best experts of the group
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    gmask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    return gmask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)


class SoftmaxTopK(FamilyAdapter):
    """softmax over all experts, then top-k; optional renormalisation (Qwen2/3-MoE, OLMoE, Mixtral)."""

    name = "softmax-topk"

    def scores(self, router, hidden):
        hidden = hidden.reshape(-1, router.hidden_dim)
        logits = F.linear(hidden, router.weight)
        probs = torch.softmax(logits.float(), dim=-1)
        return RouterScores(logits, probs, probs)

    def renormalises(self, router):
        return bool(getattr(router, "norm_topk_prob", False))


@register_family
class Qwen2Moe(SoftmaxTopK):
    name = "qwen2_moe"
    router_classes = ("Qwen2MoeTopKRouter",)


@register_family
class Qwen3Moe(SoftmaxTopK):
    name = "qwen3_moe"
    router_classes = ("Qwen3MoeTopKRouter",)


@register_family
class Olmoe(SoftmaxTopK):
    name = "olmoe"
    router_classes = ("OlmoeTopKRouter",)


@register_family
class Mixtral(SoftmaxTopK):
    name = "mixtral"
    router_classes = ("MixtralTopKRouter",)

    def renormalises(self, router):
        return True  # MixtralTopKRouter always divides by the kept sum


@register_family
class DeepseekV2(FamilyAdapter):
    """softmax (fp32), greedy or group-limited top-k, never renormalised, times routed_scaling_factor."""

    name = "deepseek_v2"
    router_classes = ("DeepseekV2TopkRouter",)

    def scores(self, router, hidden):
        hidden = hidden.view(-1, router.hidden_dim)
        logits = F.linear(hidden.float(), router.weight.float())
        probs = logits.softmax(dim=-1, dtype=torch.float32)
        rank = probs
        if router.topk_method == "group_limited_greedy":
            mask = _group_mask(probs, router.num_group, router.topk_group, "max")
            rank = probs.masked_fill(~mask, float("-inf"))
        return RouterScores(logits, rank, probs)

    def weight_dtype(self, router, hidden, logits):
        return torch.float32

    def group_limit(self, router):
        if router.topk_method == "group_limited_greedy":
            return {"n_group": router.num_group, "topk_group": router.topk_group, "group_score": "max"}
        return None


@register_family
class DeepseekV3(FamilyAdapter):
    """sigmoid scores; choose on score + e_score_correction_bias within the best groups; weight with
    the unbiased sigmoid, optionally renormalised, times routed_scaling_factor."""

    name = "deepseek_v3"
    router_classes = ("DeepseekV3TopkRouter",)
    score_function = "sigmoid"

    def scores(self, router, hidden):
        hidden = hidden.view(-1, router.hidden_dim)
        logits = F.linear(hidden.float(), router.weight.float())
        sig = logits.sigmoid()
        choice = sig + router.e_score_correction_bias
        mask = _group_mask(choice, router.num_group, router.topk_group, "top2sum")
        return RouterScores(logits, choice.masked_fill(~mask, float("-inf")), sig)

    def renormalises(self, router):
        return bool(router.norm_topk_prob)

    def weight_dtype(self, router, hidden, logits):
        return torch.float32

    def group_limit(self, router):
        return {"n_group": router.num_group, "topk_group": router.topk_group, "group_score": "top2-sum"}


class LogitTopKSoftmax(FamilyAdapter):
    """top-k on raw logits, softmax over the kept logits (GPT-OSS, Granite-MoE)."""

    score_order = "topk-then-softmax"

    def renormalises(self, router):
        return True


@register_family
class GptOss(LogitTopKSoftmax):
    name = "gpt_oss"
    router_classes = ("GptOssTopKRouter",)

    def scores(self, router, hidden):
        logits = F.linear(hidden, router.weight, router.bias)
        probs = torch.softmax(logits.float(), dim=-1)
        return RouterScores(logits, probs, probs)


@register_family
class GraniteMoe(LogitTopKSoftmax):
    name = "granitemoe"
    router_classes = ("GraniteMoeTopKRouter",)

    def scores(self, router, hidden):
        logits = F.linear(hidden, router.weight).float()
        probs = torch.softmax(logits, dim=-1)
        return RouterScores(logits, probs, probs)

    def weight_dtype(self, router, hidden, logits):
        return hidden.dtype


# Families whose routing cannot be cut in a way that saves compute, with the reason we give users.
REFUSED = {
    "llama4": "Llama4 runs every routed expert on every token (dense dispatch), so fewer activations save nothing",
    "llama4_text": "Llama4 runs every routed expert on every token (dense dispatch), so fewer activations save nothing",
    "phimoe": "Phi-MoE's sparsemixer routing hard-codes top-2 selection, so its expert count cannot be changed",
}
